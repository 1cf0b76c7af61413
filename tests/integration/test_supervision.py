"""kill -9 of any service's recorded pid leaves nothing running, and `services status|up|down`
see every process a service owns (issue 10, finding 7).

The services here are a set of their own (tests/isolated.py: own topics, database, pid files), so
killing them never touches the shared ones.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from infra.processes import wait_until
from infra.services import services_down, services_status, services_strays
from infra.settings import Settings
from tests.isolated import ALL_SERVICES, IsolatedServices, isolated_services


@pytest.fixture(scope="module")
def own(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[IsolatedServices]:
    # Every service, the serving half's too: each must leave nothing behind.
    root = tmp_path_factory.mktemp("supervision")
    with isolated_services(settings, root, names=ALL_SERVICES) as services:
        yield services


def _settings_of(own: IsolatedServices) -> Settings:
    # `services status|up|down` find pid files under the data dir, where these services keep them.
    return own.settings.model_copy(update={"data_dir": own.root})


def _processes_of(root: Path) -> dict[int, str]:
    """pid -> command line of every live process started for these services, children included.

    Found by the environment they inherit, independently of the code under test.
    """
    marker = f"LOOPSTREAM_DATA_DIR={root}".encode()
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError):
            continue
        if marker in environ and state != "Z":
            found[int(entry.name)] = cmdline
    return found


def _runners(root: Path) -> list[int]:
    return [pid for pid, cmd in _processes_of(root).items() if "-m projections.runner" in cmd]


@pytest.mark.timeout(600)  # starts six services, torch imports included, on a busy host
def test_kill_9_of_every_recorded_pid_leaves_no_process_behind(own: IsolatedServices) -> None:
    own.up()
    local = _settings_of(own)
    assert all(services_status(local).values())
    wait_until(lambda: len(_runners(own.root)) == 1, timeout_s=60, what="the projection runner")
    # The projections service is two processes, and status knows both.
    assert set(_runners(own.root)) < set(own.process("projections").members())

    for name in ALL_SERVICES:
        own.kill(name)  # SIGKILL to the recorded pid only

    wait_until(
        lambda: _processes_of(own.root) == {},
        timeout_s=60,
        what="no process of the killed services to be left running",
    )
    assert services_status(local) == dict.fromkeys(ALL_SERVICES)
    assert services_strays(local) == {}


@pytest.mark.timeout(600)
def test_up_after_a_kill_runs_one_runner_and_down_stops_every_process(
    own: IsolatedServices,
) -> None:
    own.up()
    wait_until(lambda: len(_runners(own.root)) == 1, timeout_s=60, what="the projection runner")
    own.kill("projections")

    own.up()  # what `services up` does: start what is not running

    wait_until(lambda: len(_runners(own.root)) == 1, timeout_s=60, what="a new runner")
    assert len(_runners(own.root)) == 1
    local = _settings_of(own)
    assert sorted(services_down(local)) == sorted(ALL_SERVICES)
    assert _processes_of(own.root) == {}
    assert services_strays(local) == {}
