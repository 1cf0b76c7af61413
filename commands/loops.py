"""The Loops session aggregate: commands, state, decide and evolve.

A session holds one base model, its trainer run (with the paired sampler) and the run's
checkpoints. `decide` checks a command against the state and returns the events it causes, or
raises `Rejected` naming the field or rule; `evolve` folds one event into the state. Both are pure:
the clock comes in as an argument, ids come in with the command.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from types import MappingProxyType
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from commands.checkpoint_chains import dependents, needed
from events.limits import (
    MAX_COUNT,
    NonNegativeInt64,
    RequestKey,
    ShortText,
    Text,
    TtlSeconds,
    UserMetadata,
)
from events.loops import (
    CheckpointDeleted,
    CheckpointFile,
    CheckpointKind,
    CheckpointPromoted,
    CheckpointPublished,
    CheckpointSaved,
    CheckpointTtlChanged,
    CheckpointType,
    CheckpointUnpublished,
    DomainEvent,
    RunCreated,
    RunStopped,
    SamplerCreated,
    SamplerStopped,
    SessionCreated,
    SessionEnded,
    WeightsReady,
)

AGGREGATE_TYPE = "session"

RESOURCE_ID = r"^[a-z0-9][a-z0-9-]{0,62}$"
CHECKPOINT_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
CHECKPOINT_URI = re.compile(
    r"^bt://loops:(?P<run_id>[a-z0-9][a-z0-9-]{0,62})/(?P<kind>weights|sampler_weights)/"
    r"(?P<name>[A-Za-z0-9][A-Za-z0-9._-]{0,127})$"
)
MAX_SEQ_LEN_LIMIT = 1_048_576
# How far the janitor's clock may run ahead of the processor's: an expiry this early is still
# due. A later one is refused, so an expiry decided before a TTL change (a race) deletes nothing.
EXPIRY_CLOCK_SKEW = timedelta(seconds=60)


MANIFEST_FILE = "manifest.json"
ENVIRONMENT_NAME = r"^[a-z][a-z0-9-]{0,39}$"
PROMOTABILITY_RULE = (
    "For full-parameter training, only the first checkpoint (saved as base) is promotable; "
    "subsequent delta checkpoints are not. LoRA checkpoints are always promotable (delta chain "
    "is disabled via lora_rank > 0)."
)


def _check_checkpoint_uri(value: str) -> str:
    if not CHECKPOINT_URI.match(value):
        raise ValueError("must look like bt://loops:<run_id>/(weights|sampler_weights)/<name>")
    return value


# A checkpoint URI in a command or request body; one check wherever one is accepted.
CheckpointUri = Annotated[str, AfterValidator(_check_checkpoint_uri)]


def content_digest(files: tuple[CheckpointFile, ...]) -> str:
    """One digest for a checkpoint's content: sha256 over its (path, sha256, size) list.

    The same canonical form as the folder's manifest digest (gpu_workers/manifest.py), so the
    session, the trainer and the sampler name one weights version with one string. The manifest
    file itself is left out: it describes the content, it is not part of it.
    """
    entries = sorted(
        [f.relative_file_name, f.sha256, f.size_bytes]
        for f in files
        if f.relative_file_name != MANIFEST_FILE
    )
    canonical = json.dumps(entries, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def checkpoint_uri(run_id: str, kind: CheckpointKind, name: str) -> str:
    """`bt://loops:<run_id>/(weights|sampler_weights)/<name>`, the platform's URI scheme."""
    return f"bt://loops:{run_id}/{kind}/{name}"


class Rejected(Exception):
    """A command that breaks a rule. Becomes a `rejected` CommandResult, never a crash."""

    def __init__(self, reason: str, *, field: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.field = field


# --- commands --------------------------------------------------------------------------------


class Command(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)
    schema_version: int = 1  # overridden per class when a payload schema changes


class CreateSession(Command):
    base_model: RequestKey
    project: ShortText | None = None
    name: ShortText | None = None


class EndSession(Command):
    reason: Text = "ended by user"


class CreateRun(Command):
    """Provision a trainer server ("run") and its paired sampler in one step."""

    run_id: str = Field(pattern=RESOURCE_ID)
    sampler_id: str = Field(pattern=RESOURCE_ID)
    max_seq_len: int = Field(ge=1, le=MAX_SEQ_LEN_LIMIT)
    lora_rank: int = Field(default=0, ge=0, le=1024, description="0 = full-parameter training")
    from_checkpoint: CheckpointUri | None = Field(default=None, description="bt://loops:... URI")
    keep_last_checkpoints: int | None = Field(
        default=None,
        ge=1,
        le=MAX_COUNT,
        description="per kind, older checkpoints are deleted (retention)",
    )
    user_metadata: UserMetadata | None = None


class HotloadOptions(BaseModel):
    """What a sampler does around a weight sync (the weight syncer's constructor options)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    warmup: bool = Field(default=False, description="send a warmup request after the swap")
    warmup_max_retries: int = Field(default=10, ge=0, le=100)
    reset_prompt_cache: bool = Field(
        default=True, description="drop prompt caches computed with the old weights"
    )


class RecordCheckpoint(Command):
    """A trainer finished writing a checkpoint folder to the store; make it part of the record."""

    run_id: str = Field(pattern=RESOURCE_ID)
    checkpoint_id: str = Field(pattern=RESOURCE_ID)
    name: str = Field(pattern=CHECKPOINT_NAME)
    kind: CheckpointKind
    files: tuple[CheckpointFile, ...] = Field(min_length=1)
    step: NonNegativeInt64 | None = None
    ttl_seconds: TtlSeconds | None = None
    checkpoint_type: CheckpointType | None = None  # sampler weights: base or delta
    chain_position: NonNegativeInt64 | None = None
    # Sampler weights: sync them to the run's sampler now (None: save only, `HotloadWeights` later).
    hotload: HotloadOptions | None = Field(default_factory=HotloadOptions)
    user_metadata: UserMetadata | None = None  # the user's labels on the checkpoint


class HotloadWeights(Command):
    """Sync a saved sampler snapshot to the run's sampler (the weight syncer's `hotload`)."""

    run_id: str = Field(pattern=RESOURCE_ID)
    name: str = Field(pattern=CHECKPOINT_NAME, description="the snapshot's checkpoint name")
    # When given, must match how the snapshot was saved: a caller that thinks it sends a base
    # but names a delta would otherwise load a chain it did not mean to.
    checkpoint_type: CheckpointType | None = None
    options: HotloadOptions = Field(default_factory=HotloadOptions)


class PromoteCheckpoint(Command):
    """Promote a sampler checkpoint to an environment: it becomes a deployable, kept artifact."""

    checkpoint_id: str = Field(pattern=RESOURCE_ID)
    environment: str = Field(default="production", pattern=ENVIRONMENT_NAME)


class DeleteCheckpoint(Command):
    checkpoint_id: str = Field(pattern=RESOURCE_ID)
    reason: Literal["deleted", "expired", "retention"] = "deleted"


class SetCheckpointTtl(Command):
    """Set a checkpoint's expiry anew, counted from now; None: it never expires."""

    checkpoint_id: str = Field(pattern=RESOURCE_ID)
    ttl_seconds: TtlSeconds | None = Field(description="seconds from now; null: never expires")


class PublishCheckpoint(Command):
    """Make a checkpoint public: any workspace may start a run from its path."""

    checkpoint_id: str = Field(pattern=RESOURCE_ID)


class UnpublishCheckpoint(Command):
    """Make a published checkpoint private again."""

    checkpoint_id: str = Field(pattern=RESOURCE_ID)


COMMANDS: tuple[type[Command], ...] = (
    CreateSession,
    EndSession,
    CreateRun,
    RecordCheckpoint,
    HotloadWeights,
    PromoteCheckpoint,
    DeleteCheckpoint,
    SetCheckpointTtl,
    PublishCheckpoint,
    UnpublishCheckpoint,
)

# What a user may still do to the checkpoints of an ended session: clean up, keep them longer,
# share them. (Tinker sessions end when their client goes away; their checkpoints stay.)
AFTER_END = (DeleteCheckpoint, SetCheckpointTtl, PublishCheckpoint, UnpublishCheckpoint)


# --- state -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunState:
    run_id: str
    sampler_id: str
    max_seq_len: int
    lora_rank: int
    from_checkpoint: str | None
    keep_last_checkpoints: int | None = None
    active: bool = True
    weights_version: int = 0  # syncs sent to the run's sampler so far
    # The checkpoint of the newest sync: what the sampler serves, or is about to (retention and
    # expiry keep it and its chain while the run is active).
    synced_checkpoint_id: str | None = None


@dataclass(frozen=True)
class CheckpointState:
    checkpoint_id: str
    run_id: str
    name: str
    kind: CheckpointKind
    uri: str
    step: int | None
    expires_at: datetime | None
    deleted: bool = False
    checkpoint_type: CheckpointType | None = None
    chain_position: int | None = None
    content_digest: str = ""
    promoted_to: frozenset[str] = frozenset()  # environments
    public: bool = False  # published: any workspace may start a run from it


def _frozen_map() -> MappingProxyType:
    return MappingProxyType({})


@dataclass(frozen=True)
class SessionState:
    session_id: str
    status: Literal["absent", "active", "ended"] = "absent"
    base_model: str = ""
    project: str | None = None
    name: str | None = None
    version: int = 0  # sequence of the last event applied
    runs: MappingProxyType = field(default_factory=_frozen_map)  # run_id -> RunState
    checkpoints: MappingProxyType = field(default_factory=_frozen_map)  # id -> CheckpointState

    def active_run(self) -> RunState | None:
        return next((run for run in self.runs.values() if run.active), None)

    def live_checkpoint(self, run_id: str, kind: str, name: str) -> CheckpointState | None:
        return next(
            (
                c
                for c in self.checkpoints.values()
                if not c.deleted and (c.run_id, c.kind, c.name) == (run_id, kind, name)
            ),
            None,
        )


def initial_state(aggregate_id: str) -> SessionState:
    return SessionState(session_id=aggregate_id)


class NotPromotableError(ValueError):
    """A checkpoint that cannot stand alone as a deployable model was asked to be promoted."""


def check_promotable(*, checkpoint_type: CheckpointType, position: int, lora_rank: int) -> None:
    """Raise NotPromotableError, quoting the seed's rule, unless the checkpoint may be promoted."""
    if lora_rank > 0:
        return
    if checkpoint_type == "base" and position == 0:
        return
    raise NotPromotableError(
        f"checkpoint is a {checkpoint_type} at chain position {position}: {PROMOTABILITY_RULE}"
    )


# --- decide ----------------------------------------------------------------------------------


def decide(state: SessionState, command: Command, *, now: datetime) -> list[DomainEvent]:
    """The events `command` causes in `state`, or `Rejected`."""
    if isinstance(command, CreateSession):
        if state.status != "absent":
            raise Rejected(f"session {state.session_id} already exists", field="aggregate_id")
        return [
            SessionCreated(
                session_id=state.session_id,
                base_model=command.base_model,
                project=command.project,
                name=command.name,
            )
        ]
    if state.status == "absent":
        raise Rejected(f"session {state.session_id} does not exist", field="aggregate_id")
    # Cleaning up stays possible after the end: expiry and users may still delete checkpoints.
    if state.status == "ended" and not isinstance(command, AFTER_END):
        raise Rejected(f"session {state.session_id} has ended", field="aggregate_id")
    return _decide_in_active_session(command, state, now)


# Dispatches on the command's type (singledispatch looks at the first argument).
@functools.singledispatch
def _decide_in_active_session(
    command: Command, state: SessionState, now: datetime
) -> list[DomainEvent]:
    raise Rejected(f"{type(command).__name__} is not a session command", field="type")


@_decide_in_active_session.register
def _(command: CreateSession, state: SessionState, now: datetime) -> list[DomainEvent]:
    raise Rejected(f"session {state.session_id} already exists", field="aggregate_id")


@_decide_in_active_session.register
def _(command: EndSession, state: SessionState, now: datetime) -> list[DomainEvent]:
    events: list[DomainEvent] = []
    for run in state.runs.values():
        if run.active:
            reason = f"session ended: {command.reason}"
            events.append(RunStopped(run_id=run.run_id, session_id=state.session_id, reason=reason))
            events.append(
                SamplerStopped(
                    sampler_id=run.sampler_id,
                    run_id=run.run_id,
                    session_id=state.session_id,
                    reason=reason,
                )
            )
    events.append(SessionEnded(session_id=state.session_id, reason=command.reason))
    return events


@_decide_in_active_session.register
def _(command: CreateRun, state: SessionState, now: datetime) -> list[DomainEvent]:
    active = state.active_run()
    if active is not None:
        # The platform runs one trainer per session per base model.
        raise Rejected(
            f"session {state.session_id} already has an active run {active.run_id}",
            field="run_id",
        )
    if command.run_id in state.runs:
        raise Rejected(f"run {command.run_id} already exists", field="run_id")
    if command.sampler_id in {run.sampler_id for run in state.runs.values()}:
        raise Rejected(f"sampler {command.sampler_id} already exists", field="sampler_id")
    if command.from_checkpoint is not None:
        match = CHECKPOINT_URI.match(command.from_checkpoint)
        assert match is not None  # validated by the command model
        # A checkpoint of this session must exist; others are checked by the trainer on load.
        if match["run_id"] in state.runs and (
            state.live_checkpoint(match["run_id"], match["kind"], match["name"]) is None
        ):
            raise Rejected(
                f"checkpoint {command.from_checkpoint} does not exist", field="from_checkpoint"
            )
    return [
        RunCreated(
            run_id=command.run_id,
            session_id=state.session_id,
            sampler_id=command.sampler_id,
            base_model=state.base_model,
            max_seq_len=command.max_seq_len,
            lora_rank=command.lora_rank,
            from_checkpoint=command.from_checkpoint,
            keep_last_checkpoints=command.keep_last_checkpoints,
            user_metadata=command.user_metadata,
        ),
        SamplerCreated(
            sampler_id=command.sampler_id,
            run_id=command.run_id,
            session_id=state.session_id,
            base_model=state.base_model,
        ),
    ]


def _active_run(state: SessionState, run_id: str) -> RunState:
    run = state.runs.get(run_id)
    if run is None:
        raise Rejected(f"run {run_id} does not exist in session {state.session_id}", field="run_id")
    if not run.active:
        raise Rejected(f"run {run_id} is stopped", field="run_id")
    return run


@_decide_in_active_session.register
def _(command: RecordCheckpoint, state: SessionState, now: datetime) -> list[DomainEvent]:
    run = _active_run(state, command.run_id)
    if command.checkpoint_id in state.checkpoints:
        raise Rejected(f"checkpoint {command.checkpoint_id} already exists", field="checkpoint_id")
    if state.live_checkpoint(command.run_id, command.kind, command.name) is not None:
        raise Rejected(
            f"a {command.kind} checkpoint named {command.name!r} already exists for run "
            f"{command.run_id}",
            field="name",
        )
    names = [f.relative_file_name for f in command.files]
    if len(set(names)) != len(names):
        raise Rejected("files lists the same relative_file_name twice", field="files")
    if any(name.startswith("/") or ".." in name.split("/") for name in names):
        raise Rejected("relative_file_name must stay inside the checkpoint folder", field="files")
    expires_at = now + timedelta(seconds=command.ttl_seconds) if command.ttl_seconds else None
    uri = checkpoint_uri(command.run_id, command.kind, command.name)
    saved: list[DomainEvent] = [
        CheckpointSaved(
            checkpoint_id=command.checkpoint_id,
            run_id=command.run_id,
            session_id=state.session_id,
            name=command.name,
            kind=command.kind,
            uri=uri,
            files=command.files,
            total_size_bytes=sum(f.size_bytes for f in command.files),
            step=command.step,
            expires_at=expires_at,
            checkpoint_type=command.checkpoint_type,
            chain_position=command.chain_position,
            user_metadata=command.user_metadata,
        )
    ]
    synced: list[DomainEvent] = []
    if command.kind == "sampler_weights" and command.hotload is not None:
        synced.append(
            _weights_ready(
                state,
                run,
                checkpoint_id=command.checkpoint_id,
                uri=uri,
                digest=content_digest(command.files),
                checkpoint_type=command.checkpoint_type,
                options=command.hotload,
            )
        )
    # Retention looks at the state after this save and its sync: the new checkpoint counts, its
    # chain is needed, and a new base frees the old chain once the sampler moves to it.
    after = functools.reduce(evolve, [*saved, *synced], state)
    return [*saved, *_retention(after, command.kind, saving=command.checkpoint_id), *synced]


def _weights_ready(
    state: SessionState,
    run: RunState,
    *,
    checkpoint_id: str,
    uri: str,
    digest: str,
    checkpoint_type: CheckpointType | None,
    options: HotloadOptions,
) -> WeightsReady:
    return WeightsReady(
        sampler_id=run.sampler_id,
        run_id=run.run_id,
        session_id=state.session_id,
        checkpoint_id=checkpoint_id,
        uri=uri,
        content_digest=digest,
        weights_version=run.weights_version + 1,
        checkpoint_type=checkpoint_type,
        warmup=options.warmup,
        warmup_max_retries=options.warmup_max_retries,
        reset_prompt_cache=options.reset_prompt_cache,
    )


@_decide_in_active_session.register
def _(command: HotloadWeights, state: SessionState, now: datetime) -> list[DomainEvent]:
    run = _active_run(state, command.run_id)
    checkpoint = state.live_checkpoint(command.run_id, "sampler_weights", command.name)
    if checkpoint is None:
        raise Rejected(
            f"run {command.run_id} has no sampler_weights snapshot named {command.name!r}",
            field="name",
        )
    saved_as = checkpoint.checkpoint_type or "base"
    if command.checkpoint_type is not None and command.checkpoint_type != saved_as:
        raise Rejected(
            f"snapshot {command.name!r} was saved as a {saved_as}, not a {command.checkpoint_type}",
            field="checkpoint_type",
        )
    return [
        _weights_ready(
            state,
            run,
            checkpoint_id=checkpoint.checkpoint_id,
            uri=checkpoint.uri,
            digest=checkpoint.content_digest,
            checkpoint_type=saved_as,
            options=command.options,
        )
    ]


@_decide_in_active_session.register
def _(command: PromoteCheckpoint, state: SessionState, now: datetime) -> list[DomainEvent]:
    checkpoint = state.checkpoints.get(command.checkpoint_id)
    if checkpoint is None or checkpoint.deleted:
        state_word = "is deleted" if checkpoint is not None else "does not exist"
        raise Rejected(f"checkpoint {command.checkpoint_id} {state_word}", field="checkpoint_id")
    if checkpoint.kind != "sampler_weights":
        raise Rejected(
            f"checkpoint {command.checkpoint_id} is a {checkpoint.kind} (training state) "
            "checkpoint; promote sampler_weights, the servable model",
            field="checkpoint_id",
        )
    if command.environment in checkpoint.promoted_to:
        raise Rejected(
            f"checkpoint {command.checkpoint_id} is already promoted to {command.environment}",
            field="environment",
        )
    try:
        check_promotable(
            checkpoint_type=checkpoint.checkpoint_type or "base",
            position=checkpoint.chain_position or 0,
            lora_rank=state.runs[checkpoint.run_id].lora_rank,
        )
    except NotPromotableError as exc:
        raise Rejected(str(exc), field="checkpoint_id") from exc
    return [
        CheckpointPromoted(
            checkpoint_id=checkpoint.checkpoint_id,
            run_id=checkpoint.run_id,
            session_id=state.session_id,
            uri=checkpoint.uri,
            environment=command.environment,
        )
    ]


def _served(state: SessionState) -> set[str]:
    """Checkpoints the samplers of active runs serve (or are about to): each run's newest sync,
    or, before any sync, the sampler checkpoint the run started from."""
    served = set()
    for run in state.runs.values():
        if not run.active:
            continue
        if run.synced_checkpoint_id is not None:
            served.add(run.synced_checkpoint_id)
        elif run.from_checkpoint is not None and "/sampler_weights/" in run.from_checkpoint:
            served.update(
                c.checkpoint_id
                for c in state.checkpoints.values()
                if c.uri == run.from_checkpoint and not c.deleted
            )
    return served


def _still_needed(state: SessionState, checkpoint: CheckpointState) -> str | None:
    """Why expiry or retention must leave `checkpoint`, or None. A sampler serving it, or a
    live delta whose chain goes through it, would fail to (re)load without it."""
    if checkpoint.checkpoint_id in _served(state):
        return f"the sampler of run {checkpoint.run_id} serves it (its newest weight sync)"
    later = dependents(state.checkpoints.values(), checkpoint.checkpoint_id)
    if later:
        return f"it is a link of the delta chain of live checkpoint(s) {_some(later)}"
    return None


def _some(ids: list[str], shown: int = 5) -> str:
    more = f" and {len(ids) - shown} more" if len(ids) > shown else ""
    return ", ".join(ids[:shown]) + more


def _retention(state: SessionState, kind: str, *, saving: str) -> list[DomainEvent]:
    """Deletions that keep the run's newest `keep_last_checkpoints` of this kind, counting the
    one being saved now (`state` already holds it). Oldest first, skipping what a chain still
    needs (see `_still_needed`): a skipped link goes later, once its dependents are gone or a
    new base took over, so a run on one long delta chain may keep more than it asked for."""
    run = state.runs[state.checkpoints[saving].run_id]
    if run.keep_last_checkpoints is None:
        return []
    live = [
        c
        for c in state.checkpoints.values()
        if not c.deleted and c.run_id == run.run_id and c.kind == kind and not c.promoted_to
    ]
    served = _served(state)
    doomed: list[CheckpointState] = []
    for _ in range(len(live) - run.keep_last_checkpoints):
        # Deleting the tail of a chain can free its parent: look again after each choice.
        kept = needed(
            state.checkpoints.values(), keep=served, gone={c.checkpoint_id for c in doomed}
        )
        victim = next(
            (
                c
                for c in live
                if c.checkpoint_id != saving and c not in doomed and c.checkpoint_id not in kept
            ),
            None,
        )
        if victim is None:
            break
        doomed.append(victim)
    return [
        CheckpointDeleted(
            checkpoint_id=c.checkpoint_id,
            run_id=c.run_id,
            session_id=state.session_id,
            uri=c.uri,
            reason="retention",
        )
        for c in doomed
    ]


@_decide_in_active_session.register
def _(command: DeleteCheckpoint, state: SessionState, now: datetime) -> list[DomainEvent]:
    checkpoint = state.checkpoints.get(command.checkpoint_id)
    if checkpoint is None:
        raise Rejected(f"checkpoint {command.checkpoint_id} does not exist", field="checkpoint_id")
    if checkpoint.deleted:
        raise Rejected(
            f"checkpoint {command.checkpoint_id} is already deleted", field="checkpoint_id"
        )
    if checkpoint.promoted_to and command.reason != "deleted":
        # Expiry and retention never take an environment's weights; a user still may.
        raise Rejected(
            f"checkpoint {command.checkpoint_id} is promoted to "
            f"{', '.join(sorted(checkpoint.promoted_to))}: kept until deleted by a user",
            field="checkpoint_id",
        )
    if command.reason == "expired" and (
        checkpoint.expires_at is None or checkpoint.expires_at > now + EXPIRY_CLOCK_SKEW
    ):
        # The TTL changed after the janitor decided: the expiry it sent is no longer due.
        due = (
            "never expires"
            if checkpoint.expires_at is None
            else (f"expires at {checkpoint.expires_at.isoformat()}")
        )
        raise Rejected(
            f"checkpoint {command.checkpoint_id} is not expired: it {due}", field="checkpoint_id"
        )
    if command.reason != "deleted":
        why = _still_needed(state, checkpoint)
        if why is not None:
            # The janitor tries again when the chain changes (a new base, a deletion, a stop).
            raise Rejected(
                f"checkpoint {command.checkpoint_id} is not {command.reason}: {why}",
                field="checkpoint_id",
            )
    else:
        later = dependents(state.checkpoints.values(), checkpoint.checkpoint_id)
        if later:
            # Deleting a link would silently break every later delta; the user deletes those
            # first (newest first), or keeps the chain. What a sampler serves now stays in its
            # memory, so a user may still delete a chain's head.
            raise Rejected(
                f"checkpoint {command.checkpoint_id} is a link of the delta chain of live "
                f"checkpoint(s) {_some(later)}: delete those first",
                field="checkpoint_id",
            )
    return [
        CheckpointDeleted(
            checkpoint_id=checkpoint.checkpoint_id,
            run_id=checkpoint.run_id,
            session_id=state.session_id,
            uri=checkpoint.uri,
            reason=command.reason,
        )
    ]


def _live_checkpoint(state: SessionState, checkpoint_id: str) -> CheckpointState:
    checkpoint = state.checkpoints.get(checkpoint_id)
    if checkpoint is None or checkpoint.deleted:
        state_word = "is deleted" if checkpoint is not None else "does not exist"
        raise Rejected(f"checkpoint {checkpoint_id} {state_word}", field="checkpoint_id")
    return checkpoint


@_decide_in_active_session.register
def _(command: SetCheckpointTtl, state: SessionState, now: datetime) -> list[DomainEvent]:
    checkpoint = _live_checkpoint(state, command.checkpoint_id)
    if checkpoint.promoted_to and command.ttl_seconds is not None:
        raise Rejected(
            f"checkpoint {command.checkpoint_id} is promoted to "
            f"{', '.join(sorted(checkpoint.promoted_to))}: it never expires",
            field="ttl_seconds",
        )
    ttl = command.ttl_seconds
    return [
        CheckpointTtlChanged(
            checkpoint_id=checkpoint.checkpoint_id,
            run_id=checkpoint.run_id,
            session_id=state.session_id,
            uri=checkpoint.uri,
            ttl_seconds=ttl,
            expires_at=now + timedelta(seconds=ttl) if ttl is not None else None,
        )
    ]


@_decide_in_active_session.register
def _(command: PublishCheckpoint, state: SessionState, now: datetime) -> list[DomainEvent]:
    checkpoint = _live_checkpoint(state, command.checkpoint_id)
    if checkpoint.public:
        raise Rejected(f"checkpoint {command.checkpoint_id} is already public", field="public")
    return [
        CheckpointPublished(
            checkpoint_id=checkpoint.checkpoint_id,
            run_id=checkpoint.run_id,
            session_id=state.session_id,
            uri=checkpoint.uri,
        )
    ]


@_decide_in_active_session.register
def _(command: UnpublishCheckpoint, state: SessionState, now: datetime) -> list[DomainEvent]:
    checkpoint = _live_checkpoint(state, command.checkpoint_id)
    if not checkpoint.public:
        raise Rejected(f"checkpoint {command.checkpoint_id} is not public", field="public")
    return [
        CheckpointUnpublished(
            checkpoint_id=checkpoint.checkpoint_id,
            run_id=checkpoint.run_id,
            session_id=state.session_id,
            uri=checkpoint.uri,
        )
    ]


# --- evolve ----------------------------------------------------------------------------------


def evolve(state: SessionState, event: DomainEvent) -> SessionState:
    """Fold one event into the state. The caller advances `version` (see `apply`)."""
    return _evolve(event, state)


@functools.singledispatch
def _evolve(event: DomainEvent, state: SessionState) -> SessionState:
    raise TypeError(f"session cannot apply {type(event).__name__}")


@_evolve.register
def _(event: SessionCreated, state: SessionState) -> SessionState:
    return replace(
        state, status="active", base_model=event.base_model, project=event.project, name=event.name
    )


@_evolve.register
def _(event: SessionEnded, state: SessionState) -> SessionState:
    return replace(state, status="ended")


@_evolve.register
def _(event: RunCreated, state: SessionState) -> SessionState:
    run = RunState(
        run_id=event.run_id,
        sampler_id=event.sampler_id,
        max_seq_len=event.max_seq_len,
        lora_rank=event.lora_rank,
        from_checkpoint=event.from_checkpoint,
        keep_last_checkpoints=event.keep_last_checkpoints,
    )
    return replace(state, runs=MappingProxyType({**state.runs, run.run_id: run}))


@_evolve.register
def _(event: SamplerCreated, state: SessionState) -> SessionState:
    return state  # the sampler lives on the run (RunState.sampler_id)


@_evolve.register
def _(event: RunStopped, state: SessionState) -> SessionState:
    run = replace(state.runs[event.run_id], active=False)
    return replace(state, runs=MappingProxyType({**state.runs, run.run_id: run}))


@_evolve.register
def _(event: SamplerStopped, state: SessionState) -> SessionState:
    return state  # stops with its run


@_evolve.register
def _(event: CheckpointSaved, state: SessionState) -> SessionState:
    checkpoint = CheckpointState(
        checkpoint_id=event.checkpoint_id,
        run_id=event.run_id,
        name=event.name,
        kind=event.kind,
        uri=event.uri,
        step=event.step,
        expires_at=event.expires_at,
        checkpoint_type=event.checkpoint_type,
        chain_position=event.chain_position,
        content_digest=content_digest(event.files),
    )
    return replace(
        state,
        checkpoints=MappingProxyType({**state.checkpoints, checkpoint.checkpoint_id: checkpoint}),
    )


@_evolve.register
def _(event: WeightsReady, state: SessionState) -> SessionState:
    run = state.runs[event.run_id]
    run = replace(
        run,
        weights_version=max(event.weights_version, run.weights_version + 1),
        synced_checkpoint_id=event.checkpoint_id,
    )
    return replace(state, runs=MappingProxyType({**state.runs, run.run_id: run}))


@_evolve.register
def _(event: CheckpointPromoted, state: SessionState) -> SessionState:
    checkpoint = state.checkpoints[event.checkpoint_id]
    checkpoint = replace(
        checkpoint,
        promoted_to=checkpoint.promoted_to | {event.environment},
        expires_at=None,
    )
    return replace(
        state,
        checkpoints=MappingProxyType({**state.checkpoints, checkpoint.checkpoint_id: checkpoint}),
    )


@_evolve.register
def _(event: CheckpointDeleted, state: SessionState) -> SessionState:
    checkpoint = replace(state.checkpoints[event.checkpoint_id], deleted=True)
    return replace(
        state,
        checkpoints=MappingProxyType({**state.checkpoints, checkpoint.checkpoint_id: checkpoint}),
    )


def _with_checkpoint(state: SessionState, checkpoint: CheckpointState) -> SessionState:
    return replace(
        state,
        checkpoints=MappingProxyType({**state.checkpoints, checkpoint.checkpoint_id: checkpoint}),
    )


@_evolve.register
def _(event: CheckpointTtlChanged, state: SessionState) -> SessionState:
    checkpoint = replace(state.checkpoints[event.checkpoint_id], expires_at=event.expires_at)
    return _with_checkpoint(state, checkpoint)


@_evolve.register
def _(event: CheckpointPublished, state: SessionState) -> SessionState:
    return _with_checkpoint(state, replace(state.checkpoints[event.checkpoint_id], public=True))


@_evolve.register
def _(event: CheckpointUnpublished, state: SessionState) -> SessionState:
    return _with_checkpoint(state, replace(state.checkpoints[event.checkpoint_id], public=False))
