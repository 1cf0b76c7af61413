"""The replica controller's decisions: how many replicas each deployment should have, and which
replicas to start or drain to get there. Pure: the process manager (gpu_workers/
replica_controller.py) feeds it the event log and the gateway's traffic records, asks `plan`
what to do, does it on Ray and records what happened as events, which come back through
`evolve`. A restarted controller rebuilds the same state from the log.

Desired replicas of a deployment (until the autoscaler decides more):
- 0 unless it is ACTIVE (deactivated and deleted deployments serve nothing: the seed's 404s);
- at least `min_replica`;
- 1 while the gateway has seen requests for it within `idle_scale_down_s` (scale from zero:
  a parked request is demand);
- at most `max_replica`.

Weights (seed 002's weight sync into a deployment): a deployment's target is its newest
`DeploymentWeightsUpdated` that no replica refused (else the model's own weights). Replicas
start on it; a READY replica serving an older version gets a `HotloadReplica`, one at a time per
replica. A version a replica refused is not tried again anywhere (the refusal is about the
weights: a file or link that does not verify is the same on every replica), and replicas
started later start on the newest version not refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Literal

from events.deployments import (
    DeploymentActivated,
    DeploymentCreated,
    DeploymentDeactivated,
    DeploymentDeleted,
    DeploymentWeightsUpdated,
    DevelopmentDeploymentOverwritten,
    ModelCreated,
)
from events.loops import DomainEvent
from events.replicas import (
    ReplicaDraining,
    ReplicaFailed,
    ReplicaHotloadFailed,
    ReplicaHotloadStarted,
    ReplicaReady,
    ReplicaReason,
    ReplicaRequested,
    ReplicaStarting,
    ReplicaStopped,
    ReplicaWeightsLoaded,
)

ReplicaStatus = Literal["REQUESTED", "STARTING", "READY", "DRAINING", "STOPPED", "FAILED"]
LIVE: frozenset[str] = frozenset({"REQUESTED", "STARTING", "READY"})


@dataclass(frozen=True)
class ModelWeights:
    base_model: str
    weights_uri: str | None  # None: the base model's own weights


@dataclass(frozen=True)
class TargetWeights:
    """One DeploymentWeightsUpdated: the weights and what to do around the swap."""

    weights_version: int
    checkpoint_uri: str
    content_digest: str
    warmup: bool
    warmup_max_retries: int
    reset_prompt_cache: bool


@dataclass(frozen=True)
class DeploymentTarget:
    deployment_id: str
    model_id: str
    workspace_id: str | None
    status: str  # ACTIVE | INACTIVE | DELETED
    instance_type: str
    gpu_count: int
    min_replica: int
    max_replica: int
    # every weights update, oldest first; and the versions a replica refused
    weights: tuple[TargetWeights, ...] = ()
    refused_versions: frozenset[int] = frozenset()

    @property
    def target(self) -> TargetWeights | None:
        """The newest weights not refused; None: the model's own."""
        for weights in reversed(self.weights):
            if weights.weights_version not in self.refused_versions:
                return weights
        return None

    @property
    def target_version(self) -> int:
        target = self.target
        return target.weights_version if target else 0


@dataclass(frozen=True)
class ReplicaView:
    replica_id: str
    deployment_id: str
    model_id: str
    status: ReplicaStatus
    instance_type: str
    requested_at: datetime
    replaces: str | None = None
    weights_version: int = 0  # the deployment's weights version it serves (0: the model's)
    hotloading: int | None = None  # the version a hotload in flight loads


@dataclass
class ControlState:
    models: dict[str, ModelWeights] = field(default_factory=dict)
    deployments: dict[str, DeploymentTarget] = field(default_factory=dict)
    replicas: dict[str, ReplicaView] = field(default_factory=dict)
    # deployment -> when the gateway last reported a request for it (parked or served)
    last_demand: dict[str, datetime] = field(default_factory=dict)
    # failed replicas no replacement names yet, oldest first
    unreplaced: list[str] = field(default_factory=list)

    def live_replicas(self, deployment_id: str) -> list[ReplicaView]:
        return [
            r
            for r in self.replicas.values()
            if r.deployment_id == deployment_id and r.status in LIVE
        ]


# --- the decisions ------------------------------------------------------------------------------


@dataclass(frozen=True)
class StartReplica:
    deployment: DeploymentTarget
    reason: ReplicaReason
    replaces: str | None = None


@dataclass(frozen=True)
class DrainReplica:
    replica_id: str
    reason: str


@dataclass(frozen=True)
class HotloadReplica:
    replica_id: str
    weights: TargetWeights


Action = StartReplica | DrainReplica | HotloadReplica


def desired_replicas(
    state: ControlState, deployment: DeploymentTarget, *, now: datetime, idle_scale_down_s: float
) -> int:
    if deployment.status != "ACTIVE":
        return 0
    wanted = deployment.min_replica
    last = state.last_demand.get(deployment.deployment_id)
    if last is not None and now - last <= timedelta(seconds=idle_scale_down_s):
        wanted = max(wanted, 1)
    return min(wanted, deployment.max_replica)


def plan(state: ControlState, *, now: datetime, idle_scale_down_s: float) -> list[Action]:
    """What to start and what to drain now, for every deployment."""
    actions: list[Action] = []
    for deployment in state.deployments.values():
        live = state.live_replicas(deployment.deployment_id)
        # Replicas of an instance type the deployment no longer has (a development deployment
        # overwritten with new resources) leave once a current one is ready, or at once when
        # nothing should serve.
        current = [r for r in live if r.instance_type == deployment.instance_type]
        stale = [r for r in live if r.instance_type != deployment.instance_type]
        want = desired_replicas(state, deployment, now=now, idle_scale_down_s=idle_scale_down_s)
        current_ready = any(r.status == "READY" for r in current)
        for replica in stale:
            if want == 0 or current_ready:
                actions.append(DrainReplica(replica.replica_id, "instance type changed"))
        missing = want - len(current)
        failed_here = [
            rid for rid in state.unreplaced if state.replicas[rid].deployment_id
            == deployment.deployment_id
        ]  # fmt: skip
        for _ in range(max(missing, 0)):
            if failed_here:
                actions.append(StartReplica(deployment, "replacement", failed_here.pop(0)))
            elif not current and deployment.min_replica == 0:
                actions.append(StartReplica(deployment, "scale_from_zero"))
            elif len(current) < deployment.min_replica:
                actions.append(StartReplica(deployment, "min_replica"))
            else:
                actions.append(StartReplica(deployment, "scale_up"))
        if missing < 0:
            # Not yet serving ones go first, then the newest ready ones.
            order = {"REQUESTED": 0, "STARTING": 1, "READY": 2}
            extra = sorted(current, key=lambda r: (order[r.status], -r.requested_at.timestamp()))
            reason = _drain_reason(deployment)
            actions.extend(DrainReplica(r.replica_id, reason) for r in extra[:-missing])
        actions.extend(_hotloads(deployment, current))
    return actions


def _hotloads(deployment: DeploymentTarget, replicas: list[ReplicaView]) -> list[HotloadReplica]:
    """READY replicas behind the deployment's target, with no hotload in flight."""
    target = deployment.target
    if deployment.status != "ACTIVE" or target is None:
        return []
    return [
        HotloadReplica(r.replica_id, target)
        for r in replicas
        if r.status == "READY" and r.hotloading is None
        and r.weights_version < target.weights_version
    ]  # fmt: skip


def _drain_reason(deployment: DeploymentTarget) -> str:
    if deployment.status == "INACTIVE":
        return "deployment deactivated"
    if deployment.status == "DELETED":
        return "deployment deleted"
    return "scaled down: no requests within the idle period"


# --- folding the log in ---------------------------------------------------------------------------


def evolve(
    state: ControlState, event: DomainEvent, *, workspace_id: str | None, occurred_at: datetime
) -> ControlState:
    """Apply one event of the log (model or replica events; others are ignored). Mutates and
    returns `state`: the controller folds thousands of events at start."""
    match event:
        case ModelCreated():
            uri = event.checkpoint_uri if event.source == "checkpoint" else None
            state.models[event.model_id] = ModelWeights(event.base_model, uri)
        case DeploymentCreated():
            state.deployments[event.deployment_id] = DeploymentTarget(
                deployment_id=event.deployment_id,
                model_id=event.model_id,
                workspace_id=workspace_id,
                status="ACTIVE",
                instance_type=event.instance_type,
                gpu_count=event.gpu_count,
                min_replica=event.min_replica,
                max_replica=event.max_replica,
            )
        case DevelopmentDeploymentOverwritten():
            _update(state, event.deployment_id, instance_type=event.instance_type,
                    gpu_count=event.gpu_count)  # fmt: skip
        case DeploymentWeightsUpdated():
            current = state.deployments.get(event.deployment_id)
            if current is not None:
                weights = TargetWeights(
                    weights_version=event.weights_version,
                    checkpoint_uri=event.checkpoint_uri,
                    content_digest=event.content_digest,
                    warmup=event.warmup,
                    warmup_max_retries=event.warmup_max_retries,
                    reset_prompt_cache=event.reset_prompt_cache,
                )
                _update(state, event.deployment_id, weights=(*current.weights, weights))
        case DeploymentActivated():
            _update(state, event.deployment_id, status="ACTIVE")
        case DeploymentDeactivated():
            _update(state, event.deployment_id, status="INACTIVE")
            _forget_failures(state, event.deployment_id)
        case DeploymentDeleted():
            _update(state, event.deployment_id, status="DELETED")
            _forget_failures(state, event.deployment_id)
        case ReplicaRequested():
            state.replicas[event.replica_id] = ReplicaView(
                replica_id=event.replica_id,
                deployment_id=event.deployment_id,
                model_id=event.model_id,
                status="REQUESTED",
                instance_type=event.instance_type,
                requested_at=occurred_at,
                replaces=event.replaces,
                weights_version=event.weights_version,
            )
            if event.replaces in state.unreplaced:
                state.unreplaced.remove(event.replaces)
        case ReplicaStarting():
            _replica(state, event.replica_id, "STARTING")
        case ReplicaReady():
            _replica(state, event.replica_id, "READY")
        case ReplicaDraining():
            _replica(state, event.replica_id, "DRAINING")
        case ReplicaStopped():
            _replica(state, event.replica_id, "STOPPED")
        case ReplicaHotloadStarted():
            _replica_change(state, event.replica_id, hotloading=event.weights_version)
        case ReplicaWeightsLoaded():
            _replica_change(state, event.replica_id, hotloading=None,
                            weights_version=event.weights_version)  # fmt: skip
        case ReplicaHotloadFailed():
            _replica_change(state, event.replica_id, hotloading=None)
            current = state.deployments.get(event.deployment_id)
            if current is not None:
                refused = current.refused_versions | {event.weights_version}
                _update(state, event.deployment_id, refused_versions=refused)
        case ReplicaFailed():
            _replica(state, event.replica_id, "FAILED")
            if event.replica_id in state.replicas and event.replica_id not in state.unreplaced:
                state.unreplaced.append(event.replica_id)
    return state


def record_demand(state: ControlState, deployment_id: str, at: datetime) -> ControlState:
    """The gateway saw requests for the deployment (in flight, parked or finished) at `at`."""
    last = state.last_demand.get(deployment_id)
    if last is None or at > last:
        state.last_demand[deployment_id] = at
    return state


def _update(state: ControlState, deployment_id: str, **changes: object) -> None:
    current = state.deployments.get(deployment_id)
    if current is not None:
        state.deployments[deployment_id] = replace(current, **changes)  # type: ignore[arg-type]


def _forget_failures(state: ControlState, deployment_id: str) -> None:
    """A deployment that stops serving replaces nothing; activated again, it starts afresh."""
    state.unreplaced = [
        rid for rid in state.unreplaced if state.replicas[rid].deployment_id != deployment_id
    ]


def _replica(state: ControlState, replica_id: str, status: ReplicaStatus) -> None:
    _replica_change(state, replica_id, status=status)


def _replica_change(state: ControlState, replica_id: str, **changes: object) -> None:
    current = state.replicas.get(replica_id)
    if current is not None:
        state.replicas[replica_id] = replace(current, **changes)  # type: ignore[arg-type]
