"""Events of deployment replicas (aggregate type `replica`, id = the replica id).

The replica controller (gpu_workers/replica_controller.py) is their single writer: it decides
how many replicas each deployment should have, asks Ray for them, and records every step of a
replica's life with the time it took. A replica's lifecycle:

    ReplicaRequested -> ReplicaStarting -> ReplicaReady -> ReplicaDraining -> ReplicaStopped
                                 \\-------------\\--------> ReplicaFailed (then a replacement)

`ReplicaFailed` is final for that replica: a replacement is a new replica whose
`ReplicaRequested` names the one it `replaces`, so the gap in service is visible in the log.

A ready replica follows its deployment's target weights (`DeploymentWeightsUpdated`), one
hotload at a time: `ReplicaHotloadStarted`, then `ReplicaWeightsLoaded` or
`ReplicaHotloadFailed` (it keeps serving the weights it had). A refusal is not a failure of the
replica: it stays READY.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from events.loops import DomainEvent

ReplicaReason = Literal["min_replica", "scale_from_zero", "replacement", "scale_up"]
ReplicaPhase = Literal["starting", "serving", "draining"]


class ReplicaEvent(DomainEvent):
    aggregate_type: ClassVar[str] = "replica"

    replica_id: str
    deployment_id: str
    model_id: str


class ReplicaRequested(ReplicaEvent):
    """The controller wants one more replica of the deployment."""

    reason: ReplicaReason
    instance_type: str
    # What Ray is asked for: one unit of `loopstream/<instance type>` and the type's GPUs.
    ray_resources: dict[str, float]
    num_gpus: int = Field(ge=0)
    replaces: str | None = Field(default=None, description="the failed replica this replaces")
    # The weights it will serve.
    weights_uri: str | None = None
    base_model: str
    weights_version: int = Field(
        default=0, ge=0, description="the deployment's weights version (0: the model's own)"
    )


class ReplicaStarting(ReplicaEvent):
    """The actor exists in Ray (placed, or waiting for a node with the resources)."""

    actor_name: str


class ReplicaReady(ReplicaEvent):
    """The replica loaded and verified its weights and answers predictions."""

    actor_name: str
    content_digest: str
    checkpoint_id: str
    node_ip: str | None = None
    pid: int | None = None
    # Requested -> ready, and the parts of it the replica measured itself.
    start_ms: float = Field(ge=0)
    load_ms: float = Field(ge=0, description="weights fetch + verify + load into the engine")
    predict_concurrency: int = Field(ge=1)


class ReplicaDraining(ReplicaEvent):
    """No new requests go to it; in-flight ones finish (deactivate, delete, scale down)."""

    reason: str


class ReplicaStopped(ReplicaEvent):
    reason: str
    uptime_s: float | None = Field(default=None, ge=0)


class ReplicaFailed(ReplicaEvent):
    """The replica died or could not start; a replacement follows if the deployment still
    wants replicas."""

    phase: ReplicaPhase
    reason: str


class ReplicaHotloadStarted(ReplicaEvent):
    """The controller asked the replica to hot-load the deployment's weights version."""

    weights_version: int = Field(ge=1)
    checkpoint_uri: str
    from_digest: str | None = Field(default=None, description="the weights served before")


class ReplicaWeightsLoaded(ReplicaEvent):
    """The replica fetched, verified and swapped in the weights, warmed up on them and dropped
    its prompt cache (as asked); it serves them now."""

    weights_version: int = Field(ge=1)
    checkpoint_uri: str
    content_digest: str
    checkpoint_type: str
    folders_applied: int = Field(ge=0, description="the chain links applied (0: already served)")
    bytes_moved: int = Field(ge=0)
    fetch_ms: float = Field(ge=0)
    apply_ms: float = Field(ge=0)
    warmup_ms: float | None = Field(default=None, ge=0)
    warmup_attempts: int = Field(default=0, ge=0)
    prompt_cache_entries_dropped: int | None = None
    total_ms: float = Field(ge=0, description="started -> loaded, as the controller saw it")


class ReplicaHotloadFailed(ReplicaEvent):
    """The replica refused the weights (a file or link that does not verify, a chain that does
    not lead from what it serves, no warmup generation) and serves the weights it had."""

    weights_version: int = Field(ge=1)
    checkpoint_uri: str
    reason: str
    rolled_back: bool = Field(
        default=False, description="the new weights were swapped in, failed warmup, swapped out"
    )
    serving_digest: str | None = None


REPLICA_EVENTS: tuple[type[DomainEvent], ...] = (
    ReplicaRequested,
    ReplicaStarting,
    ReplicaReady,
    ReplicaDraining,
    ReplicaStopped,
    ReplicaFailed,
    ReplicaHotloadStarted,
    ReplicaWeightsLoaded,
    ReplicaHotloadFailed,
)
