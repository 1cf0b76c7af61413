from __future__ import annotations

import os
import signal
import sys
import textwrap
from pathlib import Path

from infra.processes import OWNER_ENV, ManagedProcess, ProcInfo, owned_pids, wait_until
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


# --- which processes a managed server owns (pure) ----------------------------------------------

TAG = "/data/run/projections.pid"
SIGNATURE = "-m api.cli projections run"


def _proc(pid: int, pgid: int, cmdline: str = "python -m x", tag: str | None = None) -> ProcInfo:
    environ = b"PATH=/bin\0" + (f"{OWNER_ENV}={tag}".encode() if tag else b"") + b"\0"
    return ProcInfo(pid=pid, pgid=pgid, cmdline=cmdline, environ=environ)


def _owned(procs: list[ProcInfo], recorded: int | None = 100) -> list[int]:
    return owned_pids(procs, recorded=recorded, owner_tag=TAG, signature=SIGNATURE)


def test_running_leader_owns_its_whole_group_even_children_without_the_tag() -> None:
    procs = [_proc(100, 100, f"python {SIGNATURE}"), _proc(101, 100), _proc(7, 7)]
    assert _owned(procs) == [100, 101]


def test_children_of_a_dead_leader_are_found_by_group_and_tag() -> None:
    # The leader was killed with -9: its runner lives on in its group, with the inherited tag.
    procs = [_proc(101, 100, "python -m projections.runner", TAG), _proc(102, 100)]
    assert _owned(procs) == [101, 102]


def test_a_reused_group_id_without_our_tag_is_not_ours() -> None:
    # Our group died, and another program now leads a group with the recorded pid.
    procs = [_proc(100, 100, "postgres: checkpointer"), _proc(101, 100, "sleep 5")]
    assert _owned(procs) == []


def test_the_same_service_of_another_data_dir_is_not_ours() -> None:
    procs = [_proc(300, 300, f"python {SIGNATURE}", "/other/run/projections.pid")]
    assert _owned(procs) == []
    assert _owned(procs, recorded=None) == []


def test_a_tagged_child_that_left_the_group_is_still_ours() -> None:
    procs = [_proc(100, 100, f"python {SIGNATURE}", TAG), _proc(150, 150, "python -m y", TAG)]
    assert _owned(procs) == [100, 150]


def test_children_that_wipe_their_environment_are_found_by_working_directory() -> None:
    # PostgreSQL's backends: own session (setsid), environment overwritten by the ps title.
    backend = ProcInfo(pid=120, pgid=120, cmdline="postgres: walwriter", environ=b"", cwd="/d/pg")
    stranger = ProcInfo(pid=130, pgid=130, cmdline="postgres: walwriter", environ=b"", cwd="/x")
    procs = [backend, stranger]
    owned = owned_pids(procs, recorded=100, owner_tag=TAG, signature="/d/pg", home=Path("/d/pg"))
    assert owned == [120]


def test_unreadable_environments_do_not_count() -> None:
    procs = [ProcInfo(pid=101, pgid=100, cmdline="postgres", environ=None)]
    assert _owned(procs) == []


# --- real processes: kill -9 of the recorded pid -------------------------------------------------


def _leader_script(child_pid_file: Path, *, die_with_parent: bool, new_session: bool) -> str:
    """A leader that starts a sleeping child (like `projections run` starts its runner)."""
    return textwrap.dedent(f"""
        import subprocess, sys, time
        from infra.processes import die_with_parent
        child = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(120)"],
            preexec_fn=die_with_parent() if {die_with_parent} else None,
            start_new_session={new_session},
        )
        open({str(child_pid_file)!r}, "w").write(str(child.pid))
        time.sleep(120)
    """)


def _start_leader(
    tmp_path: Path, *, die_with_parent: bool, new_session: bool = False
) -> tuple[ManagedProcess, int]:
    marker = str(tmp_path / "leader")
    child_pid_file = tmp_path / "child.pid"
    process = _managed(tmp_path, signature=marker)
    script = _leader_script(
        child_pid_file, die_with_parent=die_with_parent, new_session=new_session
    )
    process.start([sys.executable, "-c", script, marker], cwd=Path(__file__).parents[2])
    wait_until(child_pid_file.exists, timeout_s=30, what="the leader to start its child")
    wait_until(lambda: child_pid_file.read_text() != "", timeout_s=5, what="the child pid")
    return process, int(child_pid_file.read_text())


def _kill_9(process: ManagedProcess) -> None:
    pid = process.pid()
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: process.pid() is None, timeout_s=10, what="the leader to die")
    os.waitpid(pid, 0)  # this test started it: collect it


def test_a_child_started_with_die_with_parent_dies_with_a_killed_leader(tmp_path: Path) -> None:
    process, child = _start_leader(tmp_path, die_with_parent=True)
    assert process.members() == sorted([process.pid(), child])

    _kill_9(process)

    wait_until(lambda: process.members() == [], timeout_s=30, what="the child to die too")
    assert process.strays() == []


def test_an_orphan_of_a_killed_leader_is_found_and_stopped(tmp_path: Path) -> None:
    process, child = _start_leader(tmp_path, die_with_parent=False)

    _kill_9(process)

    assert process.pid() is None
    assert process.strays() == [child]
    assert process.stop(timeout_s=5) is True
    assert process.members() == []
    assert not process.pid_file.exists()


def test_an_orphan_that_left_the_group_is_found_by_its_tag(tmp_path: Path) -> None:
    process, child = _start_leader(tmp_path, die_with_parent=False, new_session=True)

    _kill_9(process)

    assert process.strays() == [child]
    process.stop(timeout_s=5)
    assert process.members() == []


def test_starting_again_first_ends_what_the_killed_predecessor_left(tmp_path: Path) -> None:
    process, orphan = _start_leader(tmp_path, die_with_parent=False)
    _kill_9(process)
    (tmp_path / "child.pid").unlink()

    _, new_child = _start_leader(tmp_path, die_with_parent=False)

    assert orphan not in process.members()
    assert sorted(process.members()) == sorted([process.pid(), new_child])
    process.stop(timeout_s=5)
    assert process.members() == []


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
