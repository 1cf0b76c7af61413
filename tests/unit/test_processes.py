from __future__ import annotations

import os
import sys
from pathlib import Path

from infra.processes import ManagedProcess, wait_until
from infra.stack.kafka import _java_major, _kafka_uuid


def _managed(tmp_path: Path, signature: str) -> ManagedProcess:
    return ManagedProcess(
        name="probe", run_dir=tmp_path, log_file=tmp_path / "probe.log", signature=signature
    )


def test_recorded_pid_of_another_program_is_not_ours(tmp_path: Path) -> None:
    # pids are reused: a pid file pointing at some other live process must not count.
    process = _managed(tmp_path, signature="no-such-program-signature")
    process.pid_file.write_text(str(os.getpid()))
    assert process.pid() is None


def test_start_and_stop_a_real_process(tmp_path: Path) -> None:
    marker = str(tmp_path / "sleeper")
    process = _managed(tmp_path, signature=marker)
    process.start([sys.executable, "-c", "import time; time.sleep(60)", marker])
    wait_until(lambda: process.pid() is not None, timeout_s=10, what="the sleeper to show up")

    assert process.stop(timeout_s=5) is True
    assert process.pid() is None
    assert not process.pid_file.exists()
    # Stopping again finds nothing to stop.
    assert process.stop() is False


def test_missing_pid_file_means_not_running(tmp_path: Path) -> None:
    assert _managed(tmp_path, "x").pid() is None


def test_java_version_parsing() -> None:
    assert _java_major('openjdk version "17.0.15" 2025-04-15') == 17
    assert _java_major('java version "1.8.0_392"') == 8
    assert _java_major("garbage") is None


def test_kafka_cluster_id_never_starts_like_a_command_line_option() -> None:
    assert not any(_kafka_uuid().startswith("-") for _ in range(2000))


def test_kafka_cluster_id_is_22_urlsafe_chars() -> None:
    cluster_id = _kafka_uuid()
    assert len(cluster_id) == 22
    assert set(cluster_id) <= set(
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    )
