"""Events of the Loops bounded context: sessions, runs (trainers), samplers, checkpoints.

A Loops session is the consistency boundary (aggregate type `session`): its runs, samplers and
checkpoints are entities inside it, so every rule that spans them (a run needs a live session, a
checkpoint needs a live run, checkpoint names are unique per run and kind) is checked in one
place, in order, without a distributed lock. Events are past tense, frozen, versioned.
"""

from __future__ import annotations

from datetime import datetime
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

CheckpointKind = Literal["weights", "sampler_weights"]
CheckpointType = Literal["base", "delta"]


class DomainEvent(BaseModel):
    """Base of every event payload. `schema_version` is the version this class writes."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    aggregate_type: ClassVar[str] = "session"
    schema_version: ClassVar[int] = 1


class SessionCreated(DomainEvent):
    session_id: str
    base_model: str
    project: str | None = None
    name: str | None = None


class SessionEnded(DomainEvent):
    session_id: str
    reason: str


class RunCreated(DomainEvent):
    """A trainer server ("run") was provisioned; its sampler comes in the same transaction."""

    run_id: str
    session_id: str
    sampler_id: str
    base_model: str
    max_seq_len: int
    lora_rank: int = Field(description="0 means full-parameter training")
    from_checkpoint: str | None = None
    keep_last_checkpoints: int | None = None
    user_metadata: dict[str, str] | None = Field(
        default=None, description="the user's labels on the run (Tinker's user_metadata)"
    )


class SamplerCreated(DomainEvent):
    sampler_id: str
    run_id: str
    session_id: str
    base_model: str


class RunStopped(DomainEvent):
    run_id: str
    session_id: str
    reason: str


class SamplerStopped(DomainEvent):
    sampler_id: str
    run_id: str
    session_id: str
    reason: str


class CheckpointFile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    relative_file_name: str
    size_bytes: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class CheckpointSaved(DomainEvent):
    checkpoint_id: str
    run_id: str
    session_id: str
    name: str
    kind: CheckpointKind
    uri: str = Field(description="bt://loops:<run_id>/(weights|sampler_weights)/<name>")
    files: tuple[CheckpointFile, ...]
    total_size_bytes: int
    step: int | None = None
    expires_at: datetime | None = None
    # Sampler weights: a full `base` or a `delta` against its parent, and its place in the chain.
    checkpoint_type: CheckpointType | None = None
    chain_position: int | None = None
    user_metadata: dict[str, str] | None = Field(
        default=None, description="the user's labels on the checkpoint (Tinker's user_metadata)"
    )


class WeightsReady(DomainEvent):
    """A weight sync: the run's sampler should load these weights (a save with hotload on, or a
    `HotloadWeights` of a saved snapshot). `weights_version` numbers the syncs of one sampler
    1, 2, 3...: every sample names the version that produced it, and a request may ask for a
    version >= N."""

    sampler_id: str
    run_id: str
    session_id: str
    checkpoint_id: str
    uri: str
    content_digest: str
    weights_version: int = 0  # 0: written before syncs were numbered
    checkpoint_type: CheckpointType | None = None
    # What the sampler does after the swap (the weight syncer's options).
    warmup: bool = False
    warmup_max_retries: int = 10
    reset_prompt_cache: bool = True


class CheckpointPromoted(DomainEvent):
    """A checkpoint was promoted to an environment: it is kept (no expiry, no retention) as the
    weights that environment serves. Only promotable checkpoints get here (a base, or LoRA)."""

    checkpoint_id: str
    run_id: str
    session_id: str
    uri: str
    environment: str


class CheckpointTtlChanged(DomainEvent):
    """A checkpoint's expiry was set anew: `ttl_seconds` from the change (None: it never
    expires). The janitor expires it at the new `expires_at`, not the one of its save."""

    checkpoint_id: str
    run_id: str
    session_id: str
    uri: str
    ttl_seconds: int | None
    expires_at: datetime | None


class CheckpointPublished(DomainEvent):
    """The checkpoint is public: any workspace may start a training run from its path (it is
    still listed, changed and deleted by its own workspace alone)."""

    checkpoint_id: str
    run_id: str
    session_id: str
    uri: str


class CheckpointUnpublished(DomainEvent):
    """The checkpoint is private again: only its workspace may use it."""

    checkpoint_id: str
    run_id: str
    session_id: str
    uri: str


class CheckpointDeleted(DomainEvent):
    checkpoint_id: str
    run_id: str
    session_id: str
    uri: str
    reason: Literal["deleted", "expired", "retention"]


LOOPS_EVENTS: tuple[type[DomainEvent], ...] = (
    SessionCreated,
    SessionEnded,
    RunCreated,
    SamplerCreated,
    RunStopped,
    SamplerStopped,
    CheckpointSaved,
    WeightsReady,
    CheckpointDeleted,
    CheckpointPromoted,
    CheckpointTtlChanged,
    CheckpointPublished,
    CheckpointUnpublished,
)
