"""Kill the sampler worker mid-loop: it comes back on the newest weights, nothing is lost."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import pytest

from api.kafka_driver import Driver, datum, new_loop, wait_for_result
from commands.envelope import CommandEnvelope
from infra.processes import ManagedProcess
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
