"""Turn one raw command message into an outcome. Pure: no Kafka, no clock, no randomness.

The outcomes, in the order they are checked:
- `Undeliverable`: not even a command (not JSON, no command_id) -> dead-letter topic.
- `Duplicate`: a command_id already processed -> its original result, nothing new.
- `Refused`: a well-formed message that breaks a schema or a rule -> a `rejected` result whose
  reason names the field or rule. Tenancy is checked here, once for every aggregate: a command
  naming a workspace that does not exist is refused (field workspace_id), and an aggregate of
  another workspace answers as if it did not exist (field aggregate_id).
- `Accepted`: the events the aggregate decided, as envelopes with the next sequences (and the
  exact bytes to write), and the aggregate's new state.

No poison pill: whatever goes wrong while deciding, folding or encoding ONE command (a bug, a
datetime overflow, a value JSON cannot carry) becomes a `Refused` with category "server" that
names the exception, so the processor answers and moves on instead of dying at the same offset
on every restart. Only the producer's own errors stay with the processor, which owns recovery.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from pydantic import ValidationError

from commands.envelope import CommandEnvelope, CommandResult, EventRef, caused_event
from commands.loops import Rejected
from commands.registry import COMMAND_TYPES, AggregateSpec
from events.envelope import DEFAULT_WORKSPACE, EventEnvelope

# A result echoes ids from the command; beyond this length (or with text that is not valid
# Unicode) an id is not echoed, so a hostile command cannot make an unwritable result.
MAX_ECHOED_ID_CHARS = 200
# A command_id longer than this cannot key a result at all (the envelope allows 200): it is
# dead-lettered instead of being answered with a multi-kilobyte key.
MAX_ANSWERABLE_ID_CHARS = 1_000
# Reasons are for people; an exception message or a rule quoting its input is cut here.
MAX_REASON_CHARS = 1_000
# The producer refuses records over 1,000,000 bytes (librdkafka's message.max.bytes) with an
# error that would abort the whole batch and repeat at every retry; leave room for key+headers.
MAX_RECORD_BYTES = 1_000_000 - 16_384

Category = Literal["user", "server"]


@dataclass(frozen=True)
class Undeliverable:
    reason: str


@dataclass(frozen=True)
class Duplicate:
    result: CommandResult


@dataclass(frozen=True)
class Refused:
    result: CommandResult


@dataclass(frozen=True)
class Accepted:
    result: CommandResult
    events: tuple[EventEnvelope, ...]
    spec: AggregateSpec
    state: Any
    # The bytes to write for each event (same order as `events`): encoded, size-checked and
    # decoded back once already, so what the log gets is what a rebuild can read.
    event_bytes: tuple[bytes, ...] = ()


Outcome = Undeliverable | Duplicate | Refused | Accepted


class _Refusal(Exception):
    """A refusal raised from deep inside the decision, caught once in `handle_command`."""

    def __init__(self, reason: str, field: str | None, category: Category = "user") -> None:
        super().__init__(reason)
        self.reason, self.field, self.category = reason, field, category


def handle_command(
    raw: bytes | None,
    *,
    key: bytes | None,
    load_state: Callable[[AggregateSpec, str], Any],
    previous_result: Callable[[str], CommandResult | None],
    now: datetime,
    new_event_id: Callable[[], str],
    max_record_bytes: int = MAX_RECORD_BYTES,
    workspace_exists: Callable[[str], bool] = lambda workspace: workspace == DEFAULT_WORKSPACE,
    aggregate_workspace: Callable[[str], str | None] = lambda aggregate_id: None,
) -> Outcome:
    """Never raises for anything in `raw`: every message gets exactly one of the four outcomes.

    `workspace_exists(w)` says whether workspace w exists; `aggregate_workspace(id)` names the
    workspace an aggregate was created in (None: it has no events yet)."""
    try:
        document = json.loads(raw or b"")
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: [[[[...
        return Undeliverable(f"not valid JSON: {describe_error(exc)}")
    if not isinstance(document, dict):
        return Undeliverable(f"a command is a JSON object, got {type(document).__name__}")
    command_id = document.get("command_id")
    if not isinstance(command_id, str) or not command_id:
        return Undeliverable("no command_id: a command without one cannot be answered")
    if len(command_id) > MAX_ANSWERABLE_ID_CHARS or not _is_unicode(command_id):
        return Undeliverable(
            f"command_id must be at most {MAX_ANSWERABLE_ID_CHARS} characters of valid Unicode "
            "to key a result"
        )
    previous = previous_result(command_id)
    if previous is not None:
        return Duplicate(previous)

    def refuse(reason: str, field: str | None, category: Category) -> Refused:
        return Refused(
            CommandResult(
                command_id=command_id,
                command_type=_echoed(document.get("type")),
                aggregate_id=_echoed(document.get("aggregate_id")),
                correlation_id=_echoed(document.get("correlation_id")),
                status="rejected",
                reason=_clean_text(reason),
                field=_echoed(field),
                category=category,
                workspace_id=_echoed(document.get("workspace_id", DEFAULT_WORKSPACE)),
                processed_at=now,
            )
        )

    try:
        return _decide(
            document,
            command_id,
            key=key,
            load_state=load_state,
            now=now,
            new_event_id=new_event_id,
            max_record_bytes=max_record_bytes,
            workspace_exists=workspace_exists,
            aggregate_workspace=aggregate_workspace,
        )
    except _Refusal as refusal:
        return refuse(refusal.reason, refusal.field, refusal.category)
    except Exception as exc:  # the point: one command must not stop the rest
        return refuse(f"internal error: {describe_error(exc)}", None, "server")


def _decide(
    document: dict[str, Any],
    command_id: str,
    *,
    key: bytes | None,
    load_state: Callable[[AggregateSpec, str], Any],
    now: datetime,
    new_event_id: Callable[[], str],
    max_record_bytes: int,
    workspace_exists: Callable[[str], bool],
    aggregate_workspace: Callable[[str], str | None],
) -> Accepted:
    """Validate, decide, fold and encode one command; a refusal is raised as `_Refusal`."""
    try:
        envelope = CommandEnvelope.model_validate(document)
    except ValidationError as exc:
        raise _Refusal(*first_validation_error(exc, prefix="")) from None
    if key is None or key.decode(errors="replace") != envelope.aggregate_id:
        raise _Refusal("the Kafka message key must equal aggregate_id", "aggregate_id")
    if envelope.type not in COMMAND_TYPES:
        known = ", ".join(sorted(COMMAND_TYPES))
        raise _Refusal(f"unknown command type {envelope.type!r}; known: {known}", "type")
    command_class, spec = COMMAND_TYPES[envelope.type]
    current_version = command_class.model_fields["schema_version"].default
    if envelope.schema_version != current_version:
        raise _Refusal(
            f"{envelope.type} schema_version {envelope.schema_version} is not supported "
            f"(this processor speaks {current_version})",
            "schema_version",
        )
    try:
        command = command_class.model_validate(envelope.payload)
    except ValidationError as exc:
        raise _Refusal(*first_validation_error(exc, prefix="payload.")) from None

    named = getattr(command, "workspace_id", None)
    if named is not None and named != envelope.workspace_id:
        # A payload that names its workspace (secrets) must name the envelope's: the envelope's is
        # the one checked here and the one every read model scopes by.
        raise _Refusal(
            f"payload.workspace_id {named!r} differs from the envelope's workspace_id "
            f"{envelope.workspace_id!r}",
            "payload.workspace_id",
        )
    if spec.tenant_scoped:
        _check_tenancy(envelope, spec, workspace_exists, aggregate_workspace)
    state = load_state(spec, envelope.aggregate_id)
    if type(state) is not type(spec.initial_state(envelope.aggregate_id)):
        # The id is another aggregate type's (a session named like a workspace's key).
        raise _Refusal(
            f"{envelope.aggregate_id} is not a {spec.aggregate_type}; {envelope.type} cannot "
            "apply to it",
            "aggregate_id",
        )
    try:
        domain_events = spec.decide_at(state, command, now)
    except Rejected as rejection:
        raise _Refusal(rejection.reason, rejection.field) from None

    envelopes, encoded = [], []
    for event in domain_events:
        sequence = state.version + 1
        event_envelope = caused_event(
            event, command=envelope, sequence=sequence, occurred_at=now, event_id=new_event_id()
        )
        data = event_envelope.to_bytes()
        if len(data) > max_record_bytes:
            raise _Refusal(
                f"this command's {event_envelope.type} event would be {len(data)} bytes, over "
                f"the {max_record_bytes}-byte record limit; send less per command",
                None,
            )
        # Fold what a rebuild will read back, not the object in hand: a value JSON cannot carry
        # (NaN becomes null) fails here, as a server rejection, instead of poisoning the log.
        state = spec.apply(state, EventEnvelope.from_bytes(data))
        envelopes.append(event_envelope)
        encoded.append(data)
    result = CommandResult(
        command_id=command_id,
        command_type=envelope.type,
        aggregate_id=envelope.aggregate_id,
        correlation_id=envelope.correlation_id or command_id,
        workspace_id=envelope.workspace_id,
        status="accepted",
        events=tuple(
            EventRef(event_id=e.event_id, type=e.type, sequence=e.sequence) for e in envelopes
        ),
        processed_at=now,
    )
    result.to_bytes()  # encodable, or a server rejection now rather than a crash at produce
    return Accepted(
        result=result,
        events=tuple(envelopes),
        spec=spec,
        state=state,
        event_bytes=tuple(encoded),
    )


def _check_tenancy(
    envelope: CommandEnvelope,
    spec: AggregateSpec,
    workspace_exists: Callable[[str], bool],
    aggregate_workspace: Callable[[str], str | None],
) -> None:
    """Refuse a command of a workspace that does not exist, and one that reaches into an
    aggregate of another workspace (answered as if the aggregate did not exist, so its
    existence is not disclosed)."""
    workspace = envelope.workspace_id
    if workspace != DEFAULT_WORKSPACE and not workspace_exists(workspace):
        raise _Refusal(f"workspace {workspace} does not exist", "workspace_id")
    owner = aggregate_workspace(envelope.aggregate_id)
    if owner is not None and owner != workspace:
        raise _Refusal(
            f"{spec.aggregate_type} {envelope.aggregate_id} does not exist", "aggregate_id"
        )


def first_validation_error(exc: ValidationError, *, prefix: str) -> tuple[str, str | None]:
    """The first validation error as (reason naming the field, dotted field path)."""
    error = exc.errors()[0]
    field = prefix + ".".join(str(part) for part in error["loc"]) if error["loc"] else None
    if error["type"] == "extra_forbidden":
        return f"unknown field {field}", field
    return f"{field}: {error['msg']}" if field else error["msg"], field


def _echoed(value: object) -> str | None:
    """`value` if it is an id a result can carry back, else None."""
    if isinstance(value, str) and len(value) <= MAX_ECHOED_ID_CHARS and _is_unicode(value):
        return value
    return None


def _is_unicode(text: str) -> bool:
    """False for text with lone surrogates (JSON's "\\ud800"): it has no UTF-8 encoding."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _clean_text(text: str) -> str:
    """A reason any reader can store and show: cut to length, valid UTF-8, no NUL."""
    if len(text) > MAX_REASON_CHARS:
        text = text[: MAX_REASON_CHARS - 1] + "…"
    return text.encode(errors="replace").decode().replace("\x00", "\\x00")


def describe_error(exc: BaseException) -> str:
    """ "TypeName: message", the message cut to a readable length, valid UTF-8, no NUL."""
    try:
        message = str(exc)
    except Exception:  # a failing __str__ still leaves the name
        message = "<unprintable>"
    return _clean_text(f"{type(exc).__name__}: {message}")
