"""Replay: rebuild a projection from the log into a shadow schema, compare, swap.

    shadow = replay_into_shadow(settings, projection="loops")   # from offset 0, or from_time=...
    compare(engine, live="loops", shadow="loops__shadow")       # row counts + content checksums
    swap(engine, live="loops", shadow="loops__shadow")           # one transaction

The shadow is a structural clone of the live schema (columns, defaults, checks, keys and index
names), so alembic stays the only author of the schema and a swapped-in shadow is
indistinguishable from a migrated one. Secondary indexes are built after the load, which is the
cheap order for a bulk rebuild.

Replay reads with a plain confluent-kafka consumer on assigned partitions, up to the end offsets
taken when it starts, and applies batches with the same planner and writer as the live faust
runner; it never sends dead letters again (the live runner already did) but counts them.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from multiprocessing import get_context

import psycopg
from confluent_kafka import TIMESTAMP_NOT_AVAILABLE, Consumer, KafkaError, TopicPartition
from sqlalchemy import Engine, text
from sqlalchemy.exc import OperationalError

from infra.settings import Settings, checked_identifier
from projections.db import get_engine
from projections.names import group_id, retired_name, shadow_name, topics_for
from projections.pipeline import PlannedBatch, SourceRecord, overlapped, plan_batch, relax_gc
from projections.pipeline import TopicPartition as TP
from projections.store import ReadModelWriter

log = logging.getLogger(__name__)


@dataclass
class ReplayReport:
    projection: str
    shadow: str
    records: int = 0
    events: int = 0
    dead_letters: int = 0
    seconds: float = 0.0
    start_offsets: dict[TP, int] = field(default_factory=dict)
    end_offsets: dict[TP, int] = field(default_factory=dict)

    @property
    def records_per_s(self) -> float:
        return self.records / self.seconds if self.seconds else 0.0

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0


@dataclass(frozen=True)
class TableComparison:
    table: str
    live_rows: int | None
    shadow_rows: int | None
    live_checksum: str | None
    shadow_checksum: str | None

    @property
    def matches(self) -> bool:
        return (self.live_rows, self.live_checksum) == (self.shadow_rows, self.shadow_checksum)


# --- shadow schema -----------------------------------------------------------------------------


def tables_of(engine: Engine, schema: str) -> list[str]:
    with engine.connect() as conn:
        return list(
            conn.scalars(
                text("select tablename from pg_tables where schemaname = :s order by tablename"),
                {"s": schema},
            )
        )


def create_shadow(engine: Engine, *, live: str, shadow: str) -> list[str]:
    """(Re)create an empty clone of `live`; return the index DDL to run after the load."""
    live, shadow = checked_identifier(live), checked_identifier(shadow)
    deferred: list[str] = []
    with engine.begin() as conn:
        conn.execute(text(f"drop schema if exists {shadow} cascade"))
        conn.execute(text(f"create schema {shadow}"))
        conn.execute(text("delete from projection_positions where projection = :p"), {"p": shadow})
        tables = conn.scalars(
            text("select tablename from pg_tables where schemaname = :s order by tablename"),
            {"s": live},
        ).all()
        if not tables:
            raise RuntimeError(f"schema {live!r} has no tables: run `loopstream db migrate`")
        for table in tables:
            conn.execute(
                text(
                    f"create table {shadow}.{table} (like {live}.{table} including defaults "
                    "including constraints including generated including identity "
                    "including storage including comments)"
                )
            )
            # Keys and unique constraints now (upserts need them), with their live names.
            for name, definition in conn.execute(
                text(
                    "select conname, pg_get_constraintdef(c.oid) from pg_constraint c "
                    "join pg_class r on r.oid = c.conrelid "
                    "join pg_namespace n on n.oid = r.relnamespace "
                    "where n.nspname = :s and r.relname = :t and c.contype in ('p', 'u', 'x') "
                    "order by conname"
                ),
                {"s": live, "t": table},
            ):
                conn.execute(
                    text(f"alter table {shadow}.{table} add constraint {name} {definition}")
                )
            # Plain indexes after the load.
            for (definition,) in conn.execute(
                text(
                    "select pg_get_indexdef(i.indexrelid) from pg_index i "
                    "join pg_class r on r.oid = i.indrelid "
                    "join pg_namespace n on n.oid = r.relnamespace "
                    "where n.nspname = :s and r.relname = :t and not exists "
                    "(select 1 from pg_constraint c where c.conindid = i.indexrelid) "
                    "order by i.indexrelid"
                ),
                {"s": live, "t": table},
            ):
                deferred.append(
                    definition.replace(f" ON {live}.{table} ", f" ON {shadow}.{table} ", 1)
                )
    return deferred


# --- replay ------------------------------------------------------------------------------------


def replay_into_shadow(
    settings: Settings,
    *,
    projection: str = "loops",
    from_time: datetime | None = None,
    batch_size: int = 10_000,
    workers: int = 2,
    timeout_s: float = 600.0,
) -> ReplayReport:
    """Rebuild `projection` into its shadow schema, up to the end offsets seen at the start.

    `workers` processes share the partitions. That is safe because everything one row depends
    on is in one partition (events are keyed by aggregate, results by command id) and positions
    are per partition; and it is what makes replay fast: decoding is the bottleneck, one core
    per worker.
    """
    engine = get_engine(settings)
    shadow = shadow_name(projection)
    topics = topics_for(settings)
    report = ReplayReport(projection=projection, shadow=shadow)
    started = time.monotonic()
    deferred_indexes = create_shadow(engine, live=projection, shadow=shadow)

    partitions, report.start_offsets, report.end_offsets = _offset_ranges(
        settings, [topics.events, topics.command_results], from_time
    )
    shares = balanced_shares(partitions, report.start_offsets, report.end_offsets, workers)
    jobs = [
        _ReplayJob(settings, projection, shadow, share, report.start_offsets, report.end_offsets,
                   batch_size, timeout_s)
        for share in shares
        if share
    ]  # fmt: skip
    if len(jobs) == 1:
        results = [_replay_share(jobs[0])]
    else:
        # spawn, not fork: the parent holds librdkafka threads and pooled connections.
        with ProcessPoolExecutor(len(jobs), mp_context=get_context("spawn")) as pool:
            results = list(pool.map(_replay_share, jobs))
    reached: dict[TP, int] = {}
    for result in results:
        report.records += result.records
        report.events += result.events
        report.dead_letters += result.dead_letters
        reached.update(result.reached)

    # Every partition gets a position, also those with nothing to replay. It is the offset after
    # the last record, as the runner stores it (not the end offset, which counts a trailing
    # commit marker), so a runner that had reached the same records sees no move after a swap.
    ReadModelWriter(engine, projection=shadow).save_positions(
        {tp: reached.get(tp, report.start_offsets[tp]) for tp in partitions}
    )
    with engine.begin() as conn:
        for ddl in deferred_indexes:
            conn.execute(text(ddl))
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(
            text(f"analyze {', '.join(f'{shadow}.{t}' for t in tables_of(engine, shadow))}")
        )
    report.seconds = time.monotonic() - started
    return report


def balanced_shares(
    partitions: Sequence[TP], starts: dict[TP, int], ends: dict[TP, int], workers: int
) -> list[list[TP]]:
    """Whole partitions over `workers`, largest first to the least loaded, by records to read.

    Any split of whole partitions is safe (see `replay_into_shadow`); an even one keeps every
    core busy to the end. Both topics count: their records cost about the same to apply.
    """
    shares: list[list[TP]] = [[] for _ in range(max(workers, 1))]
    loads = [0] * len(shares)
    for tp in sorted(partitions, key=lambda tp: (starts[tp] - ends[tp], tp)):
        least = loads.index(min(loads))
        shares[least].append(tp)
        loads[least] += ends[tp] - starts[tp]
    return shares


@dataclass(frozen=True)
class _ReplayJob:
    settings: Settings
    projection: str
    shadow: str
    partitions: list[TP]
    start_offsets: dict[TP, int]
    end_offsets: dict[TP, int]
    batch_size: int
    timeout_s: float


@dataclass
class _ShareResult:
    records: int = 0
    events: int = 0
    dead_letters: int = 0
    reached: dict[TP, int] = field(default_factory=dict)


def _replay_share(job: _ReplayJob) -> _ShareResult:
    """One worker: its partitions from their start to their end offsets, batch by batch."""
    relax_gc()
    settings = job.settings
    topics = topics_for(settings)
    writer = ReadModelWriter(get_engine(settings), projection=job.shadow)
    result = _ShareResult(reached={tp: job.start_offsets[tp] for tp in job.partitions})
    pending = {tp for tp in job.partitions if job.start_offsets[tp] < job.end_offsets[tp]}
    consumer = read_consumer(
        settings, f"{group_id(settings, job.projection)}.replay", job.start_offsets, pending
    )

    def plan(records: list[SourceRecord]) -> PlannedBatch:
        batch = plan_batch(records, topics)
        result.records += len(records)
        result.events += sum(1 for r in records if r.topic == topics.events)
        result.dead_letters += len(batch.dead_letters)
        return batch

    try:
        # Kafka reads and decoding of batch n+1 run while batch n is written.
        overlapped(
            read_batches(
                consumer,
                end_offsets=job.end_offsets,
                pending=pending,
                reached=result.reached,
                batch_size=job.batch_size,
                timeout_s=job.timeout_s,
            ),
            plan,
            lambda batch: _apply_with_retry(writer, batch),
        )
    finally:
        consumer.close()
    return result


def read_consumer(
    settings: Settings, group_prefix: str, start_offsets: dict[TP, int], partitions: Iterable[TP]
) -> Consumer:
    """A consumer on `partitions` from their start offsets: committed records only."""
    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap_servers,
            # Never committed: replay positions live in PostgreSQL like the runner's.
            "group.id": f"{group_prefix}.{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            "enable.partition.eof": True,
            "auto.offset.reset": "earliest",
            "fetch.max.bytes": 64 * 1024 * 1024,
            "queued.max.messages.kbytes": 256 * 1024,
        }
    )
    consumer.assign([TopicPartition(t, p, start_offsets[(t, p)]) for t, p in partitions])
    return consumer


def read_batches(
    consumer: Consumer,
    *,
    end_offsets: dict[TP, int],
    pending: set[TP],
    reached: dict[TP, int],
    batch_size: int,
    timeout_s: float,
) -> Iterator[list[SourceRecord]]:
    """The `pending` partitions' records up to the end offsets, in batches of `batch_size`.

    `pending` and `reached` (the offset after the last record read) are updated in place.
    """
    deadline = time.monotonic() + timeout_s
    while pending:
        if time.monotonic() > deadline:
            raise TimeoutError(f"replay did not reach the end offsets in {timeout_s}s")
        records: list[SourceRecord] = []
        while pending and len(records) < batch_size:
            messages = consumer.consume(num_messages=batch_size - len(records), timeout=0.2)
            if not messages:
                break
            for message in messages:
                tp = (message.topic(), message.partition())
                error = message.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        if message.offset() >= end_offsets[tp]:
                            pending.discard(tp)
                        continue
                    raise RuntimeError(f"replay consumer error: {error}")
                if message.offset() >= end_offsets[tp]:
                    pending.discard(tp)  # written after the replay began: for the live runner
                    continue
                reached[tp] = message.offset() + 1
                records.append(_source_record(message))
        if records:
            yield records
        for tp, position in _positions(consumer, pending).items():
            if position >= end_offsets[tp]:
                pending.discard(tp)


def _apply_with_retry(writer: ReadModelWriter, batch: PlannedBatch, attempts: int = 5) -> None:
    # Workers never share a row when producers key by aggregate id; one that does not could
    # make two workers deadlock on a row, and PostgreSQL then aborts one: just try it again.
    for attempt in range(attempts):
        try:
            writer.apply(batch)
            return
        except (psycopg.errors.DeadlockDetected, OperationalError) as exc:
            if attempt == attempts - 1 or "deadlock" not in str(exc):
                raise
            log.warning("replay batch deadlocked, retrying: %s", exc)


def _offset_ranges(
    settings: Settings, topic_names: Sequence[str], from_time: datetime | None
) -> tuple[list[TP], dict[TP, int], dict[TP, int]]:
    consumer = Consumer(
        {"bootstrap.servers": settings.kafka_bootstrap_servers, "group.id": "loopstream-replay"}
    )
    try:
        partitions = partitions_of(consumer, topic_names)
        ends = {
            tp: consumer.get_watermark_offsets(TopicPartition(*tp), timeout=10, cached=False)[1]
            for tp in partitions
        }
        starts = _start_offsets(consumer, partitions, from_time, ends)
    finally:
        consumer.close()
    return partitions, starts, ends


def partitions_of(consumer: Consumer, topics: Sequence[str]) -> list[TP]:
    metadata = consumer.list_topics(timeout=10)
    partitions: list[TP] = []
    for topic in topics:
        if topic not in metadata.topics or metadata.topics[topic].error is not None:
            raise RuntimeError(f"topic {topic!r} does not exist")
        partitions += [(topic, p) for p in sorted(metadata.topics[topic].partitions)]
    return partitions


def _start_offsets(
    consumer: Consumer, partitions: list[TP], from_time: datetime | None, ends: dict[TP, int]
) -> dict[TP, int]:
    if from_time is None:
        return dict.fromkeys(partitions, 0)
    ms = int(from_time.timestamp() * 1000)
    found = consumer.offsets_for_times(
        [TopicPartition(t, p, ms) for t, p in partitions], timeout=10
    )
    # -1: no message at or after that time in this partition.
    return {
        (f.topic, f.partition): f.offset if f.offset >= 0 else ends[(f.topic, f.partition)]
        for f in found
    }


def _positions(consumer: Consumer, tps: set[TP]) -> dict[TP, int]:
    if not tps:
        return {}
    return {
        (p.topic, p.partition): p.offset
        for p in consumer.position([TopicPartition(t, p) for t, p in tps])
        if p.offset >= 0
    }


def _source_record(message: object) -> SourceRecord:
    return SourceRecord(
        topic=message.topic(),  # type: ignore[attr-defined]
        partition=message.partition(),  # type: ignore[attr-defined]
        offset=message.offset(),  # type: ignore[attr-defined]
        key=message.key(),  # type: ignore[attr-defined]
        value=message.value(),  # type: ignore[attr-defined]
        headers=tuple(message.headers() or ()),  # type: ignore[attr-defined]
        timestamp_ms=_timestamp_ms(message),
    )


def _timestamp_ms(message: object) -> int | None:
    kind, ms = message.timestamp()  # type: ignore[attr-defined]
    return None if kind == TIMESTAMP_NOT_AVAILABLE else int(ms)


# --- compare and swap --------------------------------------------------------------------------

# Order-independent content checksum: the sum of a 60-bit slice of each row's md5. Same rows,
# same sum, whatever the physical order; any changed value changes it.
_CHECKSUM_SQL = (
    "select count(*), coalesce(sum(('x' || left(md5(t::text), 15))::bit(60)::bigint), 0)::text "
    "from {schema}.{table} as t"
)


def table_checksum(engine: Engine, schema: str, table: str) -> tuple[int, str]:
    with engine.connect() as conn:
        rows, total = conn.execute(
            text(
                _CHECKSUM_SQL.format(
                    schema=checked_identifier(schema), table=checked_identifier(table)
                )
            )
        ).one()
    return rows, f"{int(total) % (1 << 64):016x}"


def compare(engine: Engine, *, live: str, shadow: str) -> list[TableComparison]:
    live_tables, shadow_tables = set(tables_of(engine, live)), set(tables_of(engine, shadow))
    result: list[TableComparison] = []
    for table in sorted(live_tables | shadow_tables):
        live_rows, live_sum = (
            table_checksum(engine, live, table) if table in live_tables else (None, None)
        )
        shadow_rows, shadow_sum = (
            table_checksum(engine, shadow, table) if table in shadow_tables else (None, None)
        )
        result.append(TableComparison(table, live_rows, shadow_rows, live_sum, shadow_sum))
    return result


def swap(engine: Engine, *, live: str, shadow: str, lock_timeout_s: float = 30.0) -> None:
    """Make the shadow the live projection, rows and positions, in one transaction.

    A running runner is not disturbed mid-batch: the position rows are locked first, so the swap
    waits for its open batch, and its next batch finds positions it did not write and resyncs.
    """
    live, shadow = checked_identifier(live), checked_identifier(shadow)
    retired = retired_name(live)
    if not tables_of(engine, shadow):
        raise RuntimeError(f"no shadow schema {shadow!r} to swap in: run a replay first")
    with engine.begin() as conn:
        conn.execute(text(f"set local lock_timeout = '{int(lock_timeout_s * 1000)}ms'"))
        conn.execute(
            text(
                "select 1 from projection_positions where projection in (:live, :shadow) "
                "order by projection, topic, partition for update"
            ),
            {"live": live, "shadow": shadow},
        )
        conn.execute(text("delete from projection_positions where projection = :p"), {"p": live})
        conn.execute(
            text("update projection_positions set projection = :live where projection = :shadow"),
            {"live": live, "shadow": shadow},
        )
        conn.execute(text(f"drop schema if exists {retired} cascade"))
        conn.execute(text(f"alter schema {live} rename to {retired}"))
        conn.execute(text(f"alter schema {shadow} rename to {live}"))
        # Dropping (not keeping) the old tables also invalidates any plan cached against them.
        conn.execute(text(f"drop schema {retired} cascade"))
