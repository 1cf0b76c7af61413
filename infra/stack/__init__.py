"""The local stack: Kafka (KRaft), PostgreSQL, an S3 store and a Ray head, all on loopback.

`up` is idempotent and waits for real readiness (a broker metadata round trip, `select 1`, a
signed bucket listing); `down` stops only the processes `up` started, by recorded pid.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from infra.processes import ManagedProcess, StackError, port_in_use, wait_until, who_listens
from infra.settings import Settings
from infra.stack.kafka import KafkaBroker
from infra.stack.postgres import PostgresServer
from infra.stack.ray_head import RayHead
from infra.stack.s3 import S3Server
from infra.topics import ProvisionReport, provision_topics

READY_TIMEOUT_S = 120.0


class Service(Protocol):
    @property
    def process(self) -> ManagedProcess: ...

    def ports(self) -> dict[int, str]: ...

    def prepare(self) -> None: ...

    def start(self) -> None: ...

    def ready(self) -> bool: ...


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    pid: int | None
    ready: bool
    endpoint: str


@dataclass
class UpReport:
    already_running: list[str]
    started: list[str]
    topics: ProvisionReport


class LocalStack:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.services: dict[str, Service] = {
            "kafka": KafkaBroker(settings),
            "postgres": PostgresServer(settings),
            "s3": S3Server(settings),
        }
        if settings.ray_local_head and not settings.ray_address:
            self.services["ray"] = RayHead(settings)

    def endpoints(self) -> dict[str, str]:
        s = self.settings
        return {
            "kafka": s.kafka_bootstrap_servers,
            "postgres": f"{s.pg_host}:{s.pg_port}/{s.pg_database}",
            "s3": f"{'https' if s.s3_secure else 'http'}://{s.s3_endpoint}/{s.checkpoint_bucket}",
            "ray": s.ray_cluster_address,
        }

    def up(self) -> UpReport:
        already: list[str] = []
        to_start: list[str] = []
        for name, service in self.services.items():
            (already if service.process.pid() is not None else to_start).append(name)
        for name in to_start:
            self._check_ports_free(name, self.services[name])
        for name in to_start:
            self.services[name].prepare()
        for name in to_start:
            self.services[name].start()
        # Start everything first, then wait: the servers boot in parallel.
        for name, service in self.services.items():
            wait_until(
                service.ready,
                timeout_s=READY_TIMEOUT_S,
                what=f"{name} to be ready (log: {service.process.log_file})",
                alive=_is_alive(service),
            )
        topics = provision_topics(self.settings)
        return UpReport(already_running=already, started=to_start, topics=topics)

    def down(self) -> list[str]:
        stopped = []
        for name, service in reversed(self.services.items()):
            if service.process.stop():
                stopped.append(name)
        return stopped

    def status(self) -> list[ServiceStatus]:
        endpoints = self.endpoints()
        result = []
        for name, service in self.services.items():
            pid = service.process.pid()
            ready = False
            if pid is not None:
                try:
                    ready = service.ready()
                except Exception:
                    ready = False
            result.append(ServiceStatus(name, pid, ready, endpoints[name]))
        return result

    def _check_ports_free(self, name: str, service: Service) -> None:
        for port, setting in service.ports().items():
            if port_in_use("127.0.0.1", port):
                raise StackError(
                    f"cannot start {name}: port {port} is already taken by {who_listens(port)}. "
                    f"Stop that process, or move {name} with {setting}."
                )


def _is_alive(service: Service) -> Callable[[], bool]:
    return lambda: service.process.pid() is not None


__all__ = ["LocalStack", "ServiceStatus", "StackError", "UpReport"]
