"""`loopstream api --port N` says at once that it is starting, and again when it listens."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import httpx

from infra.settings import Settings


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_the_api_command_announces_its_start_and_when_it_listens(settings: Settings) -> None:
    port = _free_port()
    started = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, "-m", "api.cli", "api", "--port", str(port)],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert process.stderr is not None
        first = process.stderr.readline()
        first_after_s = time.monotonic() - started
        assert f"starting the API on http://127.0.0.1:{port}" in first
        # Before the app's modules load (seconds): only the CLI's own import comes first.
        assert first_after_s < 4, f"the first line took {first_after_s:.1f} s"
        while "listening on" not in (line := process.stderr.readline()):
            assert line, f"the API exited (rc {process.poll()}) without listening"
        assert f"http://127.0.0.1:{port}" in line
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code == 200
    finally:
        process.terminate()
        process.wait(timeout=30)
