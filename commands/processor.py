"""The command processor: the single writer of events, exactly once, per commands partition.

Loop: consume a batch of commands -> for each, `handle_command` against the in-memory state of
its aggregate -> in ONE Kafka transaction produce the events, the command results (and dead
letters), and commit the consumed offsets (`send_offsets_to_transaction`). The in-memory state is
only updated after the commit succeeds; an aborted batch is thrown away and re-read.

Partitions line up: commands in partition p produce events, results and dead letters for
partition p, so a processor that is assigned partition p rebuilds exactly the aggregates it owns
by reading events p (and results p, for idempotency) to their end.

No poison pill: a command that cannot be decided becomes a "server" rejection (see
`commands.handling`), and a record the rebuild cannot read or apply is skipped, counted in
`skipped_records`, and dead-lettered once (to the commands DLQ, with the usual DLQ headers) so an
operator sees it; the processor starts and serves either way.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from commands.envelope import CommandResult
from commands.handling import (
    Accepted,
    Duplicate,
    Refused,
    Undeliverable,
    describe_error,
    handle_command,
)
from commands.registry import AGGREGATES, AggregateSpec
from events.access import WorkspaceCreated
from events.envelope import DEFAULT_WORKSPACE, EventEnvelope, utc_now
from events.ids import new_event_id
from events.kafka_log import (
    consumer_config,
    high_watermark,
    partition_count,
    partition_for,
    producer_config,
    read_partition,
)
from events.transactional import LoopConfig, TransactionalLoop, dead_letter
from infra.settings import Settings

log = logging.getLogger("loopstream.command_processor")

# How long newly created topics may take to show in the broker's metadata.
TOPICS_VISIBLE_WAIT_S = 10.0


@dataclass
class PartitionState:
    """What the processor knows about the aggregates of one partition, as last committed."""

    states: dict[str, Any] = field(default_factory=dict)
    seen: dict[str, CommandResult] = field(default_factory=dict)  # command_id -> result
    # aggregate_id -> the workspace of its first event (tenant-scoped aggregates only)
    owners: dict[str, str] = field(default_factory=dict)
    skipped: int = 0  # records of this partition the rebuild could not read or apply


class WorkspaceDirectory:
    """Which workspaces exist, from the WorkspaceCreated events of ALL partitions (a command for
    workspace W may land in any partition, W's own events in one). The default workspace always
    exists. Before calling a workspace unknown it reads the events topic on to its end, so a
    workspace created a moment ago (by another processor instance) is found.

    One reader follows the topic for the process's life: a command naming a workspace nobody
    created (any local producer can send one) costs a watermark request per partition and the
    records written since the last look, not a new consumer and a re-read."""

    def __init__(self, settings: Settings, *, wait_s: float = 5.0) -> None:
        self.settings = settings
        self.topic = settings.topic("events")
        self.known: set[str] = {DEFAULT_WORKSPACE}
        self.wait_s = wait_s  # at most this long behind an open transaction, then answer
        self._reader: Consumer | None = None
        self._partitions: list[TopicPartition] = []

    def exists(self, workspace: str) -> bool:
        if workspace in self.known:
            return True
        self.catch_up()
        return workspace in self.known

    def add(self, workspace: str) -> None:
        self.known.add(workspace)

    def catch_up(self) -> None:
        reader = self._reader_of_topic()
        ends = {tp.partition: high_watermark(reader, tp) for tp in self._partitions}
        deadline = time.monotonic() + self.wait_s
        while True:
            positions = {tp.partition: tp.offset for tp in reader.position(self._partitions)}
            if all(positions[p] >= end or end == 0 for p, end in ends.items()):
                return
            if time.monotonic() > deadline:  # an open transaction holds the reader back
                log.warning("workspace directory behind the events topic", extra={
                    "positions": positions, "ends": ends})  # fmt: skip
                return
            for message in reader.consume(num_messages=1000, timeout=0.2):
                if message.error() is None and _is_workspace_created(message):
                    self._note(message)

    def _note(self, message: Message) -> None:
        try:
            envelope = EventEnvelope.from_bytes(message.value())
        except Exception:  # the rebuild of its own partition dead-letters it
            return
        if envelope.type == WorkspaceCreated.__name__:
            self.known.add(str(envelope.payload.get("workspace_id")))

    def _reader_of_topic(self) -> Consumer:
        if self._reader is None:
            self._partitions = [
                TopicPartition(self.topic, p)
                for p in range(partition_count(self.settings, self.topic))
            ]
            reader = Consumer(
                consumer_config(self.settings, group_id=f"{self.settings.topic_prefix}-workspaces")
            )
            reader.assign([TopicPartition(self.topic, tp.partition, OFFSET_BEGINNING)
                           for tp in self._partitions])  # fmt: skip
            self._reader = reader
        return self._reader

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()


def _is_workspace_created(message: Message) -> bool:
    """From the event_type header, without parsing the value (most events are not)."""
    for header in message.headers() or []:
        if header[0] == "event_type":
            return header[1] == WorkspaceCreated.__name__.encode()
    return True  # no type header: parse it to know


@dataclass
class BatchStats:
    commands: int = 0
    accepted: int = 0
    rejected: int = 0
    duplicates: int = 0
    dead_letters: int = 0
    forwarded: int = 0
    events: int = 0


@dataclass(frozen=True)
class Pending:
    """A batch's decisions not yet committed: what later commands of the batch must see."""

    states: dict[tuple[int, str], Any]
    seen: dict[tuple[int, str], CommandResult]
    owners: dict[tuple[int, str], str]  # (partition, aggregate_id) -> workspace
    workspaces: set[str]  # created in this batch


class CommandProcessor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.commands_topic = settings.topic("commands")
        self.events_topic = settings.topic("events")
        self.results_topic = settings.topic("command-results")
        self.dlq_topic = settings.topic("commands.dlq")
        self.partitions: dict[int, PartitionState] = {}
        self.workspaces = WorkspaceDirectory(settings)
        self.partition_count = self._check_partitions_line_up()
        self.totals = BatchStats()
        # Records the rebuild could not read or apply (all partitions, since start).
        self.skipped_records = 0
        # (topic, partition, offset) already in the DLQ; loaded from it the first time a rebuild
        # meets a bad record, so a restart does not dead-letter the same record again.
        self._dead_lettered: set[tuple[str, int, int]] | None = None
        self.loop = TransactionalLoop(
            settings,
            LoopConfig(
                name="command-processor",
                instance_id=settings.processor_instance_id,
                topics=(self.commands_topic,),
                batch_size=settings.processor_batch_size,
                poll_timeout_s=settings.processor_batch_timeout_s,
                commit_delay_ms=settings.processor_commit_delay_ms,
            ),
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
        )
        self.stop_requested = self.loop.stop_requested

    def run(self) -> None:
        try:
            self.loop.run(self._decide_batch)
        finally:
            self.workspaces.close()
        log.info("command processor stopped", extra={"totals": vars(self.totals)})

    def process_batch(self, messages: list[Message]) -> bool:
        return self.loop.transact(messages, self._decide_batch)

    def _check_partitions_line_up(self) -> int:
        admin = AdminClient({"bootstrap.servers": self.settings.kafka_bootstrap_servers})
        names = (self.commands_topic, self.events_topic, self.results_topic)
        # Topics created a moment ago (a fresh stack, a test's own prefix) may not be in the
        # broker's metadata yet: look again for a few seconds before calling them missing.
        deadline = time.monotonic() + TOPICS_VISIBLE_WAIT_S
        while True:
            topics = admin.list_topics(timeout=30).topics
            counts = {name: len(topics[name].partitions) for name in names if name in topics}
            if len(counts) == len(names) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        if len(counts) < len(names):
            missing = sorted(set(names) - set(counts))
            raise RuntimeError(f"topics missing: {missing}; run `loopstream stack topics`")
        if len(set(counts.values())) != 1:
            raise RuntimeError(f"commands, events and results need equal partitions: {counts}")
        return counts[self.commands_topic]

    # --- partition ownership ---------------------------------------------------------------

    def _on_assign(self, assigned: list[TopicPartition]) -> None:
        for tp in assigned:
            started = time.monotonic()
            self.partitions[tp.partition] = self.rebuild_partition(tp.partition)
            log.info(
                "partition rebuilt",
                extra={
                    "partition": tp.partition,
                    "aggregates": len(self.partitions[tp.partition].states),
                    "skipped": self.partitions[tp.partition].skipped,
                    "seconds": round(time.monotonic() - started, 3),
                },
            )

    def _on_revoke(self, revoked: list[TopicPartition]) -> None:
        for tp in revoked:
            self.partitions.pop(tp.partition, None)

    def rebuild_partition(self, partition: int) -> PartitionState:
        """Aggregate states from the events of this partition, idempotency from its results.

        A record that cannot be read or applied is skipped (and dead-lettered): one bad record
        must not keep the processor from starting, which would stop every aggregate."""
        rebuilt = PartitionState()
        bad: list[tuple[Message, str]] = []
        for message in read_partition(self.settings, self.events_topic, partition):
            try:
                envelope = EventEnvelope.from_bytes(message.value())
            except Exception as exc:  # not JSON, not an envelope: nothing to fold
                bad.append((message, describe_error(exc)))
                continue
            spec = AGGREGATES.get(envelope.aggregate_type)
            if spec is None:  # a worker's aggregate (trainer, sampler): not ours to decide for
                continue
            state = rebuilt.states.get(envelope.aggregate_id) or spec.initial_state(
                envelope.aggregate_id
            )
            if spec.tenant_scoped:
                rebuilt.owners.setdefault(envelope.aggregate_id, envelope.workspace)
            if envelope.sequence != state.version + 1:
                log.error(
                    "sequence gap in the event log",
                    extra={"aggregate_id": envelope.aggregate_id, "sequence": envelope.sequence},
                )
            try:
                state = spec.apply(state, envelope)
            except Exception as exc:  # unknown type, an evolve that raises: skip the event
                bad.append((message, describe_error(exc)))
                # Its sequence is taken all the same: the next event decided for this aggregate
                # must not reuse it, or readers that ignore replays by sequence would drop it.
                state = replace(state, version=max(state.version, envelope.sequence))
            rebuilt.states[envelope.aggregate_id] = state
        for message in read_partition(self.settings, self.results_topic, partition):
            try:
                result = CommandResult.model_validate_json(message.value() or b"")
            except Exception as exc:  # a result nobody can read cannot make a duplicate either
                bad.append((message, describe_error(exc)))
                continue
            rebuilt.seen[result.command_id] = result
        if bad:
            rebuilt.skipped = len(bad)
            self.skipped_records += len(bad)
            self._dead_letter_once(bad)
        return rebuilt

    def _dead_letter_once(self, bad: list[tuple[Message, str]]) -> None:
        """Park records the rebuild skipped in the commands DLQ, each once across restarts.

        Outside the transaction (nothing here is consumed or committed), with a plain producer;
        a record that was dead-lettered but whose DLQ write did not make it is sent again at the
        next rebuild, so at least once."""
        if self._dead_lettered is None:
            self._dead_lettered = self._read_dead_lettered()
        producer = Producer(producer_config(self.settings))
        for message, reason in bad:
            where = (message.topic() or "", message.partition() or 0, message.offset() or 0)
            log.warning(
                "skipped an unreadable record while rebuilding state",
                extra={"topic": where[0], "partition": where[1], "offset": where[2],
                       "reason": reason},
            )  # fmt: skip
            if where not in self._dead_lettered:
                dead_letter(producer, self.dlq_topic, message, reason)
                self._dead_lettered.add(where)
        if producer.flush(30):
            log.error("dead letters of skipped records not confirmed; sent again next rebuild")

    def _read_dead_lettered(self) -> set[tuple[str, int, int]]:
        """The source (topic, partition, offset) of every record already in the commands DLQ."""
        found = set()
        for partition in range(partition_count(self.settings, self.dlq_topic)):
            for message in read_partition(self.settings, self.dlq_topic, partition):
                headers: dict[str, str] = {}
                for header in message.headers() or []:
                    name, value = header[0], header[1]
                    headers[name] = (
                        value.decode(errors="replace")
                        if isinstance(value, bytes)
                        else (value or "")
                    )
                try:
                    found.add(
                        (
                            headers.get("source_topic") or "",
                            int(headers.get("source_partition") or "-1"),
                            int(headers.get("source_offset") or "-1"),
                        )
                    )
                except ValueError:
                    continue  # a DLQ record without our headers: someone else's
        return found

    # --- one batch, one transaction ---------------------------------------------------------

    def _decide_batch(self, messages: list[Message], producer: Producer) -> Callable[[], None]:
        # Decisions in this batch see the batch's earlier effects through these overlays; they
        # become the committed state only once Kafka has committed the transaction.
        pending_states: dict[tuple[int, str], Any] = {}
        pending_seen: dict[tuple[int, str], CommandResult] = {}
        pending_owners: dict[tuple[int, str], str] = {}
        pending_workspaces: set[str] = set()
        stats = BatchStats(commands=len(messages))
        for message in messages:
            self._process_one(
                message,
                producer,
                Pending(pending_states, pending_seen, pending_owners, pending_workspaces),
                stats,
            )

        def after_commit() -> None:
            for (partition, aggregate_id), owner in pending_owners.items():
                self.partitions[partition].owners.setdefault(aggregate_id, owner)
            for workspace in pending_workspaces:
                self.workspaces.add(workspace)
            for (partition, aggregate_id), state in pending_states.items():
                self.partitions[partition].states[aggregate_id] = state
            for (partition, command_id), result in pending_seen.items():
                self.partitions[partition].seen[command_id] = result
            self._count(stats)

        return after_commit

    def _process_one(
        self,
        message: Message,
        producer: Producer,
        pending: Pending,
        stats: BatchStats,
    ) -> None:
        pending_states, pending_seen = pending.states, pending.seen
        partition: int = message.partition()  # type: ignore[assignment]  # set on consumed messages
        key = message.key()
        if key is not None and partition_for(key, self.partition_count) != partition:
            # Produced with another partitioner: hand it to the partition that owns its
            # aggregate, or two processors would both think they own it.
            producer.produce(
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
            workspace_exists=lambda w: w in pending.workspaces or self.workspaces.exists(w),
            aggregate_workspace=lambda aggregate_id: (
                pending.owners.get((partition, aggregate_id)) or owned.owners.get(aggregate_id)
            ),
        )
        if isinstance(outcome, Undeliverable):
            dead_letter(producer, self.dlq_topic, message, outcome.reason)
            stats.dead_letters += 1
        elif isinstance(outcome, Duplicate):
            stats.duplicates += 1
        elif isinstance(outcome, Refused):
            self._produce_result(producer, outcome.result, partition)
            pending_seen[(partition, outcome.result.command_id)] = outcome.result
            stats.rejected += 1
        elif isinstance(outcome, Accepted):
            for envelope, value in zip(outcome.events, outcome.event_bytes, strict=True):
                producer.produce(
                    self.events_topic,
                    key=envelope.aggregate_id.encode(),
                    value=value,
                    headers=envelope.kafka_headers(),
                    partition=partition,
                )
            self._produce_result(producer, outcome.result, partition)
            aggregate_id = outcome.result.aggregate_id or ""
            pending_states[(partition, aggregate_id)] = outcome.state
            if outcome.spec.tenant_scoped and outcome.events:
                pending.owners.setdefault((partition, aggregate_id), outcome.events[0].workspace)
            pending.workspaces.update(
                str(e.payload.get("workspace_id"))
                for e in outcome.events
                if e.type == WorkspaceCreated.__name__
            )
            pending_seen[(partition, outcome.result.command_id)] = outcome.result
            stats.accepted += 1
            stats.events += len(outcome.events)

    def _produce_result(self, producer: Producer, result: CommandResult, partition: int) -> None:
        producer.produce(
            self.results_topic,
            key=result.command_id.encode(),
            value=result.to_bytes(),
            partition=partition,
        )

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
