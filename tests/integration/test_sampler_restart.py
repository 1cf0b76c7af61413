"""Kill the sampler worker mid-loop: it comes back on the newest weights that loaded (never a
refused sync), nothing is lost."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import pytest

from api.kafka_driver import Driver, datum, new_loop, query, wait_for_result
from commands.envelope import CommandEnvelope
from events.audit import history
from gpu_workers.checkpoint_store import CheckpointRef, CheckpointStore
from gpu_workers.engine.model_io import WEIGHTS_NAME
from infra.processes import ManagedProcess
from infra.s3 import ObjectStore
from infra.settings import Settings
from tests.isolated import IsolatedServices, isolated_services

# These tests kill a sampler worker: their own (tests/isolated.py), never the shared services.
ISOLATED: dict[str, IsolatedServices] = {}  # topic prefix -> this module's isolated services


@pytest.fixture(scope="module")
def isolated(
    settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[IsolatedServices]:
    names = ("command-processor", "projections", "trainer-worker", "sampler-worker")
    root = tmp_path_factory.mktemp("sampler-restart")
    with isolated_services(settings, root, names=names) as services:
        ISOLATED[services.settings.topic_prefix] = services
        yield services


@pytest.fixture
def loop(isolated: IsolatedServices) -> tuple[Driver, str, str, str]:
    return new_loop(isolated.settings)


def sampler_process(settings: Settings) -> ManagedProcess:
    return ISOLATED[settings.topic_prefix].process("sampler-worker")


def services_up(settings: Settings) -> None:
    """Start what is not running of the isolated services: the killed sampler worker."""
    ISOLATED[settings.topic_prefix].up()


@pytest.mark.timeout(240)
def test_sampler_worker_killed_and_restarted_resumes_on_latest_weights(
    loop: tuple[Driver, str, str, str],
) -> None:
    driver, _, run_id, sampler_id = loop
    text = list(b"abcabcabc")
    driver.ok("trainer-requests", "ForwardBackward", run_id, {"data": [datum(text)]})
    driver.ok("trainer-requests", "OptimStep", run_id, {})
    v1 = driver.ok("trainer-requests", "SaveWeights", run_id, {"name": "v1"})
    first = driver.ok("sampler-requests", "Sample", sampler_id,
                      {"prompt": "abc", "max_tokens": 4, "checkpoint_uri": v1["path"]})  # fmt: skip
    assert first["weights_version"]["checkpoint_id"] == v1["checkpoint_id"]

    victim = sampler_process(driver.settings)
    pid = victim.pid()
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    while victim.pid() is not None:
        time.sleep(0.05)

    # While the sampler is down: new weights are saved, and sampling requests are accepted.
    driver.ok("trainer-requests", "ForwardBackward", run_id, {"data": [datum(text)]})
    driver.ok("trainer-requests", "OptimStep", run_id, {})
    v2 = driver.ok("trainer-requests", "SaveWeights", run_id, {"name": "v2"})
    waiting = [
        CommandEnvelope(command_id=f"while-down-{i}-{sampler_id}", type="Sample",
                        aggregate_id=sampler_id, payload={"prompt": "abc", "max_tokens": 4})
        for i in range(3)
    ]  # fmt: skip
    driver.bus.send_many(waiting, to="sampler-requests")

    services_up(driver.settings)  # restarts only what is not running: the sampler worker

    for request in waiting:
        result = wait_for_result(driver.settings, request.command_id, timeout_s=120)
        assert result["status"] == "accepted", result
        assert result["output"]["weights_version"]["checkpoint_id"] == v2["checkpoint_id"]


@pytest.mark.timeout(300)
def test_a_restarted_sampler_serves_the_newest_sync_that_loaded_not_a_refused_one(
    loop: tuple[Driver, str, str, str],
) -> None:
    driver, session_id, run_id, sampler_id = loop
    text = list(b"abcabcabc")
    probe = {"prompt_tokens": text[:4], "max_tokens": 4, "seed": 3, "prompt_logprobs": True}

    # Sync 1 loads.
    driver.ok("trainer-requests", "ForwardBackward", run_id, {"data": [datum(text)]})
    driver.ok("trainer-requests", "OptimStep", run_id, {})
    v1 = driver.ok("trainer-requests", "SaveWeights", run_id, {"name": "v1"})
    on_v1 = driver.ok("sampler-requests", "Sample", sampler_id, {**probe, "min_weights_version": 1})
    assert on_v1["weights_version"]["digest"] == v1["content_digest"]

    # Sync 2 is refused: its weights file was corrupted in the store after the save.
    driver.ok("trainer-requests", "OptimStep", run_id, {})
    v2 = driver.ok("trainer-requests", "SaveWeights", run_id, {"name": "v2", "hotload": None})
    store = CheckpointStore(ObjectStore.from_settings(driver.settings))
    key = store.prefix(CheckpointRef.from_uri(v2["path"])) + WEIGHTS_NAME
    data = bytearray(store.store.get_bytes(key))
    data[-1] ^= 0xFF
    store.store.put_bytes(key, bytes(data))
    while not query(driver.settings, "select 1 from {schema}.checkpoints where uri = %s",
                    v2["path"]):  # fmt: skip
        time.sleep(0.05)
    driver.ok("commands", "HotloadWeights", session_id, {"run_id": run_id, "name": "v2"})
    refused = wait_for_hotload(driver, sampler_id, 2)
    assert refused["status"] == "failed" and "sha256" in refused["reason"], refused

    victim = sampler_process(driver.settings)
    pid = victim.pid()
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    while victim.pid() is not None:
        time.sleep(0.05)
    services_up(driver.settings)

    # Back on v1's weights, bit for bit: not the base model, and v2 is not tried again.
    again = driver.ok("sampler-requests", "Sample", sampler_id, probe)
    assert again["weights_version"]["digest"] == v1["content_digest"]
    assert again["weights_version"]["version"] == 1
    assert again["prompt_logprobs"] == on_v1["prompt_logprobs"]
    assert again["sequences"] == on_v1["sequences"]
    v2_loads = [e for e in history(driver.settings, sampler_id)
                if e.type == "HotloadStarted" and e.payload["uri"] == v2["path"]]  # fmt: skip
    assert len(v2_loads) == 1


def wait_for_hotload(driver: Driver, sampler_id: str, version: int) -> dict:
    while True:  # bounded by the test's timeout
        sql = "select * from {schema}.hotloads where sampler_id = %s and weights_version = %s"
        rows = [r for r in query(driver.settings, sql, sampler_id, version)
                if r["status"] != "started"]  # fmt: skip
        if rows:
            return rows[0]
        time.sleep(0.05)
