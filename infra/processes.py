"""Start, find and stop the local stack's server processes by recorded pid.

`down` must stop only what `up` started, so every server we launch gets a pid file under the data
dir, and a pid is trusted only while that process's command line still names the program we
started (pids are reused).

A server is more than its recorded pid: it may have children (the projections service runs its
runner in a child). So every server leads its own process group (pgid = the recorded pid), carries
an owner tag in its environment that its children inherit, and children that a server spawns die
with it (`die_with_parent`). `members()` finds all of them by scanning /proc, even when the leader
was killed with -9, so `status` can report what was left behind and `stop` ends all of it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pwd
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class StackError(RuntimeError):
    """A problem starting the stack that the user can fix; the message says how."""


# Environment variable every managed server (and so every child it spawns) carries: the path of
# its pid file, which names both the data dir and the server.
OWNER_ENV = "LOOPSTREAM_OWNED_BY"


@dataclass(frozen=True)
class ProcInfo:
    """What /proc says about one live (non-zombie) process."""

    pid: int
    pgid: int
    cmdline: str
    environ: bytes | None  # None: not ours to read (another user's process)
    cwd: str | None = None  # None: not ours to read


def owned_pids(
    procs: Iterable[ProcInfo],
    *,
    recorded: int | None,
    owner_tag: str,
    signature: str,
    home: Path | None = None,
) -> list[int]:
    """The pids a managed server owns: the leader's process group and anything with its tag.

    A process group counts only when one of its members proves it is ours: it carries our tag,
    or it is the recorded leader still running our program (a recorded pid whose group died may
    be reused as another program's group id). The signature alone proves nothing: the same
    service of another data dir runs the same command line. A process with our tag counts even
    outside the group (a child that called setsid).

    `home` serves servers whose children leave the group and wipe their environment (PostgreSQL's
    backends do both, for their ps titles): a process working in it is ours.
    """
    tag = f"{OWNER_ENV}={owner_tag}".encode()

    def marked(proc: ProcInfo) -> bool:
        if proc.pid == recorded and signature in proc.cmdline:
            return True
        if home is not None and proc.cwd is not None and Path(proc.cwd).is_relative_to(home):
            return True
        return proc.environ is not None and tag in proc.environ.split(b"\0")

    procs = list(procs)
    group = [p for p in procs if recorded is not None and p.pgid == recorded]
    ours = {p.pid for p in procs if marked(p)}
    if any(p.pid in ours for p in group):
        ours |= {p.pid for p in group}
    return sorted(ours)


def scan_processes() -> list[ProcInfo]:
    """Every live process on the host, from /proc (zombies left out: they run nothing)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError):
            continue  # exited while we looked
        if fields[0] in ("Z", "X"):
            continue
        try:
            environ: bytes | None = (entry / "environ").read_bytes()
        except OSError:
            environ = None
        try:
            cwd: str | None = os.readlink(entry / "cwd")
        except OSError:
            cwd = None
        found.append(ProcInfo(int(entry.name), int(fields[2]), cmdline, environ, cwd))
    return found


PR_SET_PDEATHSIG = 1


def die_with_parent() -> Callable[[], None]:
    """A `preexec_fn` for subprocess.Popen: the child gets SIGKILL when its parent dies.

    Without it a child outlives a parent killed with -9 (it is re-parented to pid 1) and keeps
    running unsupervised: a second copy after the next `services up`. libc is looked up here, in
    the parent, so the child only makes two system calls between fork and exec.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    parent = os.getpid()

    def in_child() -> None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        # The parent may have died between fork and prctl: then no signal will ever come.
        if os.getppid() != parent:
            os._exit(1)

    return in_child


@dataclass(frozen=True)
class ManagedProcess:
    name: str
    run_dir: Path  # holds <name>.pid
    log_file: Path
    # A substring of the command line that identifies our process (guards against pid reuse).
    signature: str
    # A directory only this server works in: any process whose cwd is in it is the server's.
    home: Path | None = None

    @property
    def pid_file(self) -> Path:
        return self.run_dir / f"{self.name}.pid"

    @property
    def owner_tag(self) -> str:
        return str(self.pid_file)

    def recorded_pid(self) -> int | None:
        try:
            return int(self.pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def members(self) -> list[int]:
        """Every live process of this server: the leader, its children, and what they left."""
        return owned_pids(
            scan_processes(),
            recorded=self.recorded_pid(),
            owner_tag=self.owner_tag,
            signature=self.signature,
            home=self.home,
        )

    def strays(self) -> list[int]:
        """Processes of this server that run without their leader (it died, e.g. kill -9)."""
        return [] if self.pid() is not None else self.members()

    def pid(self) -> int | None:
        """The pid of our running process (the leader), or None if it is not running."""
        pid = self.recorded_pid()
        if pid is None:
            return None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            return None
        if self.signature not in cmdline:
            return None
        try:  # a zombie still has a cmdline; it is not running
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return None
        return None if state == "Z" else pid

    def start(
        self,
        argv: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        user: str | None = None,
    ) -> int:
        # What a killed predecessor left behind would run next to the new one: end it first.
        if self.members():
            self.stop()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "ab") as log:
            proc = subprocess.Popen(
                list(argv),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {}), OWNER_ENV: self.owner_tag},
                cwd=cwd,
                **run_as(user),
                # Own session and process group (pgid = its pid): the server outlives this CLI,
                # ignores the terminal's Ctrl-C, and its children are found by their group.
                start_new_session=True,
            )
        self.pid_file.write_text(str(proc.pid))
        return proc.pid

    def stop(self, timeout_s: float = 30.0) -> bool:
        """SIGTERM, wait, then SIGKILL, for every member. Returns True if anything was stopped.

        The leader is asked first, so it can stop its children in order; members it leaves
        behind, or that run without a leader, get SIGTERM themselves; after `timeout_s` every
        member left gets SIGKILL.
        """
        leader = self.pid()
        if not self.members():
            self.pid_file.unlink(missing_ok=True)
            return False
        asked: set[int] = set()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if leader is not None:
                _reap(leader)
            members = self.members()
            if not members:
                break
            targets = [leader] if leader in members else members
            for pid in targets:
                if pid not in asked:
                    _signal(pid, signal.SIGTERM)
                    asked.add(pid)
            time.sleep(0.2)
        for pid in self.members():
            _signal(pid, signal.SIGKILL)
        if leader is not None:
            _reap(leader)
        wait_until(lambda: not self.members(), timeout_s=10, what=f"{self.name} to die")
        self.pid_file.unlink(missing_ok=True)
        return True

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log yet)"


def run_as(user: str | None) -> dict[str, Any]:
    """subprocess keyword arguments that drop to `user` with only that user's own group.

    Switching the uid alone would keep root's groups, and then directories that are open to
    'others' but not to group root stay closed to the child.
    """
    if user is None:
        return {}
    gid = pwd.getpwnam(user).pw_gid
    return {"user": user, "group": gid, "extra_groups": [gid]}


def _signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # it exited since we looked
        os.kill(pid, signum)


def _reap(pid: int) -> None:
    # If this very process started the server (tests do), collect it so it does not linger as a
    # zombie that still shows up in /proc.
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def who_listens(port: int) -> str:
    """Best-effort 'pid/name' of whatever listens on a TCP port, for error messages."""
    try:
        out = subprocess.run(
            ["ss", "-ltnpH", f"sport = :{port}"], capture_output=True, text=True, timeout=5
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown process"
    return out.split("users:")[-1].strip() if "users:" in out else "unknown process"


def wait_until(
    check: Callable[[], bool],
    *,
    timeout_s: float,
    what: str,
    interval_s: float = 0.25,
    alive: Callable[[], bool] | None = None,
) -> None:
    """Poll `check` until it is true; fail early if `alive` says the server died."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:  # not ready yet is any error
            pass
        if alive is not None and not alive():
            raise StackError(f"gave up waiting for {what}: the process exited")
        time.sleep(interval_s)
    raise StackError(f"timed out after {timeout_s:.0f}s waiting for {what}")
