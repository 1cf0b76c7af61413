"""Start, find and stop the local stack's server processes by recorded pid.

`down` must stop only what `up` started, so every server we launch gets a pid file under the data
dir, and a pid is trusted only while that process's command line still names the program we
started (pids are reused).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class StackError(RuntimeError):
    """A problem starting the stack that the user can fix; the message says how."""


@dataclass(frozen=True)
class ManagedProcess:
    name: str
    run_dir: Path  # holds <name>.pid
    log_file: Path
    # A substring of the command line that identifies our process (guards against pid reuse).
    signature: str

    @property
    def pid_file(self) -> Path:
        return self.run_dir / f"{self.name}.pid"

    def pid(self) -> int | None:
        """The pid of our running process, or None if it is not running."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
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
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "ab") as log:
            proc = subprocess.Popen(
                list(argv),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {})},
                cwd=cwd,
                **run_as(user),
                # Own session: the server outlives this CLI and ignores the terminal's Ctrl-C.
                start_new_session=True,
            )
        self.pid_file.write_text(str(proc.pid))
        return proc.pid

    def stop(self, timeout_s: float = 30.0) -> bool:
        """SIGTERM, wait, then SIGKILL. Returns True if a process was stopped."""
        pid = self.pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            return False
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.pid() is not None:
            _reap(pid)
            time.sleep(0.2)
        if self.pid() is not None:
            os.killpg(pid, signal.SIGKILL)
            wait_until(lambda: self.pid() is None, timeout_s=10, what=f"{self.name} to die")
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
