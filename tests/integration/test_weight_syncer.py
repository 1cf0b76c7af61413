"""The SDK WeightSyncer on the real stack: SDK -> REST -> Kafka -> trainer and sampler workers ->
read models. Base then deltas, save-only then hotload, the chain reset, warmup that fails and
rolls back, hotloads while requests stream, serve-only-version->=N, and promotion."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from api.client import APIFuture, RequestRejectedError, ServiceClient, TrainingClient
from api.kafka_driver import Driver
from api.weight_syncer import WeightSyncer
from commands.loops import PROMOTABILITY_RULE
from commands.work import AdamParams, Datum, LossFnInputs
from gpu_workers.checkpoint_store import CheckpointRef, CheckpointStore
from gpu_workers.deltas import DELTA_WEIGHTS_NAME
from gpu_workers.engine.trainer import TrainerEngine
from gpu_workers.models import resolve_base_model
from infra.s3 import ObjectStore
from infra.settings import Settings

TIMEOUT_S = 120.0
TEXT = list(b"weights move in small steps")
PROMPT = TEXT[:4]


@pytest.fixture
def service(services: Settings) -> Iterator[ServiceClient]:
    with ServiceClient() as client:
        yield client


@pytest.fixture
def trainer(service: ServiceClient, settings: Settings) -> TrainingClient:
    session = service.create_session(settings.tiny_model_name, project="weight-syncer")
    return service.create_training_client(session, max_seq_len=64)


def train_step(trainer: TrainingClient, learning_rate: float = 1e-3) -> None:
    datum = Datum(
        model_input=TEXT,
        loss_fn_inputs=LossFnInputs(target_tokens=TEXT, weights=[1.0] * len(TEXT)),
    )
    trainer.forward_backward([datum]).result(TIMEOUT_S)
    trainer.optim_step(AdamParams(learning_rate=learning_rate)).result(TIMEOUT_S)


def sample(trainer: TrainingClient, **extra: Any) -> APIFuture[dict[str, Any]]:
    return trainer.sampling_client().sample(prompt_tokens=PROMPT, max_tokens=4, seed=1, **extra)


def checkpoint(service: ServiceClient, run_id: str, name: str) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while True:
        found = [c for c in service.list_checkpoints(run_id) if c["name"] == name]
        if found:
            return found[0]
        assert time.monotonic() < deadline, f"checkpoint {name} never reached the read model"
        time.sleep(0.05)


@pytest.mark.timeout(300)
def test_base_then_deltas_save_only_hotload_and_chain_reset(
    service: ServiceClient, trainer: TrainingClient
) -> None:
    syncer = WeightSyncer(trainer, deploy_mgr=service, base_model="loopstream/tiny-llama")
    assert syncer.wait_for_hotload_ready(timeout_s=60, poll_interval_s=0.1)["ready"]

    for step in range(3):
        train_step(trainer)
        assert syncer.save_and_hotload(f"step-{step}") == f"step-{step}"
    state = syncer.check_deployment_state()
    assert (state["serving_version"], state["target_version"], state["pending"]) == (3, 3, False)
    syncs = service.list_weight_syncs(trainer.sampler_id)
    assert [(s["weights_version"], s["checkpoint_type"], s["status"]) for s in syncs] == [
        (3, "delta", "succeeded"), (2, "delta", "succeeded"), (1, "base", "succeeded"),
    ]  # fmt: skip
    assert all(s["warmup"] and s["warmup_attempts"] == 1 for s in syncs)
    assert all(s["prompt_cache_entries_dropped"] is not None for s in syncs)
    # A delta moves fewer bytes than the base (only changed tensors, xor+zstd).
    assert syncs[0]["bytes_moved"] < syncs[2]["bytes_moved"]

    # Every answer names the sync that produced it, and its digest is that checkpoint's.
    served = sample(trainer).result(TIMEOUT_S)["weights_version"]
    assert served["version"] == 3
    assert served["digest"] == state["serving_digest"]

    # Split save and sync: nothing moves until hotload.
    train_step(trainer)
    assert syncer.save_only("step-3") == "step-3"
    assert syncer.check_deployment_state()["serving_version"] == 3
    assert syncer.hotload("step-3", "delta") is True
    assert syncer.check_deployment_state()["serving_version"] == 4
    assert syncer.hotload("step-0", "delta") is False  # it was saved as a base: refused

    # After a reset the next save starts a new chain.
    syncer.reset_delta_chain()
    train_step(trainer)
    syncer.save_and_hotload("step-4")
    assert checkpoint(service, trainer.run_id, "step-4")["checkpoint_type"] == "base"
    assert checkpoint(service, trainer.run_id, "step-3")["chain_position"] == 3


@pytest.mark.timeout(300)
def test_hotloads_while_requests_stream_never_fail_a_request(
    service: ServiceClient, trainer: TrainingClient
) -> None:
    """Requests are queued faster than they are served while four syncs land: all answer, each
    with the version it was served by, in order, and each version's digest is its sync's."""
    syncer = WeightSyncer(trainer, deploy_mgr=service, warmup_after_hotload=False)
    syncer.wait_for_hotload_ready(timeout_s=60, poll_interval_s=0.1)
    futures: list[APIFuture[dict[str, Any]]] = []
    for step in range(4):
        futures += [sample(trainer) for _ in range(6)]
        train_step(trainer, learning_rate=1e-2)
        syncer.save_and_hotload(f"s{step}")
    futures += [sample(trainer) for _ in range(6)]

    versions = [f.result(TIMEOUT_S)["weights_version"] for f in futures]  # none raises
    numbers = [v["version"] for v in versions]
    assert numbers == sorted(numbers)  # served in order; a newer sync never goes back
    assert numbers[-1] == 4 and len(set(numbers)) >= 3
    digests = {s["weights_version"]: s["content_digest"]
               for s in service.list_weight_syncs(trainer.sampler_id)}  # fmt: skip
    for v in versions:
        if v["version"]:  # 0: the base model, before the first sync
            assert v["digest"] == digests[v["version"]]


@pytest.mark.timeout(300)
def test_a_request_can_ask_for_weights_at_least_version_n(
    service: ServiceClient, trainer: TrainingClient
) -> None:
    syncer = WeightSyncer(trainer, deploy_mgr=service, warmup_after_hotload=False)
    syncer.wait_for_hotload_ready(timeout_s=60, poll_interval_s=0.1)
    train_step(trainer)
    syncer.save_only("a")

    # Sent before the sync exists: the sampler holds it until sync 1 lands, then serves it.
    waiting = sample(trainer, min_weights_version=1, min_weights_wait_s=60)
    time.sleep(0.5)
    assert syncer.hotload("a", "base")
    assert waiting.result(TIMEOUT_S)["weights_version"]["version"] == 1

    with pytest.raises(RequestRejectedError) as err:
        sample(trainer, min_weights_version=2, min_weights_wait_s=0.5).result(TIMEOUT_S)
    assert err.value.field == "min_weights_version"
    assert "serves weights version 1" in str(err.value)


def record_nan_weights(
    settings: Settings, trainer: TrainingClient, session_id: str, name: str
) -> None:
    """What a trainer with a NaN bug would write: a well-formed base checkpoint (valid
    manifest and digests) whose weights are NaN, stored and recorded with warmup asked."""
    engine = TrainerEngine(resolve_base_model(settings, settings.tiny_model_name), max_seq_len=64)
    with torch.no_grad():
        for parameter in engine.model.parameters():
            parameter.fill_(float("nan"))
    with tempfile.TemporaryDirectory() as tmp:
        engine.save_weights_for_sampler(Path(tmp) / name)
        ref = CheckpointRef(trainer.run_id, "sampler_weights", name)
        stored = CheckpointStore(ObjectStore.from_settings(settings)).upload(Path(tmp) / name, ref)
    files = [{"relative_file_name": f.relative_file_name, "size_bytes": f.size_bytes,
              "sha256": f.sha256} for f in stored.files]  # fmt: skip
    Driver(settings).ok("commands", "RecordCheckpoint", session_id, {
        "run_id": trainer.run_id, "checkpoint_id": f"ck-{name}", "name": name,
        "kind": "sampler_weights", "files": files, "checkpoint_type": "base",
        "chain_position": 0, "hotload": {"warmup": True, "warmup_max_retries": 2},
    })  # fmt: skip


@pytest.mark.timeout(300)
def test_weights_that_fail_warmup_are_rolled_back(
    service: ServiceClient, trainer: TrainingClient, settings: Settings
) -> None:
    """NaN weights pass every digest check (they are what was saved), swap in, and cannot
    generate: warmup fails after its retries, the previous weights come back, and the sync is
    reported failed with the reason while the sampler keeps serving."""
    syncer = WeightSyncer(trainer, deploy_mgr=service, warmup_max_retries=2)
    syncer.wait_for_hotload_ready(timeout_s=60, poll_interval_s=0.1)
    train_step(trainer)
    syncer.save_and_hotload("good")
    good = syncer.check_deployment_state()

    session_id = service.get_run(trainer.run_id)["session_id"]
    record_nan_weights(settings, trainer, session_id, "diverged")
    deadline = time.monotonic() + 60
    while (state := syncer.check_deployment_state())["last_hotload_version"] != 2:
        assert time.monotonic() < deadline, state
        time.sleep(0.05)
    assert state["last_hotload_status"] == "failed" and not state["pending"]
    assert "WarmupError" in state["last_hotload_reason"]
    assert state["serving_version"] == 1 and state["serving_digest"] == good["serving_digest"]
    (failed,) = service.list_weight_syncs(trainer.sampler_id, limit=1)
    assert failed["rolled_back"] is True and failed["status"] == "failed"

    served = sample(trainer).result(TIMEOUT_S)["weights_version"]
    assert (served["version"], served["digest"]) == (1, good["serving_digest"])
    with pytest.raises(RequestRejectedError, match="sync 2 was refused"):
        sample(trainer, min_weights_version=2).result(TIMEOUT_S)
    # Syncing the same snapshot again is a new sync, refused the same way.
    assert syncer.hotload("diverged", "base") is False
    assert syncer.check_deployment_state()["serving_version"] == 1


@pytest.mark.timeout(300)
def test_promotion_follows_the_promotability_matrix(
    service: ServiceClient, trainer: TrainingClient, settings: Settings
) -> None:
    syncer = WeightSyncer(trainer, deploy_mgr=service, warmup_after_hotload=False)
    train_step(trainer)
    syncer.save_and_hotload("base")
    train_step(trainer)
    syncer.save_and_hotload("delta")
    base = checkpoint(service, trainer.run_id, "base")
    delta = checkpoint(service, trainer.run_id, "delta")

    with pytest.raises(RequestRejectedError) as err:
        service.promote_checkpoint(delta["checkpoint_id"]).result(TIMEOUT_S)
    assert PROMOTABILITY_RULE in str(err.value) and err.value.field == "checkpoint_id"
    service.promote_checkpoint(base["checkpoint_id"]).result(TIMEOUT_S)
    deadline = time.monotonic() + 30
    while service.get_checkpoint(base["checkpoint_id"])["promoted_to"] != ["production"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)

    # LoRA: every save is a standalone base, and every one is promotable.
    session = service.create_session(settings.tiny_model_name, project="weight-syncer")
    lora = service.create_training_client(session, max_seq_len=64, lora_rank=4)
    lora_syncer = WeightSyncer(lora, deploy_mgr=service, lora_rank=4, warmup_after_hotload=False)
    for name in ("l0", "l1"):
        train_step(lora)
        lora_syncer.save_and_hotload(name)
    second = checkpoint(service, lora.run_id, "l1")
    assert second["checkpoint_type"] == "base"
    service.promote_checkpoint(second["checkpoint_id"], environment="staging").result(TIMEOUT_S)


@pytest.mark.timeout(300)
def test_a_sampler_that_missed_twenty_deltas_walks_the_chain_to_the_trainers_weights(
    service: ServiceClient, trainer: TrainingClient, settings: Settings
) -> None:
    """A base and 20 deltas saved without syncing; then one hotload of the last: the sampler
    fetches all 21 folders, applies them in order and serves the trainer's weights, digest for
    digest. A corrupted link is refused; reset_delta_chain (a new base) recovers."""
    syncer = WeightSyncer(trainer, deploy_mgr=service, warmup_after_hotload=False)
    syncer.wait_for_hotload_ready(timeout_s=60, poll_interval_s=0.1)
    for step in range(21):
        train_step(trainer)
        assert syncer.save_only(f"c{step}") == f"c{step}"
    head = checkpoint(service, trainer.run_id, "c20")
    assert (head["checkpoint_type"], head["chain_position"]) == ("delta", 20)

    assert syncer.hotload("c20", "delta")
    (sync,) = service.list_weight_syncs(trainer.sampler_id, limit=1)
    assert sync["folders_applied"] == 21 and sync["status"] == "succeeded"
    state = syncer.check_deployment_state()
    assert state["serving_digest"] == sync["content_digest"]
    # The trainer's own view of the same weights: its logprobs equal the sampler's.
    served = sample(trainer, prompt_logprobs=True).result(TIMEOUT_S)
    assert served["weights_version"]["digest"] == sync["content_digest"]
    (trainer_logprobs,) = trainer.compute_logprobs([PROMPT]).result(TIMEOUT_S)["logprobs"]
    assert served["prompt_logprobs"][1:] == pytest.approx(trainer_logprobs[1:], abs=1e-4)

    # Corrupt the next delta in the store: refused, the sampler keeps c20.
    train_step(trainer)
    syncer.save_only("c21")
    store = CheckpointStore(ObjectStore.from_settings(settings))
    ref = CheckpointRef(trainer.run_id, "sampler_weights", "c21")
    key = store.prefix(ref) + DELTA_WEIGHTS_NAME
    data = store.store.get_bytes(key)
    store.store.put_bytes(key, data[:-1] + bytes([data[-1] ^ 0xFF]))
    assert syncer.hotload("c21", "delta") is False
    (refused,) = service.list_weight_syncs(trainer.sampler_id, limit=1)
    assert DELTA_WEIGHTS_NAME in refused["reason"] and "sha256" in refused["reason"]
    assert syncer.check_deployment_state()["serving_digest"] == sync["content_digest"]

    syncer.reset_delta_chain()
    train_step(trainer)
    syncer.save_and_hotload("c22")
    assert checkpoint(service, trainer.run_id, "c22")["checkpoint_type"] == "base"
