"""A private PostgreSQL cluster from Debian's packages, under the project's data dir.

Not the system's default cluster: our own initdb, our own port, TCP on loopback only. PostgreSQL
refuses to run as root, so when the stack is started by root (CI is) the server runs as the
`postgres` system user the Debian package creates.
"""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

from infra.processes import ManagedProcess, StackError, run_as
from infra.settings import Settings

SERVER_USER_WHEN_ROOT = "postgres"


@dataclass(frozen=True)
class PostgresServer:
    settings: Settings

    @property
    def cluster_dir(self) -> Path:
        return self.settings.data_dir / "postgres" / "cluster"

    @property
    def process(self) -> ManagedProcess:
        return ManagedProcess(
            name="postgres",
            run_dir=self.settings.data_dir / "run",
            log_file=self.settings.data_dir / "logs" / "postgres.log",
            signature=str(self.cluster_dir),
            # Backends call setsid() and overwrite their environment with the ps title; they
            # work in the cluster dir, so that is how a killed postmaster's leftovers are found.
            home=self.cluster_dir,
        )

    def ports(self) -> dict[int, str]:
        """Port -> the setting that moves it."""
        return {self.settings.pg_port: "LOOPSTREAM_PG_PORT"}

    def prepare(self) -> None:
        bindir = postgres_bindir()
        user = _server_user()
        if not (self.cluster_dir / "PG_VERSION").exists():
            self._initdb(bindir, user)

    def _initdb(self, bindir: Path, user: str | None) -> None:
        parent = self.cluster_dir.parent
        shutil.rmtree(parent, ignore_errors=True)
        parent.mkdir(parents=True)
        pwfile = parent / "pwfile"
        pwfile.write_text(self.settings.pg_password + "\n")
        if user is not None:
            _make_traversable(parent)
            info = pwd.getpwnam(user)
            for path in (parent, pwfile):
                os.chown(path, info.pw_uid, info.pw_gid)
        result = subprocess.run(
            [str(bindir / "initdb"), "-D", str(self.cluster_dir), "-U", self.settings.pg_user,
             f"--pwfile={pwfile}", "--auth=scram-sha-256", "-E", "UTF8", "--no-locale"],
            capture_output=True, text=True, **run_as(user),
        )  # fmt: skip
        pwfile.unlink(missing_ok=True)
        if result.returncode != 0:
            raise StackError(f"initdb failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")

    def start(self) -> None:
        user = _server_user()
        if user is not None:
            # The log file is opened by us (root) before the switch; the data must be theirs.
            _make_traversable(self.cluster_dir.parent)
        self.process.start(
            [str(postgres_bindir() / "postgres"), "-D", str(self.cluster_dir),
             "-p", str(self.settings.pg_port),
             "-c", f"listen_addresses={self.settings.pg_host}",
             "-c", "unix_socket_directories=",  # TCP only: no socket path length limits
             "-c", "max_connections=200",
             "-c", "shared_buffers=256MB",
             "-c", "max_prepared_transactions=0"],
            user=user,
        )  # fmt: skip

    def ready(self) -> bool:
        """A real `select 1` with the project's credentials, then make sure the database exists."""
        import psycopg

        admin_conninfo = self.settings.pg_conninfo.replace(
            f"dbname={self.settings.pg_database}", "dbname=postgres"
        )
        with psycopg.connect(admin_conninfo, autocommit=True, connect_timeout=2) as conn:
            conn.execute("select 1")
            exists = conn.execute(
                "select 1 from pg_database where datname = %s", (self.settings.pg_database,)
            ).fetchone()
            if not exists:
                conn.execute(f'create database "{self.settings.pg_database}"')
        return True


def postgres_bindir() -> Path:
    """The newest PostgreSQL server installed from Debian's packages."""
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/postgres"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    if not candidates:
        raise StackError(
            "PostgreSQL server binaries not found under /usr/lib/postgresql; install them with "
            "`apt-get install -y postgresql`."
        )
    return candidates[-1].parent


def _server_user() -> str | None:
    """The user to run the server as: ourselves, unless we are root."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(SERVER_USER_WHEN_ROOT)
    except KeyError as exc:
        raise StackError(
            "running as root, PostgreSQL needs an unprivileged user to run as; the "
            f"'{SERVER_USER_WHEN_ROOT}' user comes with `apt-get install -y postgresql`."
        ) from exc
    return SERVER_USER_WHEN_ROOT


def _make_traversable(path: Path) -> None:
    """Let the server user reach its data dir through directories owned by root.

    Adds only the search (x) bit for others on ancestors that lack it: nothing becomes listable or
    readable. A fresh `mktemp -d` clone (mode 700) needs this.
    """
    for ancestor in reversed(path.resolve().parents):
        mode = ancestor.stat().st_mode
        if not mode & stat.S_IXOTH:
            os.chmod(ancestor, mode | stat.S_IXOTH)
