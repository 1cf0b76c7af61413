"""Smoke flow: one command through Kafka into a PostgreSQL projection and back out.

It exercises the same guarantees the real pipeline relies on: a transactional produce, a
read_committed consume, and rows written in one DB transaction with the projection's position,
resumed from that position next time.
"""

from __future__ import annotations

import json
import time
import uuid

import psycopg
from confluent_kafka import Consumer, Producer, TopicPartition

from infra.processes import StackError
from infra.settings import Settings

PROJECTION = "smoke_pings"


def run_smoke(settings: Settings, *, timeout_s: float = 30.0) -> dict[str, object]:
    topic = settings.topic("commands")
    command_id = str(uuid.uuid4())
    started = time.monotonic()

    producer = Producer(
        {
            "bootstrap.servers": settings.kafka_bootstrap_servers,
            "transactional.id": "loopstream-smoke",
        }
    )
    producer.init_transactions(timeout_s)
    producer.begin_transaction()
    command = {"type": "Ping", "command_id": command_id, "message": "hello from loopstream"}
    producer.produce(topic, key=b"smoke", value=json.dumps(command).encode())
    producer.commit_transaction(timeout_s)

    row = _project_until_seen(settings, topic, command_id, timeout_s=timeout_s)
    return {
        "command_id": command_id,
        "projected_row": row,
        "round_trip_ms": round((time.monotonic() - started) * 1000, 1),
    }


def _project_until_seen(
    settings: Settings, topic: str, command_id: str, *, timeout_s: float
) -> dict[str, object]:
    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap_servers,
            "group.id": "loopstream-smoke",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        }
    )
    deadline = time.monotonic() + timeout_s
    try:
        with psycopg.connect(settings.pg_conninfo) as conn:
            partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
            stored: dict[int, int] = dict(
                conn.execute(
                    "select partition, next_offset from projection_positions "
                    "where projection = %s and topic = %s",
                    (PROJECTION, topic),
                ).fetchall()
            )
            conn.commit()
            # Resume from our own stored positions, not from Kafka's group offsets.
            consumer.assign(
                [TopicPartition(topic, p, stored.get(p, 0)) for p in sorted(partitions)]
            )
            while time.monotonic() < deadline:
                messages = consumer.consume(num_messages=500, timeout=0.5)
                with conn.transaction():
                    for message in messages:
                        if message.error():
                            continue
                        _apply(conn, topic, message)
                found = conn.execute(
                    "select command_id, message, kafka_offset from smoke_pings "
                    "where command_id = %s",
                    (command_id,),
                ).fetchone()
                conn.commit()
                if found:
                    return {"command_id": found[0], "message": found[1], "offset": found[2]}
    finally:
        consumer.close()
    raise StackError(f"command {command_id} did not reach the projection in {timeout_s}s")


def _apply(conn: psycopg.Connection, topic: str, message: object) -> None:
    try:
        command = json.loads(message.value())  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        command = {}
    if command.get("type") == "Ping":
        conn.execute(
            "insert into smoke_pings (command_id, message, kafka_offset) values (%s, %s, %s) "
            "on conflict (command_id) do nothing",
            (command["command_id"], command.get("message", ""), message.offset()),  # type: ignore[attr-defined]
        )
    conn.execute(
        "insert into projection_positions (projection, topic, partition, next_offset) "
        "values (%s, %s, %s, %s) on conflict (projection, topic, partition) "
        "do update set next_offset = excluded.next_offset, updated_at = now()",
        (PROJECTION, topic, message.partition(), message.offset() + 1),  # type: ignore[attr-defined]
    )
