"""The replica controller's decisions (commands/replica_control.py): pure, no Ray or Kafka."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from commands.replica_control import (
    ControlState,
    DrainReplica,
    StartReplica,
    evolve,
    plan,
    record_demand,
)
from events.deployments import (
    DeploymentCreated,
    DeploymentDeactivated,
    DeploymentDeleted,
    DevelopmentDeploymentOverwritten,
    ModelCreated,
)
from events.loops import DomainEvent
from events.replicas import ReplicaFailed, ReplicaReady, ReplicaRequested, ReplicaStarting

T0 = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
IDLE_S = 900.0


def fold(*events: DomainEvent, state: ControlState | None = None) -> ControlState:
    state = state or ControlState()
    for event in events:
        evolve(state, event, workspace_id="ws", occurred_at=T0)
    return state


def model() -> ModelCreated:
    return ModelCreated(model_id="m", name="m", source="base_model", base_model="tiny")


def deployment(min_replica: int = 0, max_replica: int = 1, kind: str = "published",
               instance_type: str = "CPU:1x2") -> DeploymentCreated:  # fmt: skip
    return DeploymentCreated(
        model_id="m", deployment_id="d", name="deployment-1", number=1,
        kind=kind,  # type: ignore[arg-type]
        instance_type=instance_type, gpu_count=0, min_replica=min_replica,
        max_replica=max_replica,
    )  # fmt: skip


def requested(replica_id: str, instance_type: str = "CPU:1x2", replaces: str | None = None
              ) -> ReplicaRequested:  # fmt: skip
    return ReplicaRequested(
        replica_id=replica_id, deployment_id="d", model_id="m", reason="min_replica",
        instance_type=instance_type, ray_resources={}, num_gpus=0, base_model="tiny",
        replaces=replaces,
    )  # fmt: skip


def ready(replica_id: str) -> ReplicaReady:
    return ReplicaReady(
        replica_id=replica_id, deployment_id="d", model_id="m", actor_name=f"r-{replica_id}",
        content_digest="x", checkpoint_id="base", start_ms=1, load_ms=1, predict_concurrency=1,
    )  # fmt: skip


def decide(state: ControlState, now: datetime = T0) -> list[object]:
    return list(plan(state, now=now, idle_scale_down_s=IDLE_S))


def test_min_replica_replicas_are_started_and_no_more() -> None:
    state = fold(model(), deployment(min_replica=2, max_replica=3))
    actions = decide(state)
    assert [a.reason for a in actions] == ["min_replica", "min_replica"]  # type: ignore[attr-defined]
    fold(requested("r1"), requested("r2"), state=state)
    assert decide(state) == []


def test_at_zero_one_replica_starts_on_demand_and_drains_after_the_idle_period() -> None:
    state = fold(model(), deployment(min_replica=0))
    assert decide(state) == []
    record_demand(state, "d", T0)
    (start,) = decide(state)
    assert isinstance(start, StartReplica) and start.reason == "scale_from_zero"
    starting = ReplicaStarting(replica_id="r1", deployment_id="d", model_id="m", actor_name="a")
    fold(requested("r1"), starting, ready("r1"), state=state)
    assert decide(state, T0 + timedelta(seconds=IDLE_S)) == []
    (drain,) = decide(state, T0 + timedelta(seconds=IDLE_S + 1))
    assert drain == DrainReplica("r1", "scaled down: no requests within the idle period")


def test_demand_never_exceeds_max_replica_and_older_demand_does_not_move_it_back() -> None:
    state = fold(model(), deployment(min_replica=0, max_replica=1))
    record_demand(state, "d", T0)
    record_demand(state, "d", T0 - timedelta(hours=1))
    assert state.last_demand["d"] == T0
    assert len(decide(state)) == 1


def test_a_failed_replica_is_replaced_by_one_that_names_it() -> None:
    state = fold(model(), deployment(min_replica=1), requested("r1"), ready("r1"))
    fold(ReplicaFailed(replica_id="r1", deployment_id="d", model_id="m", phase="serving",
                       reason="killed"), state=state)  # fmt: skip
    (start,) = decide(state)
    assert isinstance(start, StartReplica)
    assert (start.reason, start.replaces) == ("replacement", "r1")
    fold(requested("r2", replaces="r1"), state=state)
    assert state.unreplaced == [] and decide(state) == []


def test_deactivated_and_deleted_deployments_drain_everything_and_replace_nothing() -> None:
    for stop, reason in ((DeploymentDeactivated, "deployment deactivated"),
                         (DeploymentDeleted, "deployment deleted")):  # fmt: skip
        state = fold(model(), deployment(min_replica=2, max_replica=2), requested("r1"),
                     ready("r1"), requested("r2"))  # fmt: skip
        failed = ReplicaFailed(replica_id="r2", deployment_id="d", model_id="m",
                               phase="starting", reason="x")  # fmt: skip
        fold(failed, stop(model_id="m", deployment_id="d"), state=state)
        assert decide(state) == [DrainReplica("r1", reason)]
        assert state.unreplaced == []


def test_an_overwritten_development_deployment_keeps_its_replica_until_a_new_one_is_ready() -> None:
    state = fold(model(), deployment(min_replica=1, kind="development"), requested("r1"),
                 ready("r1"))  # fmt: skip
    overwritten = DevelopmentDeploymentOverwritten(
        model_id="m", deployment_id="d", instance_type="CPU:2x8", gpu_count=0
    )
    fold(overwritten, state=state)
    (start,) = decide(state)
    assert isinstance(start, StartReplica) and start.deployment.instance_type == "CPU:2x8"
    fold(requested("r2", instance_type="CPU:2x8"), state=state)
    assert decide(state) == []  # r1 serves until r2 is ready
    fold(ready("r2"), state=state)
    assert decide(state) == [DrainReplica("r1", "instance type changed")]


def test_extra_replicas_drain_not_yet_serving_ones_first() -> None:
    state = fold(model(), deployment(min_replica=0, max_replica=3), requested("r1"), ready("r1"),
                 requested("r2"))  # fmt: skip
    idle = "scaled down: no requests within the idle period"
    assert decide(state) == [DrainReplica("r2", idle), DrainReplica("r1", idle)]
