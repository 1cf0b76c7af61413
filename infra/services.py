"""loopstream's own long-running processes on top of the stack: the command processor, the
projection runner and the GPU workers (the API joins them). Started in the background like the
stack's servers, with pid files and logs under the data dir, and stopped by recorded pid, with
every process each one owns (infra/processes.py): a child left running by a service killed with
-9 shows up in `services_strays`, and `up` and `down` end it.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from infra.processes import ManagedProcess, StackError, wait_until
from infra.settings import REPO_ROOT, Settings


def _api_answers() -> bool:
    import httpx

    from api.config import get_api_settings

    return httpx.get(f"{get_api_settings().base_url}/openapi.json", timeout=1).status_code == 200


def _gateway_answers() -> bool:
    import httpx

    from infra.settings import get_settings

    settings = get_settings()
    url = f"http://{settings.gateway_host}:{settings.gateway_port}/healthz"
    return httpx.get(url, timeout=1).status_code == 200


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    module_argv: tuple[str, ...]
    # A real readiness check where "the process runs" is not enough (callers connect to it).
    ready: Callable[[], bool] | None = None


SERVICES: tuple[ServiceSpec, ...] = (
    ServiceSpec("command-processor", ("-m", "commands.processor")),
    ServiceSpec("projections", ("-m", "api.cli", "projections", "run")),
    ServiceSpec("trainer-worker", ("-m", "gpu_workers.trainer_worker")),
    ServiceSpec("sampler-worker", ("-m", "gpu_workers.sampler_worker")),
    ServiceSpec("janitor", ("-m", "commands.janitor")),
    ServiceSpec("api", ("-m", "api.app"), ready=_api_answers),
    # The serving half: replicas on Ray, and the gateway in front of them (docs/serving.md).
    ServiceSpec("replica-controller", ("-m", "gpu_workers.replica_controller")),
    ServiceSpec("gateway", ("-m", "api.gateway"), ready=_gateway_answers),
)


def _process(settings: Settings, spec: ServiceSpec) -> ManagedProcess:
    return ManagedProcess(
        name=spec.name,
        run_dir=settings.data_dir / "run",
        log_file=settings.data_dir / "logs" / f"{spec.name}.log",
        signature=" ".join(spec.module_argv),
    )


def service_log_files(settings: Settings) -> dict[str, Path]:
    """name -> the file its output goes to (`loopstream logs <name>` prints it)."""
    return {spec.name: _process(settings, spec).log_file for spec in SERVICES}


def services_up(settings: Settings) -> dict[str, str]:
    """Start what is not running; returns name -> 'started' | 'already running'.

    Starting a service first ends what a dead predecessor left running (ManagedProcess.start).
    """
    report = {}
    for spec in SERVICES:
        process = _process(settings, spec)
        if process.pid() is not None:
            report[spec.name] = "already running"
            continue
        process.start([sys.executable, *spec.module_argv], cwd=REPO_ROOT)
        report[spec.name] = "started"
    time.sleep(1.0)  # a process that dies on a bad setting dies at once: say so now
    dead = [spec.name for spec in SERVICES if _process(settings, spec).pid() is None]
    if dead:
        tails = "\n".join(f"--- {n}:\n{_process(settings, s).log_tail(15)}" for s in SERVICES
                          for n in [s.name] if n in dead)  # fmt: skip
        raise StackError(f"{', '.join(dead)} exited right after start:\n{tails}")
    for spec in SERVICES:
        if spec.ready is not None:
            process = _process(settings, spec)
            wait_until(
                spec.ready,
                timeout_s=60,
                what=f"{spec.name} to answer (log: {process.log_file})",
                alive=lambda p=process: p.pid() is not None,  # type: ignore[misc]
            )
    return report


def services_down(settings: Settings) -> list[str]:
    """Stop every service, leader and children, and what dead ones left running."""
    return [spec.name for spec in reversed(SERVICES) if _process(settings, spec).stop()]


def services_status(settings: Settings) -> dict[str, int | None]:
    """name -> the pid of its running leader, or None."""
    return {spec.name: _process(settings, spec).pid() for spec in SERVICES}


def services_strays(settings: Settings) -> dict[str, list[int]]:
    """name -> pids still running for a service whose leader is dead (only names that have any).

    `services up` and `services down` stop them; until then they may still consume and write.
    """
    strays = {spec.name: _process(settings, spec).strays() for spec in SERVICES}
    return {name: pids for name, pids in strays.items() if pids}
