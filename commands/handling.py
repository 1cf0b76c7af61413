"""Turn one raw command message into an outcome. Pure: no Kafka, no clock, no randomness.

The outcomes, in the order they are checked:
- `Undeliverable`: not even a command (not JSON, no command_id) -> dead-letter topic.
- `Duplicate`: a command_id already processed -> its original result, nothing new.
- `Refused`: a well-formed message that breaks a schema or a rule -> a `rejected` result whose
  reason names the field or rule.
- `Accepted`: the events the aggregate decided, as envelopes with the next sequences, and the
  aggregate's new state.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from commands.envelope import CommandEnvelope, CommandResult, EventRef, caused_event
from commands.loops import Rejected
from commands.registry import COMMAND_TYPES, AggregateSpec
from events.envelope import EventEnvelope


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


Outcome = Undeliverable | Duplicate | Refused | Accepted


def handle_command(
    raw: bytes | None,
    *,
    key: bytes | None,
    load_state: Callable[[AggregateSpec, str], Any],
    previous_result: Callable[[str], CommandResult | None],
    now: datetime,
    new_event_id: Callable[[], str],
) -> Outcome:
    try:
        document = json.loads(raw or b"")
    except (ValueError, UnicodeDecodeError) as exc:
        return Undeliverable(f"not valid JSON: {exc}")
    if not isinstance(document, dict):
        return Undeliverable(f"a command is a JSON object, got {type(document).__name__}")
    command_id = document.get("command_id")
    if not isinstance(command_id, str) or not command_id:
        return Undeliverable("no command_id: a command without one cannot be answered")
    previous = previous_result(command_id)
    if previous is not None:
        return Duplicate(previous)

    def refuse(reason: str, field: str | None) -> Refused:
        return Refused(
            CommandResult(
                command_id=command_id,
                command_type=_str_or_none(document.get("type")),
                aggregate_id=_str_or_none(document.get("aggregate_id")),
                correlation_id=_str_or_none(document.get("correlation_id")),
                status="rejected",
                reason=reason,
                field=field,
                category="user",
                processed_at=now,
            )
        )

    try:
        envelope = CommandEnvelope.model_validate(document)
    except ValidationError as exc:
        return refuse(*first_validation_error(exc, prefix=""))
    if key is None or key.decode(errors="replace") != envelope.aggregate_id:
        return refuse("the Kafka message key must equal aggregate_id", "aggregate_id")
    if envelope.type not in COMMAND_TYPES:
        known = ", ".join(sorted(COMMAND_TYPES))
        return refuse(f"unknown command type {envelope.type!r}; known: {known}", "type")
    command_class, spec = COMMAND_TYPES[envelope.type]
    current_version = command_class.model_fields["schema_version"].default
    if envelope.schema_version != current_version:
        return refuse(
            f"{envelope.type} schema_version {envelope.schema_version} is not supported "
            f"(this processor speaks {current_version})",
            "schema_version",
        )
    try:
        command = command_class.model_validate(envelope.payload)
    except ValidationError as exc:
        return refuse(*first_validation_error(exc, prefix="payload."))

    state = load_state(spec, envelope.aggregate_id)
    try:
        domain_events = spec.decide_at(state, command, now)
    except Rejected as rejection:
        return refuse(rejection.reason, rejection.field)

    envelopes = []
    for event in domain_events:
        sequence = state.version + 1
        event_envelope = caused_event(
            event, command=envelope, sequence=sequence, occurred_at=now, event_id=new_event_id()
        )
        state = spec.advance(state, event, sequence)
        envelopes.append(event_envelope)
    result = CommandResult(
        command_id=command_id,
        command_type=envelope.type,
        aggregate_id=envelope.aggregate_id,
        correlation_id=envelope.correlation_id or command_id,
        status="accepted",
        events=tuple(
            EventRef(event_id=e.event_id, type=e.type, sequence=e.sequence) for e in envelopes
        ),
        processed_at=now,
    )
    return Accepted(result=result, events=tuple(envelopes), spec=spec, state=state)


def first_validation_error(exc: ValidationError, *, prefix: str) -> tuple[str, str | None]:
    """The first validation error as (reason naming the field, dotted field path)."""
    error = exc.errors()[0]
    field = prefix + ".".join(str(part) for part in error["loc"]) if error["loc"] else None
    if error["type"] == "extra_forbidden":
        return f"unknown field {field}", field
    return f"{field}: {error['msg']}" if field else error["msg"], field


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None
