"""The Kafka adapter: client configs, Java-compatible partitioning, reading a partition to its end.

Everything that produces to loopstream's topics uses the Java client's partitioner (murmur2), so a
command for one aggregate lands in the same partition whether it came from this code, a Java
service or a Go producer configured the Java way.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition
from confluent_kafka.admin import AdminClient

from infra.settings import Settings

# Bound how long an open transaction of a dead producer can block read_committed readers.
TRANSACTION_TIMEOUT_MS = 15_000


def producer_config(settings: Settings, *, transactional_id: str | None = None) -> dict[str, Any]:
    config: dict[str, Any] = {
        "bootstrap.servers": settings.kafka_bootstrap_servers,
        "partitioner": "murmur2_random",  # the Java client's default
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 5,
        "retry.backoff.ms": 20,
        "log_level": 3,
    }
    if transactional_id is not None:
        config["transactional.id"] = transactional_id
        config["transaction.timeout.ms"] = TRANSACTION_TIMEOUT_MS
    return config


def consumer_config(settings: Settings, *, group_id: str, **extra: Any) -> dict[str, Any]:
    return {
        "bootstrap.servers": settings.kafka_bootstrap_servers,
        "group.id": group_id,
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        "isolation.level": "read_committed",
        "log_level": 3,
        **extra,
    }


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 (org.apache.kafka.common.utils.Utils.murmur2), as a signed 32-bit int."""
    length = len(data)
    seed, m, r = 0x9747B28C, 0x5BD1E995, 24
    h = (seed ^ length) & 0xFFFFFFFF
    for i in range(0, length - length % 4, 4):
        k = int.from_bytes(data[i : i + 4], "little")
        k = (k * m) & 0xFFFFFFFF
        k ^= k >> r
        k = (k * m) & 0xFFFFFFFF
        h = (h * m) & 0xFFFFFFFF
        h ^= k
    tail = length % 4
    base = length - tail
    if tail == 3:
        h ^= data[base + 2] << 16
    if tail >= 2:
        h ^= data[base + 1] << 8
    if tail >= 1:
        h ^= data[base]
        h = (h * m) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * m) & 0xFFFFFFFF
    h ^= h >> 15
    return h - (1 << 32) if h & 0x80000000 else h


def partition_for(key: bytes, partitions: int) -> int:
    """The partition the Java client's default partitioner picks for a keyed record."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


def partition_count(settings: Settings, topic: str) -> int:
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap_servers})
    return len(admin.list_topics(topic, timeout=10).topics[topic].partitions)


def assign_all(consumer: Consumer, settings: Settings, topic: str, offset: int) -> None:
    """Read every partition of `topic` from `offset` (OFFSET_BEGINNING / OFFSET_END), outside
    any consumer group's balancing: for readers that must see the whole topic."""
    consumer.assign(
        [TopicPartition(topic, p, offset) for p in range(partition_count(settings, topic))]
    )


def read_partition(
    settings: Settings,
    topic: str,
    partition: int,
    *,
    start_offset: int = 0,
    timeout_s: float = 120.0,
) -> Iterator[Message]:
    """Every committed record of one partition from `start_offset` to its current end.

    The end is the high watermark when we start. A read_committed reader cannot pass an open
    transaction, so this waits for a dead producer's transaction to be aborted (at most
    `transaction.timeout.ms`) instead of stopping early and missing what comes after it.
    """
    consumer = Consumer(
        consumer_config(settings, group_id="loopstream-reader", **{"enable.partition.eof": True})
    )
    tp = TopicPartition(topic, partition, start_offset)
    try:
        end = high_watermark(consumer, tp)
        if end <= start_offset:
            return
        consumer.assign([tp])
        deadline = time.monotonic() + timeout_s
        while True:
            for message in consumer.consume(num_messages=1000, timeout=0.2):
                if message.error() is None:
                    yield message
            position = consumer.position([TopicPartition(topic, partition)])[0].offset
            if position >= end:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{topic}[{partition}] stuck at offset {position} before {end}: "
                    "an open transaction that never ends?"
                )
    finally:
        consumer.close()


# A topic created a moment ago may not have a leader yet; these pass once it has.
_NOT_YET = frozenset(
    {
        KafkaError.NOT_LEADER_FOR_PARTITION,
        KafkaError.LEADER_NOT_AVAILABLE,
        KafkaError.UNKNOWN_TOPIC_OR_PART,
        KafkaError._TIMED_OUT,
        KafkaError._TRANSPORT,
        KafkaError._ALL_BROKERS_DOWN,
    }
)


def high_watermark(consumer: Consumer, tp: TopicPartition, *, patience_s: float = 60.0) -> int:
    """The partition's high watermark, asked again while the cluster is still electing a leader
    (a processor assigned a brand-new topic's partition died here on NOT_LEADER_FOR_PARTITION)."""
    deadline = time.monotonic() + patience_s
    while True:
        try:
            return int(consumer.get_watermark_offsets(tp, timeout=10, cached=False)[1])
        except KafkaException as exc:
            error: KafkaError = exc.args[0]
            if not (error.retriable() or error.code() in _NOT_YET) or time.monotonic() > deadline:
                raise
            time.sleep(0.2)
