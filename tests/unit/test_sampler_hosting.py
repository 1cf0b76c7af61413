"""What a sampler serves when a worker hosts it again, and whose fault a failed load is (pure)."""

from __future__ import annotations

import functools
import socket
from pathlib import Path

import pytest
import urllib3.exceptions
from minio import Minio

from events.work import HotloadFailed, HotloadStarted, WeightsLoaded
from gpu_workers import weights_fetch
from gpu_workers.checkpoint_store import CheckpointNotFoundError, CheckpointStore
from gpu_workers.deltas import DeltaChainError
from gpu_workers.engine.sampler import SamplerEngine
from gpu_workers.failures import InfrastructureError, RetryPolicy, with_retries
from gpu_workers.manifest import ChecksumMismatchError
from gpu_workers.sampler_worker import (
    HostedSampler,
    HotloadError,
    SamplerWorker,
    SyncedWeights,
    load_failure_category,
    previous_host,
)
from gpu_workers.tiny_model import ensure_tiny_model
from infra.s3 import ObjectStore


def loaded(version: int | None, name: str | None = None) -> WeightsLoaded:
    uri = f"bt://loops:r1/sampler_weights/{name}" if name else None
    return WeightsLoaded(checkpoint_id=name, uri=uri, content_digest="d", load_ms=1.0,
                         weights_version=version)  # fmt: skip


def refused(version: int, name: str) -> HotloadFailed:
    return HotloadFailed(checkpoint_id=name, uri=f"bt://loops:r1/sampler_weights/{name}",
                         reason="ChecksumMismatchError: x", bytes_moved=0, total_ms=1.0,
                         serving_checkpoint_id="v1", serving_digest="d",
                         weights_version=version)  # fmt: skip


def started(version: int, name: str) -> HotloadStarted:
    return HotloadStarted(checkpoint_id=name, uri=f"bt://loops:r1/sampler_weights/{name}",
                          from_digest="d", weights_version=version)  # fmt: skip


def test_a_new_host_serves_the_newest_sync_that_loaded_not_a_newer_refused_one() -> None:
    before = previous_host([loaded(0), started(1, "v1"), loaded(1, "v1"), started(2, "v2"),
                            refused(2, "v2")])  # fmt: skip
    assert before.loaded == SyncedWeights("v1", "bt://loops:r1/sampler_weights/v1", 1)
    assert set(before.refused) == {2}


def test_pinned_loads_are_not_syncs_and_an_unfinished_sync_is_left_undecided() -> None:
    before = previous_host([loaded(1, "v1"), loaded(None, "pinned"), started(2, "v2")])
    assert before.loaded is not None and before.loaded.weights_version == 1
    assert before.refused == {}


def test_a_sampler_never_hosted_or_only_refused_has_nothing_to_resume() -> None:
    assert previous_host([]).loaded is None
    before = previous_host([loaded(0), started(1, "v1"), refused(1, "v1")])
    assert before.loaded == SyncedWeights(None, None, 0) and set(before.refused) == {1}


def test_weights_that_do_not_check_out_are_the_users_the_store_failing_is_the_servers() -> None:
    corrupted = ChecksumMismatchError("model.safetensors", "sha256 differs")
    assert load_failure_category(corrupted) == "user"
    assert load_failure_category(CheckpointNotFoundError("x")) == "user"
    assert load_failure_category(DeltaChainError("x")) == "user"
    assert load_failure_category(ValueError("shape")) == "user"
    down = urllib3.exceptions.MaxRetryError(None, "/", "refused")  # type: ignore[arg-type]
    assert load_failure_category(InfrastructureError("download", down, 5)) == "server"
    assert load_failure_category(down) == "server"
    assert load_failure_category(RuntimeError("CUDA out of memory")) == "server"
    assert load_failure_category(KeyError("model.embed_tokens.weight")) == "server"


def test_a_store_that_is_down_is_a_server_refusal_after_retries_not_a_dead_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """urllib3's MaxRetryError was not among the four exceptions `_load` caught: it stopped the
    worker. Now it is retried, then refused with category "server"; the old weights stay."""
    model_dir = ensure_tiny_model(tmp_path / "model")
    with socket.socket() as sock:  # a port nothing listens on: the store is down
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = Minio(f"127.0.0.1:{port}", access_key="k", secret_key="s", secure=False)
    worker = SamplerWorker.__new__(SamplerWorker)  # no Kafka or PostgreSQL needed for a load
    worker.checkpoints = CheckpointStore(ObjectStore(client, "checkpoints"))
    fast = RetryPolicy(attempts=2, first_delay_s=0.01)
    monkeypatch.setattr(weights_fetch, "with_retries", functools.partial(with_retries, policy=fast))
    engine = SamplerEngine(model_dir)
    base_digest = engine.weights_version.digest
    hosted = HostedSampler(sampler_id="p1", run_id="r1", base_model="tiny", base_dir=model_dir,
                           engine=engine, uri=None)  # fmt: skip

    with pytest.raises(HotloadError) as refused:
        worker._load(hosted, "c1", "bt://loops:r1/sampler_weights/v1", weights_version=1)
    assert refused.value.category == "server"
    failed = refused.value.events[-1][0]
    assert isinstance(failed, HotloadFailed) and failed.category == "server"
    assert failed.reason.startswith("InfrastructureError") and "after 2 attempts" in failed.reason
    assert failed.serving_digest == base_digest == engine.weights_version.digest
