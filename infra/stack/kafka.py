"""Apache Kafka in KRaft mode, one node that is both broker and controller, on loopback.

The broker is plain jars from Maven Central run with Java 17: no tarball, no ZooKeeper. The jars
are resolved once per version into the cache dir, so new clones start the broker without a
download.
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from infra.processes import ManagedProcess, StackError
from infra.settings import Settings

MIN_JAVA = 17


@dataclass(frozen=True)
class KafkaBroker:
    settings: Settings

    @property
    def host(self) -> str:
        return self.settings.kafka_bootstrap_servers.split(",")[0].rsplit(":", 1)[0]

    @property
    def port(self) -> int:
        return int(self.settings.kafka_bootstrap_servers.split(",")[0].rsplit(":", 1)[1])

    @property
    def home(self) -> Path:
        return self.settings.data_dir / "kafka"

    @property
    def libs_dir(self) -> Path:
        return self.settings.cache_dir / f"kafka-{self.settings.kafka_version}" / "libs"

    @property
    def process(self) -> ManagedProcess:
        return ManagedProcess(
            name="kafka",
            run_dir=self.settings.data_dir / "run",
            log_file=self.settings.data_dir / "logs" / "kafka.log",
            signature=str(self.home / "server.properties"),
        )

    def ports(self) -> dict[int, str]:
        """Port -> the setting that moves it."""
        return {
            self.port: "LOOPSTREAM_KAFKA_BOOTSTRAP_SERVERS",
            self.settings.kafka_controller_port: "LOOPSTREAM_KAFKA_CONTROLLER_PORT",
        }

    # --- preparing -----------------------------------------------------------------------

    def prepare(self) -> None:
        java = require_java()
        self._fetch_jars()
        self._write_config()
        if not (self.home / "data" / "meta.properties").exists():
            self._format_storage(java)

    def _fetch_jars(self) -> None:
        marker = self.libs_dir / ".complete"
        if marker.exists():
            return
        mvn = shutil.which("mvn")
        if mvn is None:
            raise StackError(
                "Maven (mvn) is needed once to fetch the Kafka broker jars from Maven Central; "
                "install it with `apt-get install -y maven`."
            )
        pom = resources.files("infra.stack").joinpath("resources/kafka-pom.xml").read_text()
        pom = pom.replace("@KAFKA_VERSION@", self.settings.kafka_version)
        staging = Path(tempfile.mkdtemp(prefix="kafka-libs-", dir=self.settings.cache_dir))
        (staging / "pom.xml").write_text(pom)
        result = subprocess.run(
            [mvn, "-q", "-B", "-f", str(staging / "pom.xml"), "dependency:copy-dependencies",
             f"-DoutputDirectory={staging / 'libs'}", "-DincludeScope=runtime"],
            capture_output=True, text=True,
        )  # fmt: skip
        if result.returncode != 0:
            shutil.rmtree(staging, ignore_errors=True)
            raise StackError(
                f"could not resolve org.apache.kafka:kafka_2.13:{self.settings.kafka_version} "
                f"from Maven Central:\n{result.stdout[-2000:]}{result.stderr[-2000:]}"
            )
        self.libs_dir.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.libs_dir, ignore_errors=True)
        os.replace(staging / "libs", self.libs_dir)  # atomic: a half copy is never used
        shutil.rmtree(staging, ignore_errors=True)
        marker.touch()

    def _write_config(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        ctrl = self.settings.kafka_controller_port
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.bootstrap.servers": f"{self.host}:{ctrl}",
            "listeners": f"PLAINTEXT://{self.host}:{self.port},CONTROLLER://{self.host}:{ctrl}",
            "advertised.listeners": f"PLAINTEXT://{self.host}:{self.port}",
            "controller.listener.names": "CONTROLLER",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            "log.dirs": str(self.home / "data"),
            # Single node: every internal topic must accept one replica or transactions and
            # consumer groups never initialise.
            "offsets.topic.replication.factor": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            # Topics come from the declared catalog only (infra/topics.py).
            "auto.create.topics.enable": "false",
            "num.partitions": "1",
            # Dev broker: keep segments small so retention and compaction are observable.
            "log.segment.bytes": str(64 * 1024 * 1024),
            "num.io.threads": "4",
            "num.network.threads": "2",
        }
        text = "".join(f"{k}={v}\n" for k, v in props.items())
        (self.home / "server.properties").write_text(text)
        log4j = resources.files("infra.stack").joinpath("resources/kafka-log4j2.yaml")
        (self.home / "log4j2.yaml").write_text(log4j.read_text())

    def _format_storage(self, java: str) -> None:
        cluster_id = _kafka_uuid()
        result = subprocess.run(
            [*self._java_argv(java, heap="256m"), "kafka.tools.StorageTool", "format",
             "-c", str(self.home / "server.properties"), "-t", cluster_id, "--standalone"],
            capture_output=True, text=True,
        )  # fmt: skip
        if result.returncode != 0:
            raise StackError(
                f"kafka storage format failed (exit {result.returncode}):\n"
                f"{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
            )

    def _java_argv(self, java: str, *, heap: str) -> list[str]:
        return [
            java,
            "-Xms128m",
            f"-Xmx{heap}",
            "-XX:+UseG1GC",
            "-XX:MaxGCPauseMillis=20",
            f"-Dlog4j2.configurationFile={self.home / 'log4j2.yaml'}",
            "-cp",
            f"{self.libs_dir}/*",
        ]

    # --- running -------------------------------------------------------------------------

    def start(self) -> None:
        java = require_java()
        self.process.start(
            [*self._java_argv(java, heap=self.settings.kafka_heap), "kafka.Kafka",
             str(self.home / "server.properties")],
        )  # fmt: skip

    def ready(self) -> bool:
        """A real metadata round trip, not just an open port."""
        from confluent_kafka.admin import AdminClient

        # log_level 0: connection-refused noise while the broker boots is expected here.
        admin = AdminClient(
            {"bootstrap.servers": self.settings.kafka_bootstrap_servers, "log_level": 0}
        )
        metadata = admin.list_topics(timeout=2)
        return len(metadata.brokers) > 0


def require_java() -> str:
    java = shutil.which("java", path=_java_path())
    if java is None:
        raise StackError(
            f"Java {MIN_JAVA}+ is needed to run the Kafka broker; install it with "
            "`apt-get install -y openjdk-17-jre-headless` (or set JAVA_HOME)."
        )
    out = subprocess.run([java, "-version"], capture_output=True, text=True).stderr
    version = _java_major(out)
    if version is not None and version < MIN_JAVA:
        raise StackError(
            f"Kafka {MIN_JAVA}+ needs Java {MIN_JAVA}, found Java {version} at {java}; install "
            "`openjdk-17-jre-headless` or point JAVA_HOME at a newer JDK."
        )
    return java


def _java_path() -> str:
    java_home = os.environ.get("JAVA_HOME")
    path = os.environ.get("PATH", "")
    return f"{java_home}/bin:{path}" if java_home else path


def _java_major(version_output: str) -> int | None:
    # 'openjdk version "17.0.15" 2025-04-15' or 'java version "1.8.0_392"'
    try:
        quoted = version_output.split('"')[1]
    except IndexError:
        return None
    parts = quoted.split(".")
    major = parts[1] if parts[0] == "1" else parts[0]
    return int(major) if major.isdigit() else None


def _kafka_uuid() -> str:
    """A Kafka cluster id: 16 random bytes, URL-safe base64 without padding.

    Like Kafka's own Uuid.randomUuid, never one that starts with '-': the storage tool would
    read it as an option (one id in 64 did, and broke `stack up` at random).
    """
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id
