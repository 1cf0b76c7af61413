"""Events the GPU workers write about the work they did.

Each trainer run and each sampler is an aggregate of its own (`trainer`, `sampler`) whose only
writer is the worker process serving it, so their sequences stay gap-free without going through
the command processor. Checkpoints themselves are recorded on the session (`CheckpointSaved`,
`WeightsReady` in events/loops.py), where the naming and lifecycle rules live.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from events.loops import DomainEvent


class TrainerEvent(DomainEvent):
    aggregate_type: ClassVar[str] = "trainer"
    request_id: str


class ForwardBackwardCompleted(TrainerEvent):
    loss_fn: str
    loss: float
    num_sequences: int
    num_tokens: int
    metrics: dict[str, float] = Field(default_factory=dict)


class ForwardCompleted(TrainerEvent):
    """A forward pass only (evaluation): the loss of a batch, gradients untouched."""

    loss_fn: str
    loss: float
    num_sequences: int
    num_tokens: int
    metrics: dict[str, float] = Field(default_factory=dict)


class StateLoaded(TrainerEvent):
    """The run now holds a `weights` checkpoint's weights (and its optimizer state, if asked)."""

    uri: str
    with_optimizer: bool
    step: int


class OptimStepCompleted(TrainerEvent):
    step: int
    learning_rate: float
    grad_norm: float | None = None


class LogprobsComputed(TrainerEvent):
    num_sequences: int
    num_tokens: int


class WeightsSaved(TrainerEvent):
    checkpoint_id: str
    name: str
    kind: str
    uri: str
    content_digest: str
    total_size_bytes: int
    step: int
    # Sampler weights only: a full `base`, or a `delta` against the chain head (parent_digest).
    checkpoint_type: str | None = None
    chain_position: int | None = None
    parent_digest: str | None = None


class TrainerReleased(DomainEvent):
    """A worker dropped a run's engine (weights, optimizer state, gradients) because the run
    stopped (its session ended, by a user, by Tinker's finish or a missed heartbeat). Work for
    the run is refused from then on; a worker's memory holds live runs only."""

    aggregate_type: ClassVar[str] = "trainer"
    run_id: str
    reason: str
    engines_held: int  # run engines the worker still holds after this release


class SamplerEvent(DomainEvent):
    aggregate_type: ClassVar[str] = "sampler"


class SamplerReady(SamplerEvent):
    """A worker hosts the sampler: its engine is up and weight syncs reach it from now on."""

    base_model: str
    content_digest: str  # the base model's weights, served until the first hotload
    load_ms: float


class WeightsLoaded(SamplerEvent):
    """A sampler swapped in new weights, between requests, without restarting."""

    checkpoint_id: str | None  # None: the base model (or the run's start checkpoint)
    uri: str | None
    content_digest: str
    load_ms: float
    weights_version: int | None = None  # the sync (WeightsReady); None: a pinned checkpoint


class HotloadStarted(SamplerEvent):
    """A sampler began fetching new weights; it keeps serving its current ones meanwhile."""

    checkpoint_id: str | None
    uri: str
    from_digest: str  # the weights version served now (a delta chain continues from it)
    weights_version: int | None = None


class HotloadSucceeded(SamplerEvent):
    """The new weights are verified and swapped in, between requests."""

    checkpoint_id: str | None
    uri: str
    checkpoint_type: str  # base | delta (of the target checkpoint)
    content_digest: str
    folders_applied: int  # 1 for a base or one delta; more when a chain was caught up
    bytes_moved: int  # bytes fetched from the store
    fetch_ms: float  # download + sha256 of every file
    apply_ms: float  # decode, digest check, swap
    total_ms: float
    weights_version: int | None = None
    prompt_cache_entries_dropped: int | None = None  # None: the cache was kept (not asked)
    warmup_attempts: int = 0  # 0: no warmup asked
    warmup_ms: float | None = None


class HotloadFailed(SamplerEvent):
    """New weights were refused; the sampler keeps serving the version it had."""

    checkpoint_id: str | None
    uri: str
    reason: str
    bytes_moved: int
    total_ms: float
    serving_checkpoint_id: str | None  # what it keeps serving
    serving_digest: str
    weights_version: int | None = None  # the sync that failed
    serving_weights_version: int | None = None
    rolled_back: bool = False  # the weights were swapped in, failed warmup, and were swapped out
    # "user": the weights do not check out; "server": the store or the worker failed (retried
    # with back-off first). None: written before this field existed.
    category: Literal["user", "server"] | None = None


class SamplerReleased(SamplerEvent):
    """A worker dropped a sampler's engine because the sampler stopped (its session ended).
    Requests for it are refused from then on; a worker's memory holds live samplers only."""

    reason: str
    engines_held: int  # sampler engines the worker still holds after this release


class SamplesGenerated(SamplerEvent):
    request_id: str
    num_samples: int
    num_tokens: int
    weights_checkpoint_id: str | None
    weights_digest: str
    weights_version: int | None = None  # the sync the weights came from; None: pinned


WORK_EVENTS: tuple[type[DomainEvent], ...] = (
    ForwardBackwardCompleted,
    ForwardCompleted,
    StateLoaded,
    OptimStepCompleted,
    LogprobsComputed,
    WeightsSaved,
    TrainerReleased,
    SamplerReady,
    WeightsLoaded,
    HotloadStarted,
    HotloadSucceeded,
    HotloadFailed,
    SamplesGenerated,
    SamplerReleased,
)
