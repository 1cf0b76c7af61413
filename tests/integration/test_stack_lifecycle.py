"""`stack up` is idempotent, `down` stops exactly what `up` started, ports in use are named."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
from pathlib import Path

import pytest

from infra.processes import ManagedProcess, StackError, wait_until
from infra.settings import Settings
from infra.stack import LocalStack
from infra.topics import provision_topics


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if text in cmdline and state != "Z":
            pids.append(int(proc.name))
    return pids


def _kill_9(process: ManagedProcess) -> None:
    pid = process.pid()
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: process.pid() is None, timeout_s=30, what=f"{process.name} to die")
    with contextlib.suppress(ChildProcessError):  # this test started it: collect it
        os.waitpid(pid, 0)


def _isolated(settings: Settings, data_dir: Path, base: int) -> Settings:
    """The same stack on its own data dir and ports, so the shared test stack is untouched."""
    return settings.model_copy(
        update={
            "data_dir": data_dir,
            "kafka_bootstrap_servers": f"127.0.0.1:{base + 92}",
            "kafka_controller_port": base + 93,
            "pg_port": base + 32,
            "s3_endpoint": f"127.0.0.1:{base}",
            "seaweed_master_port": base + 33,
            "seaweed_volume_port": base + 40,
            "seaweed_filer_port": base + 88,
            "ray_port": base + 79,
            "seaweed_admin_port": base + 46,
        }
    )


def test_second_up_finds_the_running_stack(settings: Settings) -> None:
    stack = LocalStack(settings)
    pids_before = {s.name: s.pid for s in stack.status()}

    report = stack.up()

    assert report.started == []
    assert sorted(report.already_running) == ["kafka", "postgres", "ray", "s3"]
    assert {s.name: s.pid for s in stack.status()} == pids_before


def test_topic_provisioning_is_idempotent(settings: Settings) -> None:
    provision_topics(settings)
    report = provision_topics(settings)

    assert report.created == [] and report.reconfigured == [] and report.repartitioned == []
    assert settings.topic("events") in report.unchanged


def test_port_taken_by_a_stranger_is_named_with_the_fix(settings: Settings, tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        other = _isolated(settings, tmp_path / "d", 29300).model_copy(update={"pg_port": port})

        with pytest.raises(StackError) as excinfo:
            LocalStack(other).up()

    message = str(excinfo.value)
    assert f"port {port} is already taken" in message
    assert "LOOPSTREAM_PG_PORT" in message


@pytest.mark.timeout(420)
def test_a_second_stack_starts_twice_and_stops_without_strays(
    settings: Settings, tmp_path: Path
) -> None:
    data_dir = tmp_path / "second-stack"
    other = _isolated(settings, data_dir, 29100)
    stack = LocalStack(other)
    try:
        first = stack.up()
        assert sorted(first.started) == ["kafka", "postgres", "ray", "s3"]
        assert len(first.topics.created) > 0

        second = stack.up()
        assert second.started == []
        assert all(status.ready for status in stack.status())
        assert _processes_mentioning(str(data_dir))

        # kill -9 of every recorded pid: nothing of the servers is left running, and `up`
        # brings all four back (issue 10, finding 7).
        first_pids = {pid for s in stack.services.values() for pid in s.process.members()}
        for service in stack.services.values():
            _kill_9(service.process)
        for name, service in stack.services.items():
            if name == "ray":
                continue  # Ray's GCS and raylet outlive `ray start`: `up` ends them (below)
            wait_until(lambda s=service: s.process.members() == [], timeout_s=60, what=name)  # type: ignore[misc]
        third = stack.up()
        assert sorted(third.started) == ["kafka", "postgres", "ray", "s3"]
        assert all(status.ready for status in stack.status())
        assert [pid for pid in first_pids if Path(f"/proc/{pid}").exists()] == []
    finally:
        stopped = stack.down()

    assert sorted(stopped) == ["kafka", "postgres", "ray", "s3"]
    assert _processes_mentioning(str(data_dir)) == []
    assert not list((data_dir / "run").glob("*.pid"))
    # The shared stack was not touched.
    assert all(status.ready for status in LocalStack(settings).status())
