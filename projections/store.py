"""Writing planned batches into PostgreSQL: one transaction per batch, rows plus positions.

The fast path is COPY into a temporary staging table and one set-based statement per
(table, kind of change): `INSERT ... SELECT ... ON CONFLICT` for whole rows, `UPDATE ... FROM`
for partial ones. Every write is guarded by the row's `version`, so a replayed event is a no-op.

The positions of the batch's partitions are locked (`SELECT ... FOR UPDATE`) and compared with
what the caller believes first. A mismatch means someone else moved this projection (a second
runner, or a replay swap); the batch is rolled back and `PositionsMoved` tells the caller to
resync from the stored positions.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import orjson
import psycopg
import psycopg.errors
from pydantic_core import to_json
from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import StatementError

from infra.settings import checked_identifier
from projections.access import ACCESS_TABLES
from projections.async_requests import ASYNC_REQUEST_TABLES
from projections.deployments import DEPLOYMENT_TABLES, REPLICA_TABLES
from projections.failures import failures_of, record_failures
from projections.loops import TABLES
from projections.pipeline import DeadLetter, PlannedBatch, Projected, TopicPartition
from projections.rows import RowChange, TableSpec, group_for_write, merge_changes

log = logging.getLogger(__name__)

# Every read-model table a projection writes, by context.
READ_MODEL_TABLES: Mapping[str, TableSpec] = {
    **TABLES,
    **ACCESS_TABLES,
    **DEPLOYMENT_TABLES,
    **REPLICA_TABLES,
    **ASYNC_REQUEST_TABLES,
}

# What PostgreSQL says about a row it will not take, every time (as opposed to a lost connection,
# a deadlock or a bug in our SQL, which are retried by crashing): bad values, broken constraints,
# an index entry over the size limit. The raw psycopg errors come from the COPY path, SQLAlchemy's
# wrappers from its own statements.
_REFUSED_BY_POSTGRES = (
    psycopg.DataError,
    psycopg.IntegrityError,
    psycopg.errors.ProgramLimitExceeded,
)
# What the driver refuses before PostgreSQL sees the value (e.g. text it cannot encode).
_UNWRITABLE = (ValueError, TypeError, OverflowError)


def _is_database_error(exc: BaseException) -> bool:
    return isinstance(exc, (psycopg.Error, StatementError))


def refused_by_database(exc: BaseException) -> bool:
    """True when `exc` is about the rows written (skip the record), not the database or our code.

    A DataError about NUL in text is the record's fault and would recur on every retry; a
    connection error or a deadlock is not, and must end the batch so it is retried whole.
    """
    if isinstance(exc, StatementError) and exc.orig is not None:
        exc = exc.orig
    return isinstance(exc, (*_REFUSED_BY_POSTGRES, *_UNWRITABLE))


DeadLetterSink = Callable[[Sequence[DeadLetter]], None]


class PositionsMoved(RuntimeError):
    """Stored positions differ from the runner's: another writer moved the projection."""


# --- SQL text (pure) ---------------------------------------------------------------------------


def stage_name(table: str, columns: Sequence[str]) -> str:
    return f"stage_{table}_{zlib.crc32(','.join(columns).encode()):08x}"


def create_stage_sql(schema: str, table: str, columns: Sequence[str]) -> str:
    # Typed by the target table itself, so COPY parses values exactly as the table would.
    return (
        f"create temp table if not exists {stage_name(table, columns)} on commit delete rows "
        f"as select {', '.join(columns)} from {schema}.{table} with no data"
    )


def write_sql(schema: str, spec: TableSpec, columns: Sequence[str], *, creates: bool) -> str:
    stage = stage_name(spec.name, columns)
    target = f"{schema}.{spec.name}"
    cols = ", ".join(columns)
    if spec.insert_only:
        return f"insert into {target} ({cols}) select {cols} from {stage} on conflict do nothing"
    settable = [c for c in columns if c not in spec.key]
    if creates:
        updates = ", ".join(f"{c} = excluded.{c}" for c in settable)
        return (
            f"insert into {target} ({cols}) select {cols} from {stage} "
            f"on conflict ({', '.join(spec.key)}) do update set {updates} "
            f"where {spec.name}.version < excluded.version"
        )
    updates = ", ".join(f"{c} = s.{c}" for c in settable)
    match = " and ".join(f"t.{k} = s.{k}" for k in spec.key)
    return (
        f"update {target} as t set {updates} from {stage} as s "
        f"where {match} and t.version < s.version"
    )


# --- the writer --------------------------------------------------------------------------------


def positions_of(engine: Engine, projection: str) -> dict[TopicPartition, int]:
    """Where a projection's stored positions stand: (topic, partition) -> next offset."""
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "select topic, partition, next_offset from projection_positions "
                "where projection = :p"
            ),
            {"p": projection},
        ).all()
    return {(topic, partition): offset for topic, partition, offset in rows}


class ReadModelWriter:
    """Applies planned batches of one projection (its name is its schema) to PostgreSQL."""

    def __init__(
        self,
        engine: Engine,
        *,
        projection: str,
        schema: str | None = None,
        tables: Mapping[str, TableSpec] = READ_MODEL_TABLES,
    ) -> None:
        self.engine = engine
        self.projection = checked_identifier(projection)
        self.schema = checked_identifier(schema or projection)
        self.tables = tables

    def load_positions(self, topics: Sequence[str]) -> dict[TopicPartition, int]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                text(
                    "select topic, partition, next_offset from projection_positions "
                    "where projection = :projection and topic = any(:topics)"
                ),
                {"projection": self.projection, "topics": list(topics)},
            ).all()
        return {(topic, partition): offset for topic, partition, offset in rows}

    def apply(
        self,
        batch: PlannedBatch,
        *,
        expected: Mapping[TopicPartition, int] | None = None,
        dead_letter_sink: DeadLetterSink | None = None,
        before_commit: Callable[[], None] | None = None,
    ) -> list[DeadLetter]:
        """Write the batch, its failures and its next offsets in one transaction.

        `expected`: the positions the caller resumed from (checked, see `PositionsMoved`).
        Every record the batch skips (its dead letters, and rows PostgreSQL refused) becomes a
        `projection_failures` row in the same transaction, so a read model that differs from the
        log always says so. `dead_letter_sink` is called with them too, before the commit: a
        crash between the two repeats the dead letters (at least once in the DLQ), never loses
        them. Returns the records skipped.
        """
        if not batch.next_offsets:
            return []
        try:
            with self.engine.begin() as conn:
                self._fence(conn, batch, expected)
                self._write(conn, batch.changes)
                self._finish(conn, batch, batch.dead_letters, dead_letter_sink)
                if before_commit is not None:
                    before_commit()
            return list(batch.dead_letters)
        except Exception as exc:
            if not refused_by_database(exc):
                raise
            # One bad row must not cost the batch: find it (a savepoint per record), record it,
            # keep the rest.
            log.warning("batch refused by PostgreSQL (%s); applying record by record", exc)
        with self.engine.begin() as conn:
            self._fence(conn, batch, expected)
            letters = [*batch.dead_letters, *self._write_one_by_one(conn, batch.projected)]
            self._finish(conn, batch, letters, dead_letter_sink)
        return letters

    def _finish(
        self,
        conn: Connection,
        batch: PlannedBatch,
        letters: Sequence[DeadLetter],
        sink: DeadLetterSink | None,
    ) -> None:
        self._sink(sink, letters)
        record_failures(conn, self.schema, failures_of(letters))
        self._save_positions(conn, batch.next_offsets)

    @staticmethod
    def _sink(sink: DeadLetterSink | None, letters: Sequence[DeadLetter]) -> None:
        if sink is not None and letters:
            sink(letters)

    def _fence(
        self,
        conn: Connection,
        batch: PlannedBatch,
        expected: Mapping[TopicPartition, int] | None,
    ) -> None:
        # Rows and positions commit together, so a commit lost in a database crash loses its
        # positions too and is simply applied again from Kafka: no need to wait for the WAL flush.
        conn.execute(text("set local synchronous_commit = off"))
        topics = sorted({topic for topic, _ in batch.next_offsets})
        stored = {
            (topic, partition): offset
            for topic, partition, offset in conn.execute(
                text(
                    "select topic, partition, next_offset from projection_positions "
                    "where projection = :projection and topic = any(:topics) "
                    "order by topic, partition for update"
                ),
                {"projection": self.projection, "topics": topics},
            )
        }
        if expected is None:
            return
        for tp in batch.next_offsets:
            if stored.get(tp, 0) != expected.get(tp, 0):
                raise PositionsMoved(
                    f"{self.projection} {tp[0]}[{tp[1]}] is at {stored.get(tp, 0)} in PostgreSQL, "
                    f"this runner expected {expected.get(tp, 0)}"
                )

    def _write(self, conn: Connection, changes: Sequence[RowChange]) -> None:
        raw: psycopg.Connection[Any] = conn.connection.driver_connection  # type: ignore[assignment]
        merged = merge_changes(changes, self.tables)
        with raw.cursor() as cur:
            for (table, creates, columns), rows in group_for_write(merged, self.tables).items():
                spec = self.tables[table]
                encoders = json_encoders(spec, columns)
                if encoders:
                    rows = [_with_json(row, encoders) for row in rows]
                if creates and self._copy_direct(cur, spec, columns, rows):
                    continue
                cur.execute(create_stage_sql(self.schema, table, columns))
                _copy_rows(cur, stage_name(table, columns), columns, rows)
                cur.execute(write_sql(self.schema, spec, columns, creates=creates))
                # ON COMMIT DELETE ROWS only empties the stage at commit; a second group of the
                # same table in this transaction must not see these rows again.
                cur.execute(f"truncate {stage_name(table, columns)}")

    def _copy_direct(
        self,
        cur: psycopg.Cursor[Any],
        spec: TableSpec,
        columns: Sequence[str],
        rows: Sequence[tuple[Any, ...]],
    ) -> bool:
        """COPY new rows straight into the table; False (nothing written) if a key exists.

        Whole rows whose keys are not in the table yet are what a live projection and a replay
        write almost always. For them the guarded upsert is a plain insert, so COPY into the
        table gives the same rows for about half of PostgreSQL's work (no stage, no speculative
        insertion). A key that exists (a replayed event, a second runner) raises a unique
        violation: the savepoint undoes the partial COPY and the caller takes the guarded path.
        """
        cur.execute("savepoint direct_copy")
        try:
            _copy_rows(cur, f"{self.schema}.{spec.name}", columns, rows)
        except psycopg.errors.UniqueViolation:
            cur.execute("rollback to savepoint direct_copy")
            return False
        cur.execute("release savepoint direct_copy")
        return True

    def _write_one_by_one(
        self, conn: Connection, projected: Sequence[Projected]
    ) -> list[DeadLetter]:
        refused: list[DeadLetter] = []
        for item in projected:
            savepoint = conn.begin_nested()
            try:
                self._write(conn, item.changes)
                savepoint.commit()
            except Exception as exc:
                if not refused_by_database(exc):
                    raise
                savepoint.rollback()
                reason = str(exc) if _is_database_error(exc) else f"{type(exc).__name__}: {exc}"
                refused.append(DeadLetter(item.record, "refused_by_database", reason[:500]))
        return refused

    def save_positions(self, offsets: Mapping[TopicPartition, int]) -> None:
        with self.engine.begin() as conn:
            self._save_positions(conn, offsets)

    def _save_positions(self, conn: Connection, offsets: Mapping[TopicPartition, int]) -> None:
        conn.execute(
            text(
                "insert into projection_positions (projection, topic, partition, next_offset) "
                "values (:projection, :topic, :partition, :next_offset) "
                "on conflict (projection, topic, partition) do update "
                "set next_offset = excluded.next_offset, updated_at = now()"
            ),
            [
                {"projection": self.projection, "topic": t, "partition": p, "next_offset": o}
                for (t, p), o in sorted(offsets.items())
            ],
        )


def _copy_rows(
    cur: psycopg.Cursor[Any], target: str, columns: Sequence[str], rows: Sequence[tuple[Any, ...]]
) -> None:
    with cur.copy(f"copy {target} ({', '.join(columns)}) from stdin") as copy:
        for row in rows:
            copy.write_row(row)


JsonEncoder = Callable[[Any], str]


def _jsonb_text(value: Any) -> str:
    # `jsonb` stores parsed JSON, so any equivalent text gives the same value: orjson is ~3x
    # faster than pydantic-core here. It refuses what it cannot write exactly (integers beyond
    # 64 bits, for one): pydantic-core then does it, as it always did.
    try:
        return orjson.dumps(value).decode()
    except TypeError:
        return _json_text(value)


def _json_text(value: Any) -> str:
    # `json` keeps the text as sent: serialise exactly as before, or a replay of old events
    # would not compare equal to rows written by earlier code.
    return to_json(value).decode()


def json_encoders(spec: TableSpec, columns: Sequence[str]) -> list[tuple[int, JsonEncoder]]:
    """(position, encoder) of each JSON column among `columns`."""
    return [
        (i, _json_text if c in spec.json_text_columns else _jsonb_text)
        for i, c in enumerate(columns)
        if c in spec.json_columns
    ]


def _with_json(
    row: tuple[Any, ...], encoders: Sequence[tuple[int, JsonEncoder]]
) -> tuple[Any, ...]:
    values = list(row)
    for i, encode in encoders:
        # None stays SQL NULL (not the JSON value null), so `is null` queries work.
        if values[i] is not None:
            values[i] = encode(values[i])
    return tuple(values)
