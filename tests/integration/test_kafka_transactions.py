"""Kafka transactions on the single-node KRaft broker behave as the command processor needs."""

from __future__ import annotations

import time
import uuid

from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from infra.settings import Settings


def _fresh_topic(settings: Settings) -> str:
    name = f"test.txn.{uuid.uuid4().hex[:10]}"
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap_servers})
    admin.create_topics([NewTopic(name, num_partitions=1, replication_factor=1)])[name].result(30)
    return name


def _read_all(settings: Settings, topic: str, isolation: str) -> list[bytes]:
    """Everything this isolation level lets a consumer see, up to the partition's end."""
    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap_servers,
            "group.id": f"test-{uuid.uuid4().hex}",
            "isolation.level": isolation,
            "enable.auto.commit": False,
        }
    )
    partition = TopicPartition(topic, 0, 0)
    consumer.assign([partition])
    values: list[bytes] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        values += [
            m.value() for m in consumer.consume(num_messages=100, timeout=0.5) if not m.error()
        ]
        _, high = consumer.get_watermark_offsets(partition, timeout=10, cached=False)
        # Done once we are past every record, transaction markers included. Every test writes
        # at least one record, so an end of 0 only means the metadata is not there yet.
        if high > 0 and consumer.position([partition])[0].offset >= high:
            break
    consumer.close()
    return values


def _transactional_producer(settings: Settings) -> Producer:
    producer = Producer(
        {
            "bootstrap.servers": settings.kafka_bootstrap_servers,
            "transactional.id": f"test-{uuid.uuid4().hex}",
        }
    )
    producer.init_transactions(30)
    return producer


def test_committed_transaction_round_trips_to_read_committed_consumer(settings: Settings) -> None:
    topic = _fresh_topic(settings)
    producer = _transactional_producer(settings)
    producer.begin_transaction()
    for i in range(3):
        producer.produce(topic, key=b"agg-1", value=f"committed-{i}".encode())
    producer.commit_transaction(30)

    assert _read_all(settings, topic, "read_committed") == [
        b"committed-0",
        b"committed-1",
        b"committed-2",
    ]


def test_aborted_transaction_is_invisible_to_read_committed_consumer(settings: Settings) -> None:
    topic = _fresh_topic(settings)
    producer = _transactional_producer(settings)
    producer.begin_transaction()
    producer.produce(topic, value=b"aborted")
    producer.flush(30)  # the records really reach the log before the abort
    producer.abort_transaction(30)
    producer.begin_transaction()
    producer.produce(topic, value=b"kept")
    producer.commit_transaction(30)

    assert _read_all(settings, topic, "read_committed") == [b"kept"]
    # The aborted record is in the log: a read_uncommitted reader still sees it.
    assert _read_all(settings, topic, "read_uncommitted") == [b"aborted", b"kept"]


def test_consumed_offsets_commit_inside_the_transaction(settings: Settings) -> None:
    """The exactly-once loop: consume, produce, send_offsets_to_transaction, commit."""
    source, sink = _fresh_topic(settings), _fresh_topic(settings)
    seed = _transactional_producer(settings)
    seed.begin_transaction()
    seed.produce(source, value=b"command")
    seed.commit_transaction(30)

    group = f"test-eos-{uuid.uuid4().hex}"
    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap_servers,
            "group.id": group,
            "isolation.level": "read_committed",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    consumer.subscribe([source])
    message = None
    for _ in range(30):
        message = consumer.poll(1.0)
        if message is not None and not message.error():
            break
    assert message is not None and message.value() == b"command"

    processor = _transactional_producer(settings)
    processor.begin_transaction()
    processor.produce(sink, value=b"event")
    processor.send_offsets_to_transaction(
        consumer.position(consumer.assignment()), consumer.consumer_group_metadata()
    )
    processor.commit_transaction(30)
    consumer.close()

    committed = Consumer(
        {"bootstrap.servers": settings.kafka_bootstrap_servers, "group.id": group}
    ).committed([TopicPartition(source, 0)], timeout=10)
    assert committed[0].offset == 1
    assert _read_all(settings, sink, "read_committed") == [b"event"]
