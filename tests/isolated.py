"""Isolated copies of loopstream for destructive tests: services of their own, a stack of its own.

A test that kills a worker, the API or a broker must never touch what other tests (and other
engineers) use, so:

- `IsolatedServices` runs a full set of loopstream's processes (command processor, projections,
  trainer and sampler workers, janitor, API) as separate processes on a Kafka/PostgreSQL/S3 that
  may be shared: a topic prefix of their own (so their consumer groups and transactional ids
  differ too), a PostgreSQL database of their own migrated to head (the read models' schema is
  the projection's name, `loops`, inside it), their own API port, instance ids, pid files and
  logs under a temporary dir.
- `IsolatedStack` is a whole local stack (Kafka KRaft, PostgreSQL, SeaweedFS) with its own data
  dir and ports, for the tests that stop the broker, the database or the S3 store.

Both are plain context managers; the pytest fixtures that use them live next to the tests.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psycopg

from infra.processes import ManagedProcess, StackError, port_in_use, wait_until
from infra.ray_cluster import ray_token_path
from infra.services import SERVICES, ServiceSpec
from infra.settings import REPO_ROOT, Settings
from infra.stack import LocalStack
from infra.topics import provision_topics
from projections.db import engine_for, migrate

ALL_SERVICES: tuple[str, ...] = tuple(spec.name for spec in SERVICES)
# The Loops half: what a copy runs unless asked for more. The serving half (replica controller,
# gateway) connects to the shared stack's Ray head; only tests of it start it.
LOOPS_SERVICES: tuple[str, ...] = tuple(
    name for name in ALL_SERVICES if name not in ("replica-controller", "gateway")
)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def env_of(settings: Settings, *names: str) -> dict[str, str]:
    """`LOOPSTREAM_*` variables that make a subprocess build the same settings for `names`."""
    return {f"LOOPSTREAM_{name.upper()}": str(getattr(settings, name)) for name in names}


# The settings an isolated copy changes; a subprocess gets them all as environment variables.
_STACK_FIELDS = (
    "kafka_bootstrap_servers",
    "pg_host",
    "pg_port",
    "pg_database",
    "s3_endpoint",
    "checkpoint_bucket",
)
_SERVICE_FIELDS = ("topic_prefix", "processor_instance_id", "worker_instance_id")


# --- services ---------------------------------------------------------------------------------


@dataclass
class IsolatedServices:
    """loopstream's processes for one test module or session, on a stack that may be shared."""

    settings: Settings
    root: Path  # pid files and logs
    api_port: int
    names: tuple[str, ...] = LOOPS_SERVICES
    gateway_port: int = 0
    # Extra environment of every process (fault-injection knobs, log levels).
    extra_env: dict[str, str] = field(default_factory=dict)
    # The default workspace's admin key of this copy (issued once the API runs).
    api_key: str | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def env(self) -> dict[str, str]:
        return {
            **env_of(self.settings, *_STACK_FIELDS, *_SERVICE_FIELDS),
            # The services keep nothing of the stack's in the data dir: theirs is their own.
            "LOOPSTREAM_DATA_DIR": str(self.root),
            "LOOPSTREAM_API_HOST": "127.0.0.1",
            "LOOPSTREAM_API_PORT": str(self.api_port),
            "LOOPSTREAM_API_BASE_URL": self.base_url,
            "LOOPSTREAM_GATEWAY_PORT": str(self.gateway_port),
            # Replicas run on the stack's Ray head, in a namespace of this copy's (topic prefix).
            "LOOPSTREAM_RAY_AUTH_TOKEN_PATH": str(ray_token_path(self.settings)),
            "PYTHONUNBUFFERED": "1",
            **self.extra_env,
        }

    def process(self, name: str) -> ManagedProcess:
        spec = self._spec(name)
        return ManagedProcess(
            name=name,
            run_dir=self.root / "run",
            log_file=self.root / "logs" / f"{name}.log",
            signature=" ".join(spec.module_argv),
        )

    def pid(self, name: str) -> int | None:
        return self.process(name).pid()

    def up(self, *, timeout_s: float = 120.0) -> list[str]:
        """Start every service that is not running (like `services up`); wait for the API."""
        started = []
        for name in self.names:
            process = self.process(name)
            if process.pid() is None:
                process.start(
                    [sys.executable, *self._spec(name).module_argv], env=self.env, cwd=REPO_ROOT
                )
                started.append(name)
        if "api" in self.names:
            api = self.process("api")
            wait_until(
                self.api_answers,
                timeout_s=timeout_s,
                what=f"the isolated API to answer (log: {api.log_file})",
                alive=lambda: api.pid() is not None,
            )
        return started

    def api_answers(self) -> bool:
        return httpx.get(f"{self.base_url}/healthz", timeout=1).status_code == 200

    def kill(self, name: str, sig: int = signal.SIGKILL) -> int:
        """Send `sig` to the service's recorded pid only (an OOM kill hits one pid); returns it
        once that process is gone."""
        process = self.process(name)
        pid = process.pid()
        if pid is None:
            raise StackError(f"isolated {name} is not running (log: {process.log_file})")
        os.kill(pid, sig)
        wait_until(lambda: process.pid() is None, timeout_s=30, what=f"{name} ({pid}) to die")
        _reap(pid)
        return pid

    def down(self) -> None:
        """Stop every process this copy started, children included (each runs in a process
        group of its own), so nothing outlives the tests."""
        pids = [pid for name in self.names if (pid := self.pid(name)) is not None]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(_group_alive(pid) for pid in pids):
            for pid in pids:
                _reap(pid)
            time.sleep(0.2)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            _reap(pid)

    def log_tails(self, lines: int = 30) -> str:
        """The last lines of every service's log, without librdkafka's connection noise (lines
        starting with '%'), which drowns everything else while a broker is down."""
        tails = []
        for name in self.names:
            log_file = self.process(name).log_file
            try:
                text = log_file.read_text(errors="replace").splitlines()
            except FileNotFoundError:
                text = []
            kept = [line for line in text if not line.startswith("%")][-lines:]
            tails.append(f"--- {name} ({log_file}):\n" + "\n".join(kept))
        return "\n".join(tails)

    def log_count(self, name: str, needle: str) -> int:
        """How many lines of the service's log contain `needle` (across its restarts)."""
        try:
            text = self.process(name).log_file.read_text(errors="replace")
        except FileNotFoundError:
            return 0
        return sum(needle in line for line in text.splitlines())

    @staticmethod
    def _spec(name: str) -> ServiceSpec:
        return next(spec for spec in SERVICES if spec.name == name)


@contextlib.contextmanager
def isolated_services(
    settings: Settings,
    root: Path,
    *,
    names: Iterable[str] = LOOPS_SERVICES,
    extra_env: dict[str, str] | None = None,
) -> Iterator[IsolatedServices]:
    """A set of loopstream's services with topics, a database, ids and an API port of their own,
    on the stack `settings` points at; stopped and their database dropped at the end."""
    token = uuid.uuid4().hex[:10]
    database = f"test_iso_{token}"
    admin = settings.pg_conninfo.replace(f"dbname={settings.pg_database}", "dbname=postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'create database "{database}"')
    local = settings.model_copy(
        update={
            # Pid files, logs and the default key file; the stack's own data stays where it is.
            "data_dir": root,
            # The stack's Ray token stays where the stack keeps it.
            "ray_auth_token_path": ray_token_path(settings),
            "topic_prefix": f"test-iso-{token}",
            "pg_database": database,
            "processor_instance_id": f"iso-{token}",
            "worker_instance_id": f"iso-{token}",
        }
    )
    services = IsolatedServices(
        settings=local,
        root=root,
        api_port=free_port(),
        gateway_port=free_port(),
        names=tuple(names),
        extra_env=dict(extra_env or {}),
    )
    try:
        provision_topics(local)
        migrate(local)
        services.up()
        if {"api", "command-processor", "projections"} <= set(services.names):
            from api.bootstrap import ensure_default_key

            services.api_key = ensure_default_key(local)  # as `services up` does
        yield services
    finally:
        services.down()
        engine_for(local.pg_dsn).dispose()
        with (
            contextlib.suppress(psycopg.Error),
            psycopg.connect(admin, autocommit=True, connect_timeout=10) as conn,
        ):
            conn.execute(f'drop database if exists "{database}" with (force)')


# --- a whole stack ----------------------------------------------------------------------------


def _stack_ports(settings: Settings) -> list[int]:
    """Every port the stack of `settings` listens on (SeaweedFS adds gRPC at port + 10000)."""
    stack = LocalStack(settings)
    return sorted({port for service in stack.services.values() for port in service.ports()})


def isolated_stack_settings(base: Settings, data_dir: Path) -> Settings:
    """The base settings moved to `data_dir` and to ports that are all free right now.

    The ports are the base ones shifted by a common offset, so the isolated stack's log lines are
    easy to tell apart (19092 -> 29092 ...); the next offset is tried when one is taken.
    """
    kafka_port = int(base.kafka_bootstrap_servers.split(",")[0].rsplit(":", 1)[1])
    s3_host, s3_port = base.s3_endpoint.rsplit(":", 1)
    for shift in (10_000, 11_000, 12_000, 13_000, 14_000, -3_000, -4_000):
        candidate = base.model_copy(
            update={
                "data_dir": data_dir,
                "kafka_bootstrap_servers": f"127.0.0.1:{kafka_port + shift}",
                "kafka_controller_port": base.kafka_controller_port + shift,
                # A second broker on a 2-core machine: a small heap is plenty for tests.
                "kafka_heap": "384m",
                "pg_port": base.pg_port + shift,
                "s3_endpoint": f"{s3_host}:{int(s3_port) + shift}",
                "seaweed_master_port": base.seaweed_master_port + shift,
                "seaweed_volume_port": base.seaweed_volume_port + shift,
                "seaweed_filer_port": base.seaweed_filer_port + shift,
                "seaweed_admin_port": base.seaweed_admin_port + shift,
                # These tests stop and restart Kafka, PostgreSQL and S3; none serves a model.
                # Services that need Ray use the shared stack's head (and its token).
                "ray_local_head": False,
                "ray_auth_token_path": ray_token_path(base),
            }
        )
        ports = _stack_ports(candidate)
        if all(0 < p < 65536 for p in ports) and not any(
            port_in_use("127.0.0.1", p) for p in ports
        ):
            return candidate
    raise StackError("no free set of ports for an isolated stack")


@dataclass
class IsolatedStack:
    settings: Settings

    @property
    def stack(self) -> LocalStack:
        return LocalStack(self.settings)

    def process(self, name: str) -> ManagedProcess:
        return self.stack.services[name].process

    def stop(self, name: str, sig: int = signal.SIGTERM) -> None:
        """Stop one server of the stack (kafka, postgres, s3) and wait until it is gone.

        PostgreSQL takes SIGINT (fast shutdown: its SIGTERM waits for every client to leave).
        """
        process = self.process(name)
        pid = process.pid()
        if pid is None:
            return
        os.kill(pid, signal.SIGINT if name == "postgres" and sig == signal.SIGTERM else sig)
        wait_until(lambda: process.pid() is None, timeout_s=60, what=f"{name} to stop")
        _reap(pid)

    def start(self, name: str, *, timeout_s: float = 120.0) -> None:
        """Start one stopped server again and wait for its readiness check."""
        service = self.stack.services[name]
        if service.process.pid() is None:
            service.start()
        wait_until(
            service.ready,
            timeout_s=timeout_s,
            what=f"isolated {name} to be ready (log: {service.process.log_file})",
            alive=lambda: service.process.pid() is not None,
        )


@contextlib.contextmanager
def isolated_stack(base: Settings, data_dir: Path) -> Iterator[IsolatedStack]:
    """A whole local stack of its own (data dir, ports), up for the block, then stopped."""
    settings = isolated_stack_settings(base, data_dir)
    isolated = IsolatedStack(settings)
    try:
        isolated.stack.up()
        yield isolated
    finally:
        isolated.stack.down()


# --- helpers ----------------------------------------------------------------------------------


def _reap(pid: int) -> None:
    # The test process started these servers: collect them so they do not linger as zombies.
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def _group_alive(pgid: int) -> bool:
    """Whether any live (not zombie) process is left in the process group.

    Signal 0 is not enough: an orphaned child that init has not collected yet is a zombie that
    still counts as a member.
    """
    _reap(pgid)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False
