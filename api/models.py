"""Request and response models of the Loops REST API (FastAPI template style: XCreate/XPublic).

Training and sampling bodies reuse the wire models of `commands/work.py`, so the API, the SDK and
the workers refuse a bad value with the same message naming the same field.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from commands.loops import (
    CHECKPOINT_NAME,
    ENVIRONMENT_NAME,
    MAX_COUNT,
    MAX_SEQ_LEN_LIMIT,
    CheckpointUri,
    HotloadOptions,
)
from commands.work import (
    DEFAULT_COMPRESSION_FORMAT,
    AdamParams,
    CompressionFormat,
    ComputeLogprobs,
    Forward,
    ForwardBackward,
    LoadState,
    OptimStep,
    Sample,
)
from events.limits import JsonObject, RequestKey, ShortText, TtlSeconds, UserMetadata

REQUEST_ID = Field(default=None, description="idempotency key")


class Public(BaseModel):
    model_config = ConfigDict(from_attributes=True)


# --- idempotent request bodies ---------------------------------------------------------------
# Each adds an optional `request_id` (the idempotency key) to a wire model; it is taken out
# again before the payload goes on the bus.


class ForwardBackwardCreate(ForwardBackward):
    request_id: RequestKey | None = REQUEST_ID


class ForwardCreate(Forward):
    request_id: RequestKey | None = REQUEST_ID


class OptimStepCreate(OptimStep):
    request_id: RequestKey | None = REQUEST_ID


class LoadStateCreate(LoadState):
    request_id: RequestKey | None = REQUEST_ID


class ComputeLogprobsCreate(ComputeLogprobs):
    request_id: RequestKey | None = REQUEST_ID


class SaveWeightsCreate(BaseModel):
    """The kind comes from the route (save_weights vs save_weights_for_sampler); the fields of
    the other kind are refused (see `commands.work.SaveWeights`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=CHECKPOINT_NAME)
    ttl_seconds: TtlSeconds | None = None
    # save_weights_for_sampler only:
    checkpoint_type: Literal["base", "delta"] | None = None
    compression_format: CompressionFormat = DEFAULT_COMPRESSION_FORMAT
    hotload: HotloadOptions | None = Field(
        default_factory=HotloadOptions, description="null: save only, hotload later"
    )
    # save_weights only: the caller's data position, handed back when the state is loaded.
    loader_state: JsonObject | None = None
    user_metadata: UserMetadata | None = None  # the user's labels on the checkpoint
    request_id: RequestKey | None = REQUEST_ID


class HotloadCreate(HotloadOptions):
    """Sync a saved sampler snapshot of the run to its sampler."""

    name: str = Field(pattern=CHECKPOINT_NAME, description="the snapshot's checkpoint name")
    checkpoint_type: Literal["base", "delta"] | None = None
    request_id: RequestKey | None = REQUEST_ID


class PromoteCreate(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    environment: str = Field(default="production", pattern=ENVIRONMENT_NAME)
    request_id: RequestKey | None = REQUEST_ID


class CheckpointTtlUpdate(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    ttl_seconds: TtlSeconds | None = Field(
        description="the checkpoint expires this many seconds from now; null: never"
    )
    request_id: RequestKey | None = REQUEST_ID


class SampleCreate(Sample):
    # Rollouts sharing an affinity key belong together (one group of an RL step); the key
    # travels as the request's correlation id.
    affinity_key: RequestKey | None = None
    request_id: RequestKey | None = REQUEST_ID


# --- sessions ---------------------------------------------------------------------------------


class SessionCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base_model: RequestKey
    project: ShortText | None = None
    name: ShortText | None = None
    request_id: RequestKey | None = REQUEST_ID


class SessionAccepted(BaseModel):
    session_id: str
    request_id: str


class SessionPublic(Public):
    session_id: str
    base_model: str
    project: str | None
    name: str | None
    status: Literal["active", "ended"]
    end_reason: str | None
    created_at: datetime
    ended_at: datetime | None


class SessionsPublic(BaseModel):
    data: list[SessionPublic]
    count: int


# --- runs and samplers --------------------------------------------------------------------------


class RunCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    session_id: RequestKey
    max_seq_len: int = Field(ge=1, le=MAX_SEQ_LEN_LIMIT)
    lora_rank: int = Field(default=0, ge=0, le=1024, description="0 = full-parameter training")
    from_checkpoint: CheckpointUri | None = Field(default=None, description="bt://loops:... URI")
    keep_last_checkpoints: int | None = Field(
        default=None,
        ge=1,
        le=MAX_COUNT,
        description="retention, per kind (weights, sampler_weights): a save beyond this many "
        "deletes the oldest, except a link of a live delta chain or what the sampler serves; "
        "null: keep all",
    )
    user_metadata: UserMetadata | None = None
    request_id: RequestKey | None = REQUEST_ID


class RunAccepted(BaseModel):
    run_id: str
    sampler_id: str
    session_id: str
    request_id: str


class RunPublic(Public):
    run_id: str
    session_id: str
    sampler_id: str
    base_model: str
    max_seq_len: int
    lora_rank: int
    from_checkpoint: str | None
    status: Literal["active", "stopped"]
    stop_reason: str | None
    created_at: datetime
    stopped_at: datetime | None
    user_metadata: dict[str, str] | None = None


class RunsPublic(BaseModel):
    data: list[RunPublic]
    count: int


class SamplerPublic(Public):
    sampler_id: str
    run_id: str
    session_id: str
    base_model: str
    status: Literal["active", "stopped"]
    stop_reason: str | None
    created_at: datetime
    stopped_at: datetime | None


# --- checkpoints --------------------------------------------------------------------------------


class CheckpointFilePublic(BaseModel):
    relative_file_name: str
    size_bytes: int
    sha256: str


class CheckpointPublic(Public):
    checkpoint_id: str
    run_id: str
    session_id: str
    name: str
    kind: Literal["weights", "sampler_weights"]
    uri: str
    files: list[CheckpointFilePublic]
    total_size_bytes: int
    step: int | None
    expires_at: datetime | None
    status: Literal["active", "deleted"]
    delete_reason: str | None
    created_at: datetime
    deleted_at: datetime | None
    checkpoint_type: Literal["base", "delta"] | None = None  # sampler weights
    chain_position: int | None = None
    promoted_to: list[str] = Field(default_factory=list)  # environments
    public: bool = False  # published: any workspace may start a run from its URI
    user_metadata: dict[str, str] | None = None  # the user's labels, as saved


class CheckpointsPublic(BaseModel):
    data: list[CheckpointPublic]
    count: int


class SessionDetail(SessionPublic):
    runs: list[RunPublic]
    samplers: list[SamplerPublic]
    checkpoints: list[CheckpointPublic]


class PresignedUrl(BaseModel):
    url: str
    relative_file_name: str
    size_bytes: int


class CheckpointFilesPage(BaseModel):
    """The seeds' shape, exactly: one presigned URL per file of the checkpoint folder."""

    presigned_urls: list[PresignedUrl]
    total_count: int
    next_page_token: str | None


# --- weight sync --------------------------------------------------------------------------------


class WeightSyncPublic(Public):
    """One numbered sync of a sampler and how its hotload went."""

    sampler_id: str
    weights_version: int
    checkpoint_id: str
    uri: str
    content_digest: str
    checkpoint_type: Literal["base", "delta"] | None
    warmup: bool
    warmup_max_retries: int
    reset_prompt_cache: bool
    requested_at: datetime
    request_id: str | None = Field(validation_alias="command_id")
    status: Literal["requested", "started", "succeeded", "failed"]
    reason: str | None
    rolled_back: bool | None
    folders_applied: int | None
    bytes_moved: int | None
    fetch_ms: float | None
    apply_ms: float | None
    total_ms: float | None
    warmup_attempts: int | None
    warmup_ms: float | None
    prompt_cache_entries_dropped: int | None
    started_at: datetime | None
    finished_at: datetime | None


class WeightSyncsPublic(BaseModel):
    data: list[WeightSyncPublic]
    count: int


class SamplerWeightsPublic(BaseModel):
    """A sampler's weight-sync state: `check_deployment_state` of the weight syncer."""

    sampler_id: str
    status: Literal["active", "stopped"]
    ready: bool = Field(description="a worker hosts the sampler; syncs reach it")
    ready_at: datetime | None
    serving_version: int | None = Field(description="sync the served weights came from")
    serving_checkpoint_id: str | None
    serving_uri: str | None
    serving_digest: str | None
    target_version: int | None = Field(description="newest sync sent to the sampler")
    pending: bool = Field(description="a sync was sent that is not served yet")
    last_hotload_version: int | None
    last_hotload_status: Literal["succeeded", "failed"] | None
    last_hotload_reason: str | None
    last_hotload_at: datetime | None


# --- futures ------------------------------------------------------------------------------------


class RequestAccepted(BaseModel):
    request_id: str


class EventRefPublic(BaseModel):
    event_id: str
    type: str
    sequence: int


class FuturePublic(BaseModel):
    request_id: str
    status: Literal["pending", "accepted", "rejected", "failed"]
    request_type: str | None = None
    result: dict[str, Any] | None = None
    reason: str | None = None
    field: str | None = None
    # For a rejected or failed request: `user` (fix the request) or `server` (loopstream failed;
    # resubmitting the same request may succeed).
    category: Literal["user", "server"] | None = None
    events: list[EventRefPublic] = Field(default_factory=list)


__all__ = ["AdamParams"]  # re-exported for SDK users building optim_step bodies
