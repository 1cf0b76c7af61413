"""The command processor: the single writer of events, exactly once, per commands partition.

Loop: consume a batch of commands -> for each, `handle_command` against the in-memory state of
its aggregate -> in ONE Kafka transaction produce the events, the command results (and dead
letters), and commit the consumed offsets (`send_offsets_to_transaction`). The in-memory state is
only updated after the commit succeeds; an aborted batch is thrown away and re-read.

Partitions line up: commands in partition p produce events, results and dead letters for
partition p, so a processor that is assigned partition p rebuilds exactly the aggregates it owns
by reading events p (and results p, for idempotency) to their end.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient

from commands.envelope import CommandResult
from commands.handling import Accepted, Duplicate, Refused, Undeliverable, handle_command
from commands.registry import AGGREGATES, AggregateSpec
from events.envelope import EventEnvelope, utc_now
from events.ids import new_event_id
from events.kafka_log import consumer_config, partition_for, producer_config, read_partition
from infra.settings import Settings

log = logging.getLogger("loopstream.command_processor")


@dataclass
class PartitionState:
    """What the processor knows about the aggregates of one partition, as last committed."""

    states: dict[str, Any] = field(default_factory=dict)
    seen: dict[str, CommandResult] = field(default_factory=dict)  # command_id -> result


@dataclass
class BatchStats:
    commands: int = 0
    accepted: int = 0
    rejected: int = 0
    duplicates: int = 0
    dead_letters: int = 0
    forwarded: int = 0
    events: int = 0


class CommandProcessor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.commands_topic = settings.topic("commands")
        self.events_topic = settings.topic("events")
        self.results_topic = settings.topic("command-results")
        self.dlq_topic = settings.topic("commands.dlq")
        self.partitions: dict[int, PartitionState] = {}
        self.partition_count = self._check_partitions_line_up()
        self.stop_requested = threading.Event()
        self.totals = BatchStats()

        self.producer = self._new_producer()
        self.consumer = Consumer(
            consumer_config(
                settings,
                group_id=self.group_id,
                # Static membership: a restarted instance takes its partitions straight back
                # instead of waiting out the dead member's session.
                **{"group.instance.id": self.transactional_id, "session.timeout.ms": 10_000},
            )
        )
        self.consumer.subscribe(
            [self.commands_topic], on_assign=self._on_assign, on_revoke=self._on_revoke
        )

    # --- lifecycle -------------------------------------------------------------------------

    def run(self) -> None:
        log.info("command processor started", extra={"instance": self.transactional_id})
        try:
            while not self.stop_requested.is_set():
                messages = self.consumer.consume(
                    num_messages=self.settings.processor_batch_size,
                    timeout=self.settings.processor_batch_timeout_s,
                )
                if messages:
                    self.process_batch(messages)
        finally:
            self.close()

    def close(self) -> None:
        self.consumer.close()
        self.producer.flush(10)
        log.info("command processor stopped", extra={"totals": vars(self.totals)})

    @property
    def group_id(self) -> str:
        # Per topic prefix: environments sharing a cluster never share a consumer group.
        return f"{self.settings.topic_prefix}-command-processor"

    @property
    def transactional_id(self) -> str:
        return f"{self.group_id}-{self.settings.processor_instance_id}"

    def _new_producer(self) -> Producer:
        producer = Producer(producer_config(self.settings, transactional_id=self.transactional_id))
        # Fences any earlier producer with our transactional.id and aborts its open transaction.
        producer.init_transactions(60)
        return producer

    def _check_partitions_line_up(self) -> int:
        admin = AdminClient({"bootstrap.servers": self.settings.kafka_bootstrap_servers})
        topics = admin.list_topics(timeout=30).topics
        names = (self.commands_topic, self.events_topic, self.results_topic)
        counts = {name: len(topics[name].partitions) for name in names if name in topics}
        if len(counts) < len(names):
            missing = sorted(set(names) - set(counts))
            raise RuntimeError(f"topics missing: {missing}; run `loopstream stack topics`")
        if len(set(counts.values())) != 1:
            raise RuntimeError(f"commands, events and results need equal partitions: {counts}")
        return counts[self.commands_topic]

    # --- partition ownership ---------------------------------------------------------------

    def _on_assign(self, consumer: Consumer, assigned: list[TopicPartition]) -> None:
        for tp in assigned:
            started = time.monotonic()
            self.partitions[tp.partition] = self.rebuild_partition(tp.partition)
            log.info(
                "partition rebuilt",
                extra={
                    "partition": tp.partition,
                    "aggregates": len(self.partitions[tp.partition].states),
                    "seconds": round(time.monotonic() - started, 3),
                },
            )

    def _on_revoke(self, consumer: Consumer, revoked: list[TopicPartition]) -> None:
        for tp in revoked:
            self.partitions.pop(tp.partition, None)

    def rebuild_partition(self, partition: int) -> PartitionState:
        """Aggregate states from the events of this partition, idempotency from its results."""
        rebuilt = PartitionState()
        for message in read_partition(self.settings, self.events_topic, partition):
            envelope = EventEnvelope.from_bytes(message.value())
            spec = AGGREGATES[envelope.aggregate_type]
            state = rebuilt.states.get(envelope.aggregate_id) or spec.initial_state(
                envelope.aggregate_id
            )
            if envelope.sequence != state.version + 1:
                log.error(
                    "sequence gap in the event log",
                    extra={"aggregate_id": envelope.aggregate_id, "sequence": envelope.sequence},
                )
            rebuilt.states[envelope.aggregate_id] = spec.apply(state, envelope)
        for message in read_partition(self.settings, self.results_topic, partition):
            result = CommandResult.model_validate_json(message.value())
            rebuilt.seen[result.command_id] = result
        return rebuilt

    # --- one batch, one transaction ---------------------------------------------------------

    def process_batch(self, messages: list[Message]) -> BatchStats:
        # Decisions in this batch see the batch's earlier effects through these overlays; they
        # become the committed state only once Kafka has committed the transaction.
        pending_states: dict[tuple[int, str], Any] = {}
        pending_seen: dict[tuple[int, str], CommandResult] = {}
        stats = BatchStats()
        self.producer.begin_transaction()
        try:
            for message in messages:
                if message.error() is not None:
                    if message.error().code() != KafkaError._PARTITION_EOF:
                        log.warning("consume error", extra={"error": str(message.error())})
                    continue
                stats.commands += 1
                self._process_one(message, pending_states, pending_seen, stats)
            if self.settings.processor_commit_delay_ms:
                self.producer.flush(30)
                time.sleep(self.settings.processor_commit_delay_ms / 1000)
            self.producer.send_offsets_to_transaction(
                self.consumer.position(self.consumer.assignment()),
                self.consumer.consumer_group_metadata(),
            )
            self._commit()
        except KafkaException as exc:
            self._recover(exc)
            return BatchStats()
        for (partition, aggregate_id), state in pending_states.items():
            self.partitions[partition].states[aggregate_id] = state
        for (partition, command_id), result in pending_seen.items():
            self.partitions[partition].seen[command_id] = result
        self._count(stats)
        return stats

    def _process_one(
        self,
        message: Message,
        pending_states: dict[tuple[int, str], Any],
        pending_seen: dict[tuple[int, str], CommandResult],
        stats: BatchStats,
    ) -> None:
        partition = message.partition()
        key = message.key()
        if key is not None and partition_for(key, self.partition_count) != partition:
            # Produced with another partitioner: hand it to the partition that owns its
            # aggregate, or two processors would both think they own it.
            self.producer.produce(
                self.commands_topic,
                key=key,
                value=message.value(),
                headers=message.headers(),
                partition=partition_for(key, self.partition_count),
            )
            stats.forwarded += 1
            return
        owned = self.partitions[partition]

        def load_state(spec: AggregateSpec, aggregate_id: str) -> Any:
            pending = pending_states.get((partition, aggregate_id))
            if pending is not None:
                return pending
            return owned.states.get(aggregate_id) or spec.initial_state(aggregate_id)

        outcome = handle_command(
            message.value(),
            key=key,
            load_state=load_state,
            previous_result=lambda command_id: (
                pending_seen.get((partition, command_id)) or owned.seen.get(command_id)
            ),
            now=utc_now(),
            new_event_id=new_event_id,
        )
        if isinstance(outcome, Undeliverable):
            self._dead_letter(message, outcome.reason)
            stats.dead_letters += 1
        elif isinstance(outcome, Duplicate):
            stats.duplicates += 1
        elif isinstance(outcome, Refused):
            self._produce_result(outcome.result, partition)
            pending_seen[(partition, outcome.result.command_id)] = outcome.result
            stats.rejected += 1
        elif isinstance(outcome, Accepted):
            for envelope in outcome.events:
                self.producer.produce(
                    self.events_topic,
                    key=envelope.aggregate_id.encode(),
                    value=envelope.to_bytes(),
                    headers=envelope.kafka_headers(),
                    partition=partition,
                )
            self._produce_result(outcome.result, partition)
            aggregate_id = outcome.result.aggregate_id or ""
            pending_states[(partition, aggregate_id)] = outcome.state
            pending_seen[(partition, outcome.result.command_id)] = outcome.result
            stats.accepted += 1
            stats.events += len(outcome.events)

    def _produce_result(self, result: CommandResult, partition: int) -> None:
        self.producer.produce(
            self.results_topic,
            key=result.command_id.encode(),
            value=result.to_bytes(),
            partition=partition,
        )

    def _dead_letter(self, message: Message, reason: str) -> None:
        log.warning(
            "command dead-lettered",
            extra={"partition": message.partition(), "offset": message.offset(), "reason": reason},
        )
        self.producer.produce(
            self.dlq_topic,
            key=message.key(),
            value=message.value(),
            headers=[
                ("error", reason.encode()),
                ("source_topic", self.commands_topic.encode()),
                ("source_partition", str(message.partition()).encode()),
                ("source_offset", str(message.offset()).encode()),
                ("failed_at", utc_now().isoformat().encode()),
            ],
        )

    def _commit(self) -> None:
        while True:
            try:
                self.producer.commit_transaction(30)
                return
            except KafkaException as exc:
                if exc.args[0].retriable():
                    continue
                raise

    def _recover(self, exc: KafkaException) -> None:
        error: KafkaError = exc.args[0]
        log.warning("transaction failed", extra={"error": str(error)})
        if error.txn_requires_abort():
            self.producer.abort_transaction(30)
        else:
            # Fenced, or a timed-out commit that librdkafka cannot resolve: start over with a new
            # producer (init_transactions aborts whatever the old one left open).
            self.producer = self._new_producer()
        self._rewind()

    def _rewind(self) -> None:
        """Re-read everything after the last committed offsets; drop uncommitted decisions."""
        assignment = self.consumer.assignment()
        for tp in self.consumer.committed(assignment, timeout=30):
            offset = tp.offset if tp.offset >= 0 else OFFSET_BEGINNING
            self.consumer.seek(TopicPartition(tp.topic, tp.partition, offset))

    def _count(self, stats: BatchStats) -> None:
        for name, value in vars(stats).items():
            setattr(self.totals, name, getattr(self.totals, name) + value)
        if stats.commands:
            log.info("batch committed", extra=vars(stats))


def run_forever(settings: Settings, *, install_signal_handlers: bool = True) -> None:
    processor = CommandProcessor(settings)
    if install_signal_handlers:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: processor.stop_requested.set())
    processor.run()


def _main(argv: Iterable[str] | None = None) -> None:
    from infra.logs import configure_logging
    from infra.settings import get_settings

    configure_logging()
    run_forever(get_settings())


if __name__ == "__main__":
    _main()
