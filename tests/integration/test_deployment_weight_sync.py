"""Seed 002's WeightSyncer into a deployment (issue 14 item 4), on the real stack and real Ray
replicas: a run's base then delta reach both replicas of a deployment (served through the
gateway, digest for digest), and a corrupted delta is refused by both while the old weights
keep serving.

One deployment for the whole module (each replica is a torch process: ~10 s of CPU here); the
tests run in order on it and it is deleted at the end.
"""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from api.client import ServiceClient, TrainingClient
from api.deploy_client import DeploymentsClient
from api.weight_syncer import HotloadFailedError, WeightSyncer
from commands.work import AdamParams, Datum, LossFnInputs
from events.audit import history
from gpu_workers.checkpoint_store import CheckpointRef, CheckpointStore
from gpu_workers.deltas import DELTA_WEIGHTS_NAME
from infra.s3 import ObjectStore
from infra.settings import Settings
from tests.integration.test_serving import eventually, replica_rows

WAIT_S = 180.0
TEXT = list(b"weights move in small steps")
Json = dict[str, Any]

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def service(services: Settings) -> Iterator[ServiceClient]:
    with ServiceClient() as client:
        yield client


@pytest.fixture(scope="module")
def gateway(services: Settings, api_key: str) -> Iterator[httpx.Client]:
    url = f"http://{services.gateway_host}:{services.gateway_port}"
    with httpx.Client(base_url=url, headers={"Authorization": f"Api-Key {api_key}"},
                      timeout=WAIT_S) as client:  # fmt: skip
        yield client


@pytest.fixture(scope="module")
def trainer(service: ServiceClient) -> Iterator[TrainingClient]:
    session = service.create_session("loopstream/tiny-llama", project="deployment-weight-sync")
    training = service.create_training_client(session, max_seq_len=64)
    yield training
    service.end_session(session.session_id, reason="test over").result(60)


@pytest.fixture(scope="module")
def deployed(service: ServiceClient, trainer: TrainingClient) -> Iterator[Json]:
    """The run's first checkpoint on a deployment with two replicas (min = max = 2)."""
    deploys = DeploymentsClient(service)
    trainer.save_weights_for_sampler("first", hotload=False).result(WAIT_S)
    created = deploys.deploy_checkpoints(
        trainer.run_id, checkpoint_name="first", deployment={"min_replica": 2, "max_replica": 2}
    ).result(WAIT_S)
    model_id, deployment_id = created["model_id"], created["deployment_id"]
    try:
        yield {"model_id": model_id, "deployment_id": deployment_id, "deploys": deploys}
    finally:
        deploys.delete(model_id, deployment_id).result(WAIT_S)


def train_step(trainer: TrainingClient) -> None:
    datum = Datum(
        model_input=TEXT,
        loss_fn_inputs=LossFnInputs(target_tokens=TEXT, weights=[1.0] * len(TEXT)),
    )
    trainer.forward_backward([datum]).result(WAIT_S)
    trainer.optim_step(AdamParams(learning_rate=1e-3)).result(WAIT_S)


def predict_path(deployed: Json) -> str:
    return f"/model/{deployed['model_id']}/deployment/{deployed['deployment_id']}/predict"


def served_by_each_replica(gateway: httpx.Client, deployed: Json, count: int = 2) -> dict[str, str]:
    """replica id -> the digest it answered with, asking until `count` replicas answered. The
    gateway sends a request to the least busy replica (the first one, when all are idle), so
    requests go in concurrent rounds: with one slot per replica, each round reaches every one."""

    def ask(_: int) -> Json:
        answer = gateway.post(predict_path(deployed), json={"prompt": "hi", "max_tokens": 8})
        assert answer.status_code == 200, answer.text
        return answer.json()  # type: ignore[no-any-return]

    digests: dict[str, str] = {}
    deadline = time.monotonic() + 60
    with concurrent.futures.ThreadPoolExecutor(count * 2) as pool:
        while len(digests) < count:
            assert time.monotonic() < deadline, f"only {sorted(digests)} answered"
            for body in pool.map(ask, range(count * 2)):
                digests[body["replica_id"]] = body["weights"]["digest"]
    return digests


def test_the_syncer_sends_a_base_then_a_delta_into_both_replicas(
    settings: Settings, gateway: httpx.Client, trainer: TrainingClient, deployed: Json
) -> None:
    def two_ready() -> bool:
        rows = replica_rows(settings, deployed["deployment_id"])
        return len([r for r in rows if r["status"] == "READY"]) == 2

    eventually(two_ready, "two READY replicas")
    syncer = WeightSyncer(
        trainer,
        deploy_mgr=deployed["deploys"],
        deployment_id=f"{deployed['model_id']}/{deployed['deployment_id']}",
        hotload_timeout=int(WAIT_S),
    )
    state = syncer.wait_for_hotload_ready(timeout_s=WAIT_S, poll_interval_s=0.2)
    assert state["target"]["weights_version"] == 0 and state["synced"]
    first_digest = state["target"]["content_digest"]

    digests = []
    for step, kind in enumerate(("base", "delta")):
        train_step(trainer)
        assert syncer.save_and_hotload(f"sync-{step}") == f"sync-{step}"
        state = syncer.check_deployment_state()
        target = state["target"]
        assert (target["weights_version"], target["checkpoint_type"]) == (step + 1, kind)
        assert target["checkpoint_uri"].endswith(f"/sampler_weights/sync-{step}")
        assert syncer.last_weights_version == step + 1 and state["synced"]
        ready = [r for r in state["replicas"] if r["status"] == "READY"]
        assert len(ready) == 2
        for replica in ready:
            assert replica["weights_version"] == step + 1
            assert replica["content_digest"] == target["content_digest"]
            assert replica["hotload_status"] == "LOADED" and replica["hotload_fetch_ms"] > 0
        # Through the gateway: both replicas answer with the new weights.
        assert set(served_by_each_replica(gateway, deployed).values()) == {target["content_digest"]}
        digests.append(target["content_digest"])
    assert len({first_digest, *digests}) == 3

    # Each replica's log: started on the first checkpoint, then one hotload per sync.
    for replica in ready:
        types = [e.type for e in history(settings, replica["replica_id"])]
        assert types[-4:] == ["ReplicaHotloadStarted", "ReplicaWeightsLoaded"] * 2
        loaded = [e.payload for e in history(settings, replica["replica_id"])
                  if e.type == "ReplicaWeightsLoaded"]  # fmt: skip
        assert [p["checkpoint_type"] for p in loaded] == ["base", "delta"]
        assert loaded[1]["bytes_moved"] < loaded[0]["bytes_moved"]  # a delta moves less
        assert loaded[1]["folders_applied"] == 1 and loaded[1]["warmup_attempts"] >= 1


def test_a_corrupted_delta_is_refused_by_both_replicas_and_the_old_weights_keep_serving(
    settings: Settings, gateway: httpx.Client, trainer: TrainingClient, deployed: Json
) -> None:
    deploys: DeploymentsClient = deployed["deploys"]
    syncer = WeightSyncer(
        trainer, deploy_mgr=deploys.service, deployment_id=deployed["deployment_id"],
        model_id=deployed["model_id"], hotload_timeout=int(WAIT_S),
        first_checkpoint_type="delta",  # the chain the first test started goes on
    )  # fmt: skip
    before = syncer.check_deployment_state()
    serving = before["target"]["content_digest"]
    train_step(trainer)
    assert syncer.save_only("broken") == "broken"
    uri = f"bt://loops:{trainer.run_id}/sampler_weights/broken"
    store = CheckpointStore(ObjectStore.from_settings(settings))
    key = store.prefix(CheckpointRef.from_uri(uri)) + DELTA_WEIGHTS_NAME
    data = bytearray(store.store.get_bytes(key))
    data[-1] ^= 0xFF
    store.store.put_bytes(key, bytes(data))

    assert syncer.hotload("broken", "delta") is False
    state = syncer.check_deployment_state()
    version = before["target"]["weights_version"] + 1
    assert state["target"]["weights_version"] == version and not state["synced"]
    ready = [r for r in state["replicas"] if r["status"] == "READY"]
    assert len(ready) == 2
    for replica in ready:
        assert replica["hotload_status"] == "FAILED"
        assert replica["hotload_weights_version"] == version
        assert DELTA_WEIGHTS_NAME in replica["hotload_reason"]
        assert "sha256" in replica["hotload_reason"]
        assert replica["weights_version"] == version - 1 and replica["content_digest"] == serving
    assert set(served_by_each_replica(gateway, deployed).values()) == {serving}

    # save_and_hotload raises with the replicas' reasons.
    train_step(trainer)
    with pytest.raises(HotloadFailedError) as refused:
        syncer.save_and_hotload("after-broken")  # a delta on the corrupted one: refused too
    assert "replica" in refused.value.reason
    # A new base recovers the deployment.
    syncer.reset_delta_chain()
    train_step(trainer)
    syncer.save_and_hotload("recovered", checkpoint_type="base")
    state = syncer.check_deployment_state()
    assert state["synced"] and state["target"]["checkpoint_type"] == "base"
    assert set(served_by_each_replica(gateway, deployed).values()) == {
        state["target"]["content_digest"]
    }
