"""The one declared catalog of Kafka topics, and idempotent provisioning from it.

Every topic loopstream reads or writes is listed here; the broker never auto-creates topics.
Provisioning creates what is missing, brings configs of existing topics in line with the
catalog, and raises partition counts that are too low (Kafka cannot lower them).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from confluent_kafka import KafkaException
from confluent_kafka.admin import (
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    NewPartitions,
    NewTopic,
)

from infra.settings import Settings

DAY_MS = 24 * 60 * 60 * 1000
FOREVER = -1


@dataclass(frozen=True)
class TopicSpec:
    name: str  # without the settings' topic prefix
    partitions: int
    purpose: str
    retention_ms: int = 7 * DAY_MS
    compacted: bool = False
    extra_config: dict[str, str] = field(default_factory=dict)

    def config(self) -> dict[str, str]:
        config = {
            "cleanup.policy": "compact" if self.compacted else "delete",
            "retention.ms": str(self.retention_ms),
            **self.extra_config,
        }
        return config


# Commands and events are keyed by aggregate id, so one aggregate's history is one partition's
# order. Partition counts are for a small deployment; raise them here and re-run provisioning.
CATALOG: tuple[TopicSpec, ...] = (
    TopicSpec(
        "commands",
        partitions=3,
        purpose="commands from the API, the SDK and external producers, keyed by aggregate id",
    ),
    TopicSpec(
        "events",
        partitions=3,
        retention_ms=FOREVER,  # the event log is the source of truth: never expire it
        purpose="every domain event, keyed by aggregate id; the system of record",
    ),
    TopicSpec(
        "command-results",
        partitions=3,
        compacted=True,
        retention_ms=FOREVER,
        purpose="outcome of each command (accepted with events, or rejected), by command_id",
    ),
    TopicSpec(
        "trainer-requests",
        partitions=3,
        retention_ms=DAY_MS,
        purpose="training calls (forward_backward, optim_step, ...) keyed by run_id",
    ),
    TopicSpec(
        "sampler-requests",
        partitions=3,
        retention_ms=DAY_MS,
        purpose="sampling calls keyed by sampler_id",
    ),
    TopicSpec(
        "deployment-traffic",
        partitions=3,
        retention_ms=DAY_MS,
        purpose="the gateway's per-deployment request counts, one record a second per gateway "
        "and deployment with traffic (never one per request): the replica controller's "
        "demand signal and the autoscaler's input",
    ),
    TopicSpec(
        "async-requests",
        partitions=3,
        retention_ms=3 * DAY_MS,  # past the longest max_time_in_queue_seconds (20 h)
        purpose="the gateway's async predict queue: one record per accepted request (with its "
        "input), keyed by deployment id; consumed by the gateways' async workers, whose "
        "group offset moves only past finished requests",
    ),
    TopicSpec(
        "async-requests.dlq",
        partitions=1,
        retention_ms=30 * DAY_MS,
        purpose="async-requests records the gateway's worker could not read, with the reason",
    ),
    TopicSpec(
        "commands.dlq",
        partitions=1,
        retention_ms=30 * DAY_MS,
        purpose="command messages that could not be parsed, with the error and original bytes",
    ),
    TopicSpec(
        "events.dlq",
        partitions=1,
        retention_ms=30 * DAY_MS,
        purpose="events a projection could not apply, with the error, for inspection and replay",
    ),
)


def topic_names(settings: Settings) -> dict[str, str]:
    """Catalog name -> full topic name with the settings' prefix."""
    return {spec.name: settings.topic(spec.name) for spec in CATALOG}


@dataclass
class ProvisionReport:
    created: list[str] = field(default_factory=list)
    reconfigured: list[str] = field(default_factory=list)
    repartitioned: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)


def provision_topics(
    settings: Settings, catalog: tuple[TopicSpec, ...] = CATALOG, *, timeout_s: float = 30.0
) -> ProvisionReport:
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap_servers})
    existing = admin.list_topics(timeout=timeout_s).topics
    report = ProvisionReport()

    missing = [spec for spec in catalog if settings.topic(spec.name) not in existing]
    if missing:
        futures = admin.create_topics(
            [
                NewTopic(
                    settings.topic(spec.name),
                    num_partitions=spec.partitions,
                    replication_factor=1 if _single_node(admin) else 3,
                    config=spec.config(),
                )
                for spec in missing
            ],
            operation_timeout=timeout_s,
        )
        for name, future in futures.items():
            try:
                future.result()
            except KafkaException as exc:
                if exc.args[0].name() != "TOPIC_ALREADY_EXISTS":  # a concurrent provisioner
                    raise
            report.created.append(name)

    for spec in catalog:
        name = settings.topic(spec.name)
        if name not in existing:
            continue
        changed = False
        current_partitions = len(existing[name].partitions)
        if current_partitions < spec.partitions:
            admin.create_partitions([NewPartitions(name, spec.partitions)])[name].result()
            report.repartitioned.append(name)
            changed = True
        if _align_config(admin, name, spec.config(), timeout_s):
            report.reconfigured.append(name)
            changed = True
        if not changed:
            report.unchanged.append(name)
    return report


def _single_node(admin: AdminClient) -> bool:
    return len(admin.list_topics(timeout=10).brokers) < 3


def _align_config(admin: AdminClient, topic: str, wanted: dict[str, str], timeout_s: float) -> bool:
    resource = ConfigResource(ConfigResource.Type.TOPIC, topic)
    current = admin.describe_configs([resource])[resource].result(timeout=timeout_s)
    drift = {k: v for k, v in wanted.items() if k not in current or current[k].value != v}
    if not drift:
        return False
    resource = ConfigResource(
        ConfigResource.Type.TOPIC,
        topic,
        incremental_configs=[
            ConfigEntry(k, v, incremental_operation=AlterConfigOpType.SET) for k, v in drift.items()
        ],
    )
    admin.incremental_alter_configs([resource])[resource].result(timeout=timeout_s)
    return True
