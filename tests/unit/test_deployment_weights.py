"""Weight sync into deployments (issue 14 item 4), the pure parts: the model aggregate's
UpdateDeploymentWeights, the replica controller's hotload decisions, the read-model rows, and
the WeightSyncer's choice of target."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from api.client import ServiceClient, TrainingClient
from api.deploy_client import DeploymentsClient
from api.weight_syncer import WeightSyncer
from commands.deployments import Rejected, UpdateDeploymentWeights
from commands.replica_control import (
    ControlState,
    HotloadReplica,
    StartReplica,
    evolve,
    plan,
)
from events.deployments import DeploymentDeactivated, DeploymentDeleted, DeploymentWeightsUpdated
from events.envelope import EventEnvelope
from events.loops import DomainEvent
from events.replicas import (
    ReplicaHotloadFailed,
    ReplicaHotloadStarted,
    ReplicaReady,
    ReplicaRequested,
    ReplicaWeightsLoaded,
)
from projections.deployments import project_deployment_event
from tests.unit.test_deployment_aggregate import deployment, given, model, when

T0 = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
SHA = "ab" * 32
BASE_URI = "bt://loops:r1/sampler_weights/sync-0"
DELTA_URI = "bt://loops:r1/sampler_weights/sync-1"


def update(**kw: object) -> UpdateDeploymentWeights:
    facts: dict[str, object] = {
        "deployment_id": "d1", "checkpoint_uri": DELTA_URI, "checkpoint_type": "delta",
        "chain_position": 1, "content_digest": SHA, "base_model": "tiny",
    }  # fmt: skip
    return UpdateDeploymentWeights(**{**facts, **kw})  # type: ignore[arg-type]


def updated(version: int, uri: str = DELTA_URI, **kw: object) -> DeploymentWeightsUpdated:
    values: dict[str, object] = {
        "model_id": "m1", "deployment_id": "d1", "checkpoint_uri": uri, "content_digest": SHA,
        "checkpoint_type": "delta", "chain_position": 1, "weights_version": version,
        "warmup": True, "warmup_max_retries": 10, "reset_prompt_cache": True,
    }  # fmt: skip
    return DeploymentWeightsUpdated(**{**values, **kw})  # type: ignore[arg-type]


def refused(state: object, command: object) -> tuple[str, str | None]:
    with pytest.raises(Rejected) as exc:
        when(state, command)  # type: ignore[arg-type]
    return exc.value.reason, exc.value.field


# --- UpdateDeploymentWeights -------------------------------------------------------------------


def test_a_delta_is_accepted_and_versions_count_per_deployment() -> None:
    state = given(model(), deployment())
    assert when(state, update()) == [updated(1)]
    state = given(model(), deployment(), updated(1), deployment("d2", 2))
    assert when(state, update())[0].weights_version == 2  # type: ignore[attr-defined]
    assert when(state, update(deployment_id="d2"))[0].weights_version == 1  # type: ignore[attr-defined]


def test_options_of_the_syncer_travel_with_the_event() -> None:
    (event,) = when(given(model(), deployment()), update(warmup=False, reset_prompt_cache=False,
                                                         warmup_max_retries=0))  # fmt: skip
    assert isinstance(event, DeploymentWeightsUpdated)
    assert (event.warmup, event.reset_prompt_cache, event.warmup_max_retries) == (False, False, 0)


def test_refuses_a_deleted_or_unknown_deployment() -> None:
    deleted = DeploymentDeleted(model_id="m1", deployment_id="d1")
    assert refused(given(model(), deployment(), deleted), update())[1] == "deployment_id"
    assert refused(given(model(), deployment()), update(deployment_id="nope"))[1] == "deployment_id"


def test_refuses_trainer_checkpoints_and_weights_of_another_base_model() -> None:
    state = given(model(), deployment())
    text, field = refused(state, update(checkpoint_uri="bt://loops:r1/weights/step-1"))
    assert "sampler_weights" in text and field == "checkpoint_uri"
    text, field = refused(state, update(base_model="other"))
    assert "'other'" in text and field == "checkpoint_uri"
    with pytest.raises(ValueError, match="content_digest"):
        update(content_digest="not-a-digest")


# --- the controller's decisions ----------------------------------------------------------------


def fold(*events: DomainEvent, state: ControlState | None = None) -> ControlState:
    state = state or ControlState()
    for event in events:
        evolve(state, event, workspace_id="ws", occurred_at=T0)
    return state


def replica(replica_id: str, weights_version: int = 0) -> list[DomainEvent]:
    common = {"replica_id": replica_id, "deployment_id": "d1", "model_id": "m1"}
    return [
        ReplicaRequested(**common, reason="min_replica", instance_type="CPU:1x2",
                         ray_resources={}, num_gpus=0, base_model="tiny",
                         weights_version=weights_version),
        ReplicaReady(**common, actor_name=f"a-{replica_id}", content_digest="x",
                     checkpoint_id="c", start_ms=1, load_ms=1, predict_concurrency=1),
    ]  # fmt: skip


def started(replica_id: str, version: int) -> ReplicaHotloadStarted:
    return ReplicaHotloadStarted(replica_id=replica_id, deployment_id="d1", model_id="m1",
                                 weights_version=version, checkpoint_uri=DELTA_URI)  # fmt: skip


def loaded(replica_id: str, version: int) -> ReplicaWeightsLoaded:
    return ReplicaWeightsLoaded(
        replica_id=replica_id, deployment_id="d1", model_id="m1", weights_version=version,
        checkpoint_uri=DELTA_URI, content_digest=SHA, checkpoint_type="delta",
        folders_applied=1, bytes_moved=10, fetch_ms=1.0, apply_ms=2.0, total_ms=4.0,
    )  # fmt: skip


def failed(replica_id: str, version: int) -> ReplicaHotloadFailed:
    return ReplicaHotloadFailed(replica_id=replica_id, deployment_id="d1", model_id="m1",
                                weights_version=version, checkpoint_uri=DELTA_URI,
                                reason="ChecksumMismatchError: sha256")  # fmt: skip


def two_replicas(*more: DomainEvent) -> ControlState:
    return fold(model(), deployment(min_replica=2, max_replica=2), *replica("r1"),
                *replica("r2"), *more)  # fmt: skip


def hotloads(state: ControlState) -> list[tuple[str, int]]:
    return [
        (a.replica_id, a.weights.weights_version)
        for a in plan(state, now=T0, idle_scale_down_s=900)
        if isinstance(a, HotloadReplica)
    ]


def test_ready_replicas_behind_the_target_get_one_hotload_each_at_a_time() -> None:
    state = two_replicas()
    assert hotloads(state) == []
    fold(updated(1, BASE_URI, checkpoint_type="base"), state=state)
    assert hotloads(state) == [("r1", 1), ("r2", 1)]
    fold(started("r1", 1), started("r2", 1), updated(2), state=state)
    assert hotloads(state) == []  # one hotload in flight per replica
    fold(loaded("r1", 1), state=state)
    assert hotloads(state) == [("r1", 2)]
    fold(started("r1", 2), loaded("r1", 2), loaded("r2", 1), state=state)
    assert hotloads(state) == [("r2", 2)]
    fold(started("r2", 2), loaded("r2", 2), state=state)
    assert hotloads(state) == []


def test_a_refused_version_is_not_tried_again_and_new_replicas_skip_it() -> None:
    state = two_replicas(updated(1), started("r1", 1), started("r2", 1), failed("r1", 1))
    assert hotloads(state) == []  # r2 still has its own attempt in flight
    fold(failed("r2", 1), state=state)
    assert hotloads(state) == []
    assert state.deployments["d1"].target is None  # the model's own weights again
    fold(updated(2, BASE_URI, checkpoint_type="base"), state=state)
    assert hotloads(state) == [("r1", 2), ("r2", 2)]
    assert state.deployments["d1"].target_version == 2


def test_new_replicas_start_on_the_newest_target() -> None:
    state = fold(model(), deployment(min_replica=1), updated(1), updated(2))
    (start,) = plan(state, now=T0, idle_scale_down_s=900)
    assert isinstance(start, StartReplica)
    target = start.deployment.target
    assert target is not None and target.weights_version == 2
    fold(*replica("r1", weights_version=2), state=state)
    assert hotloads(state) == []  # it started on the target: nothing to hot-load


def test_no_hotloads_for_a_deactivated_deployment() -> None:
    state = two_replicas(updated(1), DeploymentDeactivated(model_id="m1", deployment_id="d1"))
    assert hotloads(state) == []


# --- the read models ---------------------------------------------------------------------------


def envelope(event: DomainEvent, sequence: int) -> EventEnvelope:
    return EventEnvelope(
        event_id="0" * 32, type=type(event).__name__, schema_version=1,
        aggregate_type=event.aggregate_type, aggregate_id="x", sequence=sequence,
        occurred_at=T0, causation_id="c", correlation_id="c", actor="test",
        workspace_id="ws", payload=event.model_dump(mode="json"),
    )  # fmt: skip


def test_the_deployment_row_carries_the_target_and_replica_rows_their_last_hotload() -> None:
    [target] = project_deployment_event(updated(3), envelope(updated(3), 7))
    assert target.table == "deployments" and target.values["weights_version"] == 3
    assert target.values["weights_content_digest"] == SHA
    [ok] = project_deployment_event(loaded("r1", 3), envelope(loaded("r1", 3), 5))
    assert ok.values["hotload_status"] == "LOADED" and ok.values["weights_version"] == 3
    assert ok.values["content_digest"] == SHA and ok.values["hotload_fetch_ms"] == 1.0
    [refusal] = project_deployment_event(failed("r1", 4), envelope(failed("r1", 4), 6))
    assert refusal.values["hotload_status"] == "FAILED"
    assert refusal.values["hotload_weights_version"] == 4
    assert "weights_version" not in refusal.values  # it serves what it had


# --- the WeightSyncer's target -----------------------------------------------------------------


@pytest.fixture
def trainer() -> Iterator[TrainingClient]:
    # Nothing listens there: these tests must not make a request.
    with ServiceClient("http://127.0.0.1:9") as service:
        yield TrainingClient(service, run_id="r1", sampler_id="s1", max_seq_len=64)


def test_the_syncer_targets_a_deployment_named_model_slash_deployment_or_by_keyword(
    trainer: TrainingClient,
) -> None:
    service = trainer.service
    syncer = WeightSyncer(trainer, deploy_mgr=service, deployment_id="m1/d1")
    assert (syncer.model_id, syncer.deployment_id) == ("m1", "d1")
    assert isinstance(syncer._deployments, DeploymentsClient)
    deploys = DeploymentsClient(service)
    syncer = WeightSyncer(trainer, deploy_mgr=deploys, deployment_id="d1", model_id="m1")
    assert (syncer.model_id, syncer.deployment_id, syncer._deployments) == ("m1", "d1", deploys)
    paired = WeightSyncer(trainer, deploy_mgr=service)
    assert (paired.model_id, paired.deployment_id, paired._deployments) == (None, "s1", None)


def test_the_syncer_refuses_a_deployment_it_cannot_reach(trainer: TrainingClient) -> None:
    service = trainer.service
    with pytest.raises(ValueError, match="paired sampler"):
        WeightSyncer(trainer, deploy_mgr=service, deployment_id="other")
    with pytest.raises(ValueError, match="deploy_mgr"):
        WeightSyncer(trainer, deployment_id="m1/d1")
    with pytest.raises(ValueError, match="model_id"):
        WeightSyncer(trainer, deploy_mgr=service, deployment_id="m1/")
