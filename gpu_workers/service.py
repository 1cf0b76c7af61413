"""What the trainer and sampler workers share: requests in, results and events out, exactly once.

A worker consumes its requests topic with the transactional loop. For each request it checks
idempotency and the payload, runs the work, and in the batch's transaction produces the
aggregate's events (it is their single writer, so sequences stay gap-free), any follow-up
commands for the session aggregate, and the result with its `output`.

Work is not undoable: if the transaction then fails, the engines touched by the batch are
dropped and rebuilt from their last checkpoint before the requests are read again.
"""

from __future__ import annotations

import functools
import logging
import signal
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from confluent_kafka import Message, Producer, TopicPartition
from pydantic import BaseModel, ValidationError

from commands.envelope import CommandEnvelope, CommandResult, EventRef, caused_event
from commands.handling import first_validation_error
from commands.work import WorkRequest
from events.envelope import EventEnvelope, utc_now
from events.ids import new_event_id
from events.kafka_log import partition_for, read_partition
from events.loops import DomainEvent
from events.transactional import LoopConfig, TransactionalLoop, dead_letter
from gpu_workers.failures import Category, InfrastructureError
from infra.settings import Settings

log = logging.getLogger("loopstream.worker")


class WorkRejected(Exception):
    """The request cannot be done as asked; the reason names the field or rule. Category
    "user" (the request is wrong) unless the caller says the refusal is loopstream's own."""

    def __init__(
        self, reason: str, *, field: str | None = None, category: Category = "user"
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.field = field
        self.category = category


@dataclass
class WorkDone:
    output: dict[str, Any]
    events: list[DomainEvent] = field(default_factory=list)
    # Commands for the session aggregate (e.g. RecordCheckpoint), sent in the same transaction.
    follow_ups: list[CommandEnvelope] = field(default_factory=list)


@dataclass(frozen=True)
class Emission:
    """Events a worker emits on its own (not caused by a request), waiting to be sent."""

    aggregate_id: str
    events: list[tuple[DomainEvent, datetime]]
    causation_id: str
    workspace_id: str | None


class WorkerService:
    """Subclasses set the names and implement `execute` and `forget`."""

    name: str  # "trainer-worker"
    requests_topic: str  # catalog name, "trainer-requests"
    aggregate_type: str  # "trainer"
    request_types: tuple[type[WorkRequest], ...]
    # How long one wait for requests may last; `between_batches` runs at least this often.
    poll_timeout_s: float = 0.1

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.types = {t.__name__: t for t in self.request_types}
        self.versions: dict[str, int] = {}  # aggregate_id -> sequence of its last event
        self.seen: dict[str, CommandResult] = {}  # request_id -> result
        # aggregate_id -> its workspace, from its requests and events: the events a worker
        # emits outside any request (a release, a hotload) belong to that workspace too.
        self.workspaces: dict[str, str] = {}
        self.unsent: deque[Emission] = deque()  # emitted events Kafka has not taken yet
        self._partitions = 0  # of the requests topic, read when first needed
        self.loop = TransactionalLoop(
            settings,
            LoopConfig(
                name=self.name,
                instance_id=settings.worker_instance_id,
                topics=(settings.topic(self.requests_topic),),
                batch_size=64,
                poll_timeout_s=self.poll_timeout_s,
                transaction_timeout_ms=settings.worker_transaction_timeout_ms,
            ),
            on_assign=self._on_assign,
        )

    # --- to implement ------------------------------------------------------------------------

    def execute(self, envelope: CommandEnvelope, request: BaseModel) -> WorkDone:
        raise NotImplementedError

    def forget(self, aggregate_ids: set[str]) -> None:
        """Drop in-memory work state of these aggregates (their transaction failed)."""
        raise NotImplementedError

    def between_batches(self) -> None:
        """Periodic work outside requests (the sampler picks up new weights here)."""

    def took_over(self, partitions: list[int]) -> None:
        """These partitions of the requests topic are now this worker's (state rebuilt)."""

    # --- the loop ----------------------------------------------------------------------------

    def run(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: self.loop.stop_requested.set())
        log.info("worker started", extra={"worker": self.loop.transactional_id})
        try:
            while not self.loop.stop_requested.is_set():
                try:
                    self.send_unsent()
                    self.between_batches()
                except Exception:  # periodic upkeep must not take request serving down with it
                    log.error("between batches failed", extra={"trace": traceback.format_exc()})
                batch = self.loop.next_batch()
                if not batch:
                    continue
                touched: set[str] = set()
                if not self.loop.transact(batch, self._batch_handler(touched)):
                    self.forget(touched)
        finally:
            self.loop.close()

    def emit(
        self,
        aggregate_id: str,
        events: Sequence[tuple[DomainEvent, datetime]],
        *,
        causation_id: str,
    ) -> None:
        """Events outside any request (each with when it happened), in a small transaction of
        their own, on the partition the aggregate's requests (and so its request events) use: a
        rebuild finds its sequence there. What Kafka does not take now (a broker restarting) is
        kept, in order, and sent again between the next batches: the work it records is done."""
        if events:
            workspace = self.workspaces.get(aggregate_id)
            self.unsent.append(Emission(aggregate_id, list(events), causation_id, workspace))
        self.send_unsent()

    def send_unsent(self) -> None:
        while self.unsent:
            emission = self.unsent[0]
            encoded = self._encode(emission)
            partition = self._partition_of(emission.aggregate_id)

            produce = functools.partial(self._produce_events, encoded=encoded, partition=partition)
            if not self.loop.produce_alone(produce):
                log.warning("events kept to send again", extra={"events": sum(
                    len(e.events) for e in self.unsent)})  # fmt: skip
                return
            self.unsent.popleft()
            self.versions[emission.aggregate_id] = encoded[-1].sequence

    def _produce_events(
        self, producer: Producer, *, encoded: list[EventEnvelope], partition: int
    ) -> None:
        for envelope in encoded:
            producer.produce(
                self.settings.topic("events"),
                key=envelope.aggregate_id.encode(),
                value=envelope.to_bytes(),
                headers=envelope.kafka_headers(),
                partition=partition,
            )

    def _encode(self, emission: Emission) -> list[EventEnvelope]:
        # Numbered when sent, not when made: requests may have added events meanwhile.
        sequence = self.versions.get(emission.aggregate_id, 0)
        encoded = []
        for event, occurred_at in emission.events:
            sequence += 1
            encoded.append(
                EventEnvelope(
                    event_id=new_event_id(),
                    type=type(event).__name__,
                    schema_version=event.schema_version,
                    aggregate_type=self.aggregate_type,
                    aggregate_id=emission.aggregate_id,
                    sequence=sequence,
                    occurred_at=occurred_at,
                    causation_id=emission.causation_id,
                    correlation_id=emission.causation_id,
                    actor=self.name,
                    workspace_id=emission.workspace_id,
                    payload=event.model_dump(mode="json"),
                )
            )
        return encoded

    def _partition_of(self, aggregate_id: str) -> int:
        """The aggregate's partition of the requests topic (its count read once)."""
        topic = self.settings.topic(self.requests_topic)
        if not self._partitions:
            metadata = self.loop.consumer.list_topics(topic, timeout=10)
            self._partitions = len(metadata.topics[topic].partitions)
        return partition_for(aggregate_id.encode(), self._partitions)

    def _on_assign(self, assigned: list[TopicPartition]) -> None:
        for tp in assigned:
            self._rebuild(tp.partition)
        try:
            self.took_over([tp.partition for tp in assigned])
        except Exception:  # inside librdkafka's callback: an exception here would end the poll
            log.error("taking over partitions failed", extra={"trace": traceback.format_exc()})

    def _rebuild(self, partition: int) -> None:
        events = self.settings.topic("events")
        skipped = 0
        for message in read_partition(self.settings, events, partition):
            try:
                envelope = EventEnvelope.from_bytes(message.value())
            except Exception:  # a stray record someone produced: not ours to stop on
                skipped += 1
                continue
            if envelope.aggregate_type == self.aggregate_type:
                self.versions[envelope.aggregate_id] = envelope.sequence
                if envelope.workspace_id is not None:
                    self.workspaces[envelope.aggregate_id] = envelope.workspace_id
        for message in read_partition(
            self.settings, self.settings.topic("command-results"), partition
        ):
            try:
                result = CommandResult.model_validate_json(message.value() or b"")
            except ValidationError:
                skipped += 1
                continue
            if result.command_type in self.types:
                self.seen[result.command_id] = result
        if skipped:
            log.warning("undecodable records skipped while rebuilding",
                        extra={"partition": partition, "skipped": skipped})  # fmt: skip

    def _batch_handler(
        self, touched: set[str]
    ) -> Callable[[list[Message], Producer], Callable[[], None]]:
        def handle(batch: list[Message], producer: Producer) -> Callable[[], None]:
            pending_versions: dict[str, int] = {}
            pending_seen: dict[str, CommandResult] = {}
            for message in batch:
                result, version = self._handle_one(
                    message, producer, pending_versions, pending_seen
                )
                if result is not None:
                    pending_seen[result.command_id] = result
                    if result.aggregate_id:
                        touched.add(result.aggregate_id)
                if version is not None and result is not None and result.aggregate_id:
                    pending_versions[result.aggregate_id] = version

            def after_commit() -> None:
                self.versions.update(pending_versions)
                self.seen.update(pending_seen)

            return after_commit

        return handle

    def _handle_one(
        self,
        message: Message,
        producer: Producer,
        pending_versions: dict[str, int],
        pending_seen: dict[str, CommandResult],
    ) -> tuple[CommandResult | None, int | None]:
        partition: int = message.partition()  # type: ignore[assignment]
        try:
            envelope = CommandEnvelope.model_validate_json(message.value() or b"")
        except ValidationError as exc:
            dead_letter(
                producer,
                self.settings.topic("commands.dlq"),
                message,
                f"not a request envelope: {exc.errors()[0]}",
            )
            return None, None
        if envelope.command_id in pending_seen or envelope.command_id in self.seen:
            return None, None  # a duplicate: its first result stands

        def finish(
            result: CommandResult, version: int | None = None
        ) -> tuple[CommandResult, int | None]:
            producer.produce(
                self.settings.topic("command-results"),
                key=result.command_id.encode(),
                value=result.to_bytes(),
                partition=partition,
            )
            return result, version

        def refuse(
            reason: str,
            field_name: str | None,
            status: str = "rejected",
            category: Category = "user",
        ) -> tuple[CommandResult, None]:
            return finish(
                CommandResult(
                    command_id=envelope.command_id,
                    command_type=envelope.type,
                    aggregate_id=envelope.aggregate_id,
                    correlation_id=envelope.correlation_id,
                    workspace_id=envelope.workspace_id,  # its future is the workspace's alone
                    status=status,  # type: ignore[arg-type]
                    reason=reason,
                    field=field_name,
                    category=category,
                )
            )  # type: ignore[return-value]

        request_type = self.types.get(envelope.type)
        if request_type is None:
            return refuse(
                f"unknown request type {envelope.type!r}; known: {sorted(self.types)}", "type"
            )
        try:
            request = request_type.model_validate(envelope.payload)
        except ValidationError as exc:
            return refuse(*first_validation_error(exc, prefix="payload."))
        self.workspaces[envelope.aggregate_id] = envelope.workspace_id

        def failed(exc: Exception) -> tuple[CommandResult, None]:
            """A bug, a device error or infrastructure that stayed down: answer, log, keep
            serving. Category "server": the request was fine, loopstream was not."""
            log.error("request failed", extra={"request_id": envelope.command_id,
                                                "trace": traceback.format_exc()})  # fmt: skip
            if isinstance(exc, InfrastructureError):
                return refuse(str(exc), None, status="failed", category="server")
            return refuse(f"worker error: {type(exc).__name__}: {exc} (retryable)", None,
                          status="failed", category="server")  # fmt: skip

        try:
            done = self.execute(envelope, request)
        except WorkRejected as exc:
            return refuse(exc.reason, exc.field, category=exc.category)
        except ValueError as exc:  # the engine's input checks name the field too
            return refuse(str(exc), getattr(exc, "field", None))
        except Exception as exc:
            return failed(exc)

        version = pending_versions.get(
            envelope.aggregate_id, self.versions.get(envelope.aggregate_id, 0)
        )
        now = utc_now()
        # Everything is encoded before anything is produced: an event that cannot be encoded
        # fails the request alone, never half of its events.
        try:
            encoded = []
            for event in done.events:
                version += 1
                encoded.append(caused_event(event, command=envelope, sequence=version,
                                            occurred_at=now, event_id=new_event_id()))  # fmt: skip
            encoded_bytes = [(e, e.to_bytes(), e.kafka_headers()) for e in encoded]
            follow_ups = [(c, c.to_bytes()) for c in done.follow_ups]
        except Exception as exc:
            return failed(exc)
        refs = []
        for event_envelope, value, headers in encoded_bytes:
            producer.produce(
                self.settings.topic("events"),
                key=envelope.aggregate_id.encode(),
                value=value,
                headers=headers,
                partition=partition,
            )
            refs.append(EventRef(event_id=event_envelope.event_id, type=event_envelope.type,
                                 sequence=event_envelope.sequence))  # fmt: skip
        for command, command_bytes in follow_ups:
            producer.produce(
                self.settings.topic("commands"),
                key=command.aggregate_id.encode(),
                value=command_bytes,
            )
        return finish(
            CommandResult(
                command_id=envelope.command_id,
                command_type=envelope.type,
                aggregate_id=envelope.aggregate_id,
                correlation_id=envelope.correlation_id or envelope.command_id,
                workspace_id=envelope.workspace_id,
                status="accepted",
                events=tuple(refs),
                output=done.output,
                processed_at=now,
            ),
            version,
        )
