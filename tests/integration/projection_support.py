"""Shared set-up of the projection tests: an isolated stack slice, producing, waiting.

Each test gets its own topic prefix (topics provisioned from the real catalog) and its own
PostgreSQL database migrated to head, so tests never see each other's events or rows.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
from confluent_kafka import Consumer, Producer, TopicPartition

from infra.settings import Settings
from infra.topics import provision_topics
from projections.db import engine_for, migrate
from projections.sample import SampleMessage

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Isolated:
    settings: Settings

    @property
    def env(self) -> dict[str, str]:
        """Environment of a subprocess that must see this slice of the stack."""
        return {
            **os.environ,
            "LOOPSTREAM_TOPIC_PREFIX": self.settings.topic_prefix,
            "LOOPSTREAM_PG_DATABASE": self.settings.pg_database,
            "PYTHONUNBUFFERED": "1",
        }


def isolated_slice(settings: Settings) -> Iterator[Isolated]:
    """Body of each test module's `isolated` fixture."""
    token = uuid.uuid4().hex[:10]
    database = f"test_proj_{token}"
    admin = settings.pg_conninfo.replace(f"dbname={settings.pg_database}", "dbname=postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'create database "{database}"')
    local = settings.model_copy(update={"topic_prefix": f"test.{token}", "pg_database": database})
    provision_topics(local)
    migrate(local)
    try:
        yield Isolated(local)
    finally:
        engine_for(local.pg_dsn).dispose()
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'drop database "{database}" with (force)')


def produce(
    settings: Settings, messages: Iterable[SampleMessage], *, per_transaction: int = 500
) -> int:
    """Write messages as the command processor does: transactional, in chunks."""
    producer = Producer(
        {
            "bootstrap.servers": settings.kafka_bootstrap_servers,
            "transactional.id": f"test-producer-{uuid.uuid4().hex}",
            "linger.ms": 5,
        }
    )
    producer.init_transactions(30)
    count = 0
    producer.begin_transaction()
    for message in messages:
        producer.produce(
            settings.topic(message.topic),
            key=message.key,
            value=message.value,
            headers=list(message.headers),
        )
        count += 1
        if count % per_transaction == 0:
            producer.commit_transaction(30)
            producer.begin_transaction()
    producer.commit_transaction(30)
    return count


def end_offsets(settings: Settings, topics: Iterable[str]) -> dict[tuple[str, int], int]:
    consumer = Consumer(
        {"bootstrap.servers": settings.kafka_bootstrap_servers, "group.id": "test-watermarks"}
    )
    try:
        metadata = consumer.list_topics(timeout=10)
        return {
            (topic, p): consumer.get_watermark_offsets(
                TopicPartition(topic, p), timeout=10, cached=False
            )[1]
            for topic in topics
            for p in metadata.topics[topic].partitions
        }
    finally:
        consumer.close()


def stored_positions(settings: Settings, projection: str = "loops") -> dict[tuple[str, int], int]:
    with psycopg.connect(settings.pg_conninfo) as conn:
        rows = conn.execute(
            "select topic, partition, next_offset from projection_positions where projection = %s",
            (projection,),
        ).fetchall()
    return {(t, p): o for t, p, o in rows}


def wait_for(condition: Callable[[], bool], *, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def caught_up(settings: Settings, projection: str = "loops") -> Callable[[], bool]:
    """True once the stored positions reach the end of both source topics.

    A transactional producer ends each partition's transaction with a commit marker, which takes
    an offset of its own but is never delivered: the last record is at `end - 2`.
    """
    topics = [settings.topic("events"), settings.topic("command-results")]

    def check() -> bool:
        ends = end_offsets(settings, topics)
        stored = stored_positions(settings, projection)
        return all(stored.get(tp, 0) >= end - 1 for tp, end in ends.items() if end > 0)

    return check


def start_runner(isolated: Isolated, *args: str, log_path: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "projections.runner", "--loglevel", "info", *args],
        cwd=REPO,
        env=isolated.env,
        stdout=log_path.open("ab"),
        stderr=subprocess.STDOUT,
    )


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
