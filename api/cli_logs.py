"""`loopstream logs <service>`: the log of any process `stack up` or `services up` started.

The stack's servers (kafka, postgres, s3) and loopstream's services (command-processor,
projections, trainer-worker, sampler-worker, janitor, api) each write one file under
`<data dir>/logs/` (`.loopstream/logs/` by default); loopstream's services write one JSON object
per line (infra/logs.py).
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections import deque
from pathlib import Path

import typer

from infra.cli_output import fail
from infra.settings import Settings, get_settings


def log_files(settings: Settings) -> dict[str, Path]:
    """Every process's log file: the stack's servers first, then loopstream's services."""
    from infra.services import service_log_files
    from infra.stack import LocalStack

    files = {name: s.process.log_file for name, s in LocalStack(settings).services.items()}
    return files | service_log_files(settings)


def _tail(path: Path, lines: int) -> list[str]:
    with path.open(errors="replace") as f:
        return list(deque(f, maxlen=lines))


def show_logs(
    service: str = typer.Argument(
        ...,
        help="kafka, postgres, s3, command-processor, projections, trainer-worker, "
        "sampler-worker, janitor or api",
        show_default=False,
    ),
    lines: int = typer.Option(50, "-n", "--lines", min=0, help="how many lines from the end"),
    follow: bool = typer.Option(False, "-f", "--follow", help="keep printing new lines (Ctrl-C)"),
) -> None:
    """Print the last lines of a process's log (stdout), or follow it."""
    files = log_files(get_settings())
    if service not in files:
        fail(f"unknown service {service!r}; choose one of {', '.join(files)}")
    path = files[service]
    if follow:
        # -F: follows the file across a restart that recreates it; Ctrl-C ends it quietly.
        with contextlib.suppress(KeyboardInterrupt):
            subprocess.run(["tail", "-n", str(lines), "-F", str(path)], check=False)
        return
    if not path.exists():
        fail(f"{service} has no log yet ({path})")
    sys.stdout.writelines(_tail(path, lines) if lines else [])
    sys.stdout.flush()
