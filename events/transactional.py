"""Consume -> produce -> commit offsets, in one Kafka transaction per batch: exactly once.

The command processor and the GPU workers all work this way; the loop, the error handling and
the recovery live here once. A handler gets a batch of messages and the transactional producer,
produces whatever the batch causes, and returns what to do once the transaction is committed
(update in-memory state, resolve local waiters). If the transaction fails, that callback is
never called and the consumer is rewound to the last committed offsets.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)

from events.envelope import utc_now
from events.kafka_log import consumer_config, producer_config
from infra.settings import Settings

log = logging.getLogger("loopstream.transactional")

AfterCommit = Callable[[], None]
COMMIT_ATTEMPTS = 5  # retriable commit errors (coordinator moving, loading) before a new producer
BatchHandler = Callable[[list[Message], Producer], AfterCommit | None]
PartitionCallback = Callable[[list[TopicPartition]], None]


@dataclass(frozen=True)
class LoopConfig:
    name: str  # consumer group and transactional id derive from it
    instance_id: str  # stable per instance: a restart fences its predecessor
    topics: tuple[str, ...]
    batch_size: int = 500
    # How long to wait for the first message of a batch; the rest of the batch is whatever is
    # already buffered, so a lone message is processed at once instead of waiting for company.
    poll_timeout_s: float = 0.5
    # Work that takes long per batch (a training step) needs a longer transaction timeout.
    transaction_timeout_ms: int | None = None
    # Fault injection for crash tests only: pause between producing a batch and committing it.
    commit_delay_ms: int = 0


# A dead letter keeps the original bytes, but never so many that the producer refuses the record
# (librdkafka's message.max.bytes is 1,000,000): a refused dead letter would fail the batch at
# every retry. Past this the value is cut and a `truncated` header gives the original size.
MAX_DEAD_LETTER_VALUE_BYTES = 900_000


def dead_letter(producer: Producer, dlq_topic: str, message: Message, reason: str) -> None:
    """Park a message nobody can process: its original key and bytes, and why, in the headers
    every loopstream DLQ reader knows (error, source topic/partition/offset, failed_at)."""
    log.warning(
        "dead-lettered",
        extra={"topic": message.topic(), "partition": message.partition(),
               "offset": message.offset(), "reason": reason},
    )  # fmt: skip
    value = message.value()
    headers: list[tuple[str, str | bytes | None]] = [
        ("error", reason[:2000].encode(errors="replace")),
        ("source_topic", (message.topic() or "").encode()),
        ("source_partition", str(message.partition()).encode()),
        ("source_offset", str(message.offset()).encode()),
        ("failed_at", utc_now().isoformat().encode()),
    ]
    if value is not None and len(value) > MAX_DEAD_LETTER_VALUE_BYTES:
        headers.append(("truncated", str(len(value)).encode()))
        value = value[:MAX_DEAD_LETTER_VALUE_BYTES]
    producer.produce(dlq_topic, key=message.key(), value=value, headers=headers)


def is_fatal(error: KafkaError) -> bool:
    """A fatal client error: the instance is done for. A consumer may hand one over as a
    message error whose code is _FATAL without the fatal flag set (the fenced static member
    after a broker restart, seen here)."""
    return bool(error.fatal()) or error.code() == KafkaError._FATAL


def close_bounded(consumer: Consumer, timeout_s: float = 10.0) -> None:
    """Close a consumer, waiting at most `timeout_s`: closing a fenced or fatally failed
    consumer can block (it tries to leave its group), and a worker must not hang on the way
    out or while replacing it. A close that outlasts the wait goes on in its daemon thread."""

    def close() -> None:
        with contextlib.suppress(Exception):  # a fatal consumer may refuse to close cleanly
            consumer.close()

    closing = threading.Thread(target=close, name="consumer-close", daemon=True)
    closing.start()
    closing.join(timeout_s)
    if closing.is_alive():
        log.warning("consumer close still blocked; going on without it")


class TransactionalLoop:
    def __init__(
        self,
        settings: Settings,
        config: LoopConfig,
        *,
        on_assign: PartitionCallback | None = None,
        on_revoke: PartitionCallback | None = None,
    ) -> None:
        self.settings = settings
        self.config = config
        self.stop_requested = threading.Event()
        self.on_assign = on_assign
        self.on_revoke = on_revoke
        # A fatal consumer error reported by librdkafka's error callback: poll() itself then
        # just returns nothing, forever (a fenced static member, librdkafka #3437).
        self._fatal_consumer_error: KafkaError | None = None
        self.producer = self._new_producer()
        self.consumer = self._new_consumer()
        self.consumers_replaced = 0

    @property
    def group_id(self) -> str:
        # Per topic prefix: environments sharing a cluster never share a consumer group.
        return f"{self.settings.topic_prefix}-{self.config.name}"

    @property
    def transactional_id(self) -> str:
        return f"{self.group_id}-{self.config.instance_id}"

    def run(self, handle: BatchHandler) -> None:
        log.info("loop started", extra={"loop": self.transactional_id})
        try:
            while not self.stop_requested.is_set():
                batch = self.next_batch()
                if batch:
                    self.transact(batch, handle)
        finally:
            self.close()

    def next_batch(self) -> list[Message]:
        if self._fatal_consumer_error is not None:
            self._replace_consumer(self._fatal_consumer_error)
            return []
        try:
            first = self.consumer.poll(self.config.poll_timeout_s)
            if first is None:
                return []
            rest = self.consumer.consume(num_messages=self.config.batch_size - 1, timeout=0)
        except KafkaException as exc:
            if not is_fatal(exc.args[0]):
                raise
            self._replace_consumer(exc.args[0])
            return []
        batch = []
        for message in (first, *rest):
            error = message.error()
            if error is None:
                batch.append(message)
            elif is_fatal(error):
                self._replace_consumer(error)
                return []  # uncommitted offsets are read again by the new consumer
            elif error.code() != KafkaError._PARTITION_EOF:
                log.warning("consume error", extra={"error": str(error)})
        return batch

    def _new_consumer(self) -> Consumer:
        consumer = Consumer(
            consumer_config(
                self.settings,
                group_id=self.group_id,
                # Static membership: a restarted instance takes its partitions straight back
                # instead of waiting out the dead member's session.
                **{
                    "group.instance.id": self.transactional_id,
                    "session.timeout.ms": 10_000,
                    "error_cb": self._note_consumer_error,
                },
            )
        )
        consumer.subscribe(
            list(self.config.topics),
            on_assign=lambda _c, tps: self.on_assign(tps) if self.on_assign else None,
            on_revoke=lambda _c, tps: self.on_revoke(tps) if self.on_revoke else None,
        )
        return consumer

    def _note_consumer_error(self, error: KafkaError) -> None:
        if is_fatal(error):
            self._fatal_consumer_error = error

    def _replace_consumer(
        self, error: KafkaError, why: str = "fatal consumer error: replacing the consumer"
    ) -> None:
        """A fatal consumer error leaves a consumer that never delivers again: e.g. a static
        member whose session ran out while the broker was away is fenced by its own rejoin
        (librdkafka #3437). Start a new one; it resumes from the committed offsets, and its
        assignment rebuilds whatever the old one owned."""
        log.error(why, extra={"error": str(error)})
        self._fatal_consumer_error = None
        close_bounded(self.consumer)
        self.consumer = self._new_consumer()
        self.consumers_replaced += 1

    def transact(self, batch: list[Message], handle: BatchHandler) -> bool:
        """Run `handle` inside one transaction with the batch's offsets. False if it failed."""
        try:
            self.producer.begin_transaction()
            after_commit = handle(batch, self.producer)
            if self.config.commit_delay_ms:
                self.producer.flush(30)
                time.sleep(self.config.commit_delay_ms / 1000)
            self._send_offsets()
            self._commit()
        except KafkaException as exc:
            self._recover(exc)
            return False
        except BufferError as exc:  # the local queue is full: nothing wrong with the batch
            log.warning("transaction failed", extra={"error": f"BufferError: {exc}"})
            self._abandon(None)
            self._rewind()
            return False
        if after_commit is not None:
            after_commit()
        return True

    def produce_alone(self, produce: Callable[[Producer], None]) -> bool:
        """Run `produce` in a transaction of its own, with no input offsets (what a worker
        emits between batches). False if it failed: then none of it is visible, no transaction
        is left open (one left open would hold every read_committed reader of its partitions
        back until it timed out), and the producer is ready for the next one."""
        try:
            self.producer.begin_transaction()
            produce(self.producer)
            self._commit()
        except KafkaException as exc:
            self._abandon(exc)
            return False
        except BufferError as exc:
            log.warning("transaction failed", extra={"error": f"BufferError: {exc}"})
            self._abandon(None)
            return False
        return True

    def close(self) -> None:
        close_bounded(self.consumer)
        self.producer.flush(10)
        log.info("loop stopped", extra={"loop": self.transactional_id})

    def _new_producer(self) -> Producer:
        config = producer_config(self.settings, transactional_id=self.transactional_id)
        if self.config.transaction_timeout_ms is not None:
            config["transaction.timeout.ms"] = self.config.transaction_timeout_ms
        producer = Producer(config)
        # Fences any earlier producer with our transactional.id and aborts its open transaction.
        # A broker that is away (restarting) is waited for: giving up here would end the process.
        while True:
            try:
                producer.init_transactions(60)
                return producer
            except KafkaException as exc:
                if self.stop_requested.is_set() or not exc.args[0].retriable():
                    raise
                log.warning("init_transactions failed, retrying", extra={"error": str(exc)})

    def _send_offsets(self, timeout_s: float = 30.0) -> None:
        """The batch's offsets into the transaction, waiting at most `timeout_s`.

        librdkafka does not honour this call's own timeout when the group coordinator it cached
        went away (librdkafka #5456, #5511): after a single broker restarts it blocks for
        good, with nothing logged. So the call runs in a thread of its own and the loop stops
        waiting for it; the timeout goes to _recover like any failure, whose new producer
        fences the stuck one and aborts its transaction (the stuck thread is left behind)."""
        offsets = self.consumer.position(self.consumer.assignment())
        metadata = self.consumer.consumer_group_metadata()
        producer = self.producer
        failure: list[KafkaException] = []

        def send() -> None:
            try:
                producer.send_offsets_to_transaction(offsets, metadata, timeout_s)
            except KafkaException as exc:
                failure.append(exc)

        sending = threading.Thread(target=send, name="send-offsets", daemon=True)
        sending.start()
        sending.join(timeout_s + 5)
        if sending.is_alive():
            log.error("send_offsets_to_transaction did not return; starting over",
                      extra={"waited_s": timeout_s + 5})  # fmt: skip
            raise KafkaException(
                KafkaError(KafkaError._TIMED_OUT, "send_offsets_to_transaction did not return")
            )
        if failure:
            raise failure[0]

    def _commit(self) -> None:
        for attempt in range(1, COMMIT_ATTEMPTS + 1):
            try:
                self.producer.commit_transaction(30)
                return
            except KafkaException as exc:
                error: KafkaError = exc.args[0]
                # A timed-out commit cannot be resolved by librdkafka (no KIP-890): retrying it
                # can wait forever after a broker restart. It goes to _recover, which starts a
                # new producer (aborting the open transaction) and re-reads the batch.
                timed_out = error.code() == KafkaError._TIMED_OUT
                if not error.retriable() or timed_out or attempt == COMMIT_ATTEMPTS:
                    raise
                log.warning("commit failed, retrying", extra={"error": str(error)})

    def _abandon(self, exc: KafkaException | None) -> None:
        """End the failed transaction: abort it, or when that is not possible start over with a
        new producer (its init_transactions aborts whatever the old one left open)."""
        error: KafkaError | None = exc.args[0] if exc is not None else None
        if error is not None:
            log.warning("transaction failed", extra={"error": str(error)})
        if error is None or error.txn_requires_abort():
            try:
                self.producer.abort_transaction(30)
                return
            except KafkaException as abort_error:  # the broker is away: start over instead
                log.warning("abort failed", extra={"error": str(abort_error)})
        # Fenced, a timed-out commit that librdkafka cannot resolve (no KIP-890), or an abort
        # that failed.
        self.producer = self._new_producer()

    def _recover(self, exc: KafkaException) -> None:
        self._abandon(exc)
        try:
            self._rewind()
        except KafkaException as rewind_error:
            # The consumer cannot read its group's committed offsets. After a broker restart its
            # cached group coordinator can stay stale for minutes, and asking again with the same
            # consumer timed out every 30 s (seen in the broker-restart fault test). A new
            # consumer finds the coordinator afresh and starts from the committed offsets, which
            # is what the rewind was for.
            self._replace_consumer(
                rewind_error.args[0], why="rewind failed: replacing the consumer"
            )

    def _rewind(self) -> None:
        """Re-read everything after the last committed offsets."""
        assignment = self.consumer.assignment()
        for tp in self.consumer.committed(assignment, timeout=30):
            offset = tp.offset if tp.offset >= 0 else OFFSET_BEGINNING
            self.consumer.seek(TopicPartition(tp.topic, tp.partition, offset))
