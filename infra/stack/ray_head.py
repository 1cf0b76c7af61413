"""The local Ray head: the cluster deployment replicas run on (docs/serving.md).

`ray start --head --block` runs in the foreground under the stack's process management, so
`stack down` (and a `stack up` after a kill -9) ends the GCS, the raylet and every replica
actor it started: they all carry the head's owner tag (infra/processes.py).

The head offers `ray_local_slots_per_instance_type` units of the custom resource
`loopstream/<instance type>` for each CPU-only instance type, and none for GPU types: a replica
of a GPU deployment stays pending here, as it would on a cluster without such a node. With
`ray_address` set, loopstream uses that cluster and starts no head.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import shutil
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from commands.instance_types import INSTANCE_TYPES
from infra.processes import ManagedProcess, StackError
from infra.ray_cluster import ray_auth_env, ray_token_path
from infra.settings import Settings
from infra.stack.s3 import write_private

# Ray's workers listen on ports of this range (Ray's default, 10002-19999, covers the stack's
# own ports: PostgreSQL 15432, the gateway 18100, Kafka 19092...).
WORKER_PORTS = (21000, 21999)
OBJECT_STORE_BYTES = 512 * 1024 * 1024
# A unix socket path may not exceed 107 bytes; Ray puts its sockets ~80 bytes below temp_dir.
_MAX_TEMP_DIR = 40


def replica_resource(instance_type: str) -> str:
    """The custom Ray resource one replica of `instance_type` takes one unit of."""
    return f"loopstream/{instance_type}"


def local_head_resources(slots: int) -> dict[str, float]:
    return {replica_resource(t.name): float(slots) for t in INSTANCE_TYPES if t.gpu_count == 0}


@dataclass(frozen=True)
class RayHead:
    settings: Settings

    @property
    def temp_dir(self) -> Path:
        preferred = self.settings.data_dir / "ray"
        if len(str(preferred)) <= _MAX_TEMP_DIR:
            return preferred
        digest = hashlib.sha256(str(preferred).encode()).hexdigest()[:12]
        return Path("/tmp") / f"loopstream-ray-{digest}"

    @property
    def process(self) -> ManagedProcess:
        return ManagedProcess(
            name="ray",
            run_dir=self.settings.data_dir / "run",
            log_file=self.settings.data_dir / "logs" / "ray.log",
            signature=f"--temp-dir={self.temp_dir}",
        )

    def ports(self) -> dict[int, str]:
        return {self.settings.ray_port: "LOOPSTREAM_RAY_PORT"}

    def prepare(self) -> None:
        # A session directory of a dead head would be picked up again: start clean.
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        self.temp_dir.mkdir(parents=True, exist_ok=True)
        # Ray's token authentication, with a token of this stack's own (not ~/.ray's, which
        # every Ray program of the user shares): only processes that can read it may connect.
        token = ray_token_path(self.settings)
        if not token.exists():
            write_private(token, secrets.token_hex(32))

    def start(self) -> None:
        s = self.settings
        ray = Path(sys.executable).parent / "ray"
        resources = local_head_resources(s.ray_local_slots_per_instance_type)
        self.process.start(
            [str(ray), "start", "--head", "--block",
             f"--port={s.ray_port}",
             "--node-ip-address=127.0.0.1",
             "--include-dashboard=false",
             "--disable-usage-stats",
             f"--temp-dir={self.temp_dir}",
             f"--resources={json.dumps(resources)}",
             f"--min-worker-port={WORKER_PORTS[0]}",
             f"--max-worker-port={WORKER_PORTS[1]}",
             # Ray would size its shared-memory object store at 30% of RAM; replicas pass
             # requests and tokens, never tensors, through it.
             f"--object-store-memory={OBJECT_STORE_BYTES}"],
            env={"RAY_USAGE_STATS_ENABLED": "0", **ray_auth_env(s)},
        )  # fmt: skip

    def ready(self) -> bool:
        """The GCS answers on its port and the raylet has written its socket."""
        try:
            with socket.create_connection(("127.0.0.1", self.settings.ray_port), timeout=1):
                pass
        except OSError:
            return False
        sessions = sorted(self.temp_dir.glob("session_2*"))
        if not sessions:
            return False
        return (sessions[-1] / "sockets" / "raylet").exists()


def require_ray() -> None:
    if shutil.which("ray", path=str(Path(sys.executable).parent)) is None:
        raise StackError("the `ray` command is missing from the environment: run `make install`")
