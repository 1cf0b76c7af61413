"""How a projection is doing: its recorded failures and how far it is behind its topics.

Read by `loopstream projections status`, `loopstream services status` and `GET /health`. A
projection with failures is "degraded": its read model lacks records of the log (see
`projections/failures.py`); it keeps projecting everything else.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

from confluent_kafka import Consumer, KafkaException, TopicPartition
from sqlalchemy import Engine, text
from sqlalchemy.exc import SQLAlchemyError

from infra.settings import Settings, checked_identifier
from projections.failures import COLUMNS, TABLE, Failure
from projections.names import topics_for
from projections.pipeline import TopicPartition as TP
from projections.store import positions_of

Status = Literal["ok", "degraded"]


@dataclass(frozen=True)
class ProjectionHealth:
    projection: str
    failures: int | None  # None: the read models did not answer
    lag: int | None  # records behind the ends of its topics; None: Kafka did not answer

    @property
    def status(self) -> Status:
        return health_status(self.failures)


def health_status(failures: int | None) -> Status:
    """Degraded when the read model is known to lack records, or cannot say."""
    return "ok" if failures == 0 else "degraded"


def partition_lag(end: int, position: int) -> int:
    """Records between a stored position and the end offset, about.

    A transaction's commit marker takes the last offset and is never delivered, so a caught-up
    projection of a transactional topic stores `end - 1`; a plain producer's topic may show one
    record less than the truth.
    """
    return max(end - position - 1, 0) if end else 0


def total_lag(ends: Mapping[TP, int], positions: Mapping[TP, int]) -> int:
    return sum(partition_lag(end, positions.get(tp, 0)) for tp, end in ends.items())


# --- queries -----------------------------------------------------------------------------------


def count_failures(engine: Engine, schema: str) -> int:
    with engine.connect() as conn:
        query = f"select count(*) from {checked_identifier(schema)}.{TABLE}"
        return int(conn.execute(text(query)).scalar_one())


def latest_failures(engine: Engine, schema: str, *, limit: int = 10) -> list[Failure]:
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                f"select {', '.join(COLUMNS)} from {checked_identifier(schema)}.{TABLE} "
                "order by logged_at desc nulls last, topic, partition, kafka_offset desc "
                "limit :limit"
            ),
            {"limit": limit},
        ).all()
    return [Failure(*row) for row in rows]


_consumer_lock = threading.Lock()


@lru_cache(maxsize=4)
def _watermark_consumer(bootstrap_servers: str) -> Consumer:
    # One per process: connecting costs more than the watermark requests themselves.
    return Consumer({"bootstrap.servers": bootstrap_servers, "group.id": "loopstream-health"})


def end_offsets(settings: Settings, *, timeout_s: float = 2.0) -> dict[TP, int]:
    """End offsets of the projection's source topics (raises KafkaException if Kafka is away)."""
    topics = topics_for(settings)
    with _consumer_lock:
        consumer = _watermark_consumer(settings.kafka_bootstrap_servers)
        metadata = consumer.list_topics(timeout=timeout_s)
        ends: dict[TP, int] = {}
        for topic in (topics.events, topics.command_results):
            if topic not in metadata.topics:
                raise KafkaException(f"topic {topic!r} does not exist")
            for partition in sorted(metadata.topics[topic].partitions):
                tp = TopicPartition(topic, partition)
                ends[(topic, partition)] = consumer.get_watermark_offsets(
                    tp, timeout=timeout_s, cached=False
                )[1]
    return ends


def wait_until_caught_up(
    settings: Settings, engine: Engine, projection: str, *, timeout_s: float, poll_s: float = 0.05
) -> bool:
    """Wait until the projection has applied every record its topics hold now.

    Read-your-writes for the API: a client told that its command was accepted may ask for what
    it created before the projection got there. True once caught up; False after `timeout_s`,
    or when Kafka or PostgreSQL does not answer (the caller then answers from what it has).
    """
    deadline = time.monotonic() + timeout_s
    try:
        ends = end_offsets(settings, timeout_s=min(timeout_s, 2.0))
        while total_lag(ends, positions_of(engine, projection)) > 0:
            if time.monotonic() >= deadline:
                return False
            time.sleep(poll_s)
    except (KafkaException, SQLAlchemyError):
        return False
    return True


def projection_health(settings: Settings, engine: Engine, projection: str) -> ProjectionHealth:
    """Failures and lag; an unreachable database or broker shows as None, never as an error."""
    try:
        failures: int | None = count_failures(engine, projection)
        positions: dict[TP, int] | None = positions_of(engine, projection)
    except SQLAlchemyError:  # the health answer must come even when PostgreSQL does not
        failures, positions = None, None
    lag: int | None = None
    if positions is not None:
        try:
            lag = total_lag(end_offsets(settings), positions)
        except KafkaException:
            lag = None
    return ProjectionHealth(projection=projection, failures=failures, lag=lag)
