"""Consume -> produce -> commit offsets, in one Kafka transaction per batch: exactly once.

The command processor and the GPU workers all work this way; the loop, the error handling and
the recovery live here once. A handler gets a batch of messages and the transactional producer,
produces whatever the batch causes, and returns what to do once the transaction is committed
(update in-memory state, resolve local waiters). If the transaction fails, that callback is
never called and the consumer is rewound to the last committed offsets.
"""

from __future__ import annotations

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
            list(config.topics),
            on_assign=lambda _c, tps: on_assign(tps) if on_assign else None,
            on_revoke=lambda _c, tps: on_revoke(tps) if on_revoke else None,
        )

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
        first = self.consumer.poll(self.config.poll_timeout_s)
        if first is None:
            return []
        rest = self.consumer.consume(num_messages=self.config.batch_size - 1, timeout=0)
        batch = []
        for message in (first, *rest):
            error = message.error()
            if error is None:
                batch.append(message)
            elif error.code() != KafkaError._PARTITION_EOF:
                log.warning("consume error", extra={"error": str(error)})
        return batch

    def transact(self, batch: list[Message], handle: BatchHandler) -> bool:
        """Run `handle` inside one transaction with the batch's offsets. False if it failed."""
        self.producer.begin_transaction()
        try:
            after_commit = handle(batch, self.producer)
            if self.config.commit_delay_ms:
                self.producer.flush(30)
                time.sleep(self.config.commit_delay_ms / 1000)
            self.producer.send_offsets_to_transaction(
                self.consumer.position(self.consumer.assignment()),
                self.consumer.consumer_group_metadata(),
            )
            self._commit()
        except KafkaException as exc:
            self._recover(exc)
            return False
        except BufferError as exc:  # the local queue is full: nothing wrong with the batch
            log.warning("transaction failed", extra={"error": f"BufferError: {exc}"})
            self.producer.abort_transaction(30)
            self._rewind()
            return False
        if after_commit is not None:
            after_commit()
        return True

    def close(self) -> None:
        self.consumer.close()
        self.producer.flush(10)
        log.info("loop stopped", extra={"loop": self.transactional_id})

    def _new_producer(self) -> Producer:
        config = producer_config(self.settings, transactional_id=self.transactional_id)
        if self.config.transaction_timeout_ms is not None:
            config["transaction.timeout.ms"] = self.config.transaction_timeout_ms
        producer = Producer(config)
        # Fences any earlier producer with our transactional.id and aborts its open transaction.
        producer.init_transactions(60)
        return producer

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
            # Fenced, or a timed-out commit that librdkafka cannot resolve (no KIP-890): start
            # over with a new producer; init_transactions aborts whatever the old one left open.
            self.producer = self._new_producer()
        self._rewind()

    def _rewind(self) -> None:
        """Re-read everything after the last committed offsets."""
        assignment = self.consumer.assignment()
        for tp in self.consumer.committed(assignment, timeout=30):
            offset = tp.offset if tp.offset >= 0 else OFFSET_BEGINNING
            self.consumer.seek(TopicPartition(tp.topic, tp.partition, offset))
