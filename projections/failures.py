"""Projection failures: what a skipped record leaves behind in the read schema.

A record the projection cannot apply is dead-lettered and skipped, so the projection keeps going;
this module turns it into a `projection_failures` row (migration 0005), written in the batch's
transaction, which the status commands, `GET /health` and `replay --check` read
(`projections/health.py` queries it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy import Connection, text

from projections.pipeline import DeadLetter

TABLE = "projection_failures"
COLUMNS = (
    "topic", "partition", "kafka_offset", "kafka_key", "logged_at", "event_id", "event_type",
    "aggregate_type", "aggregate_id", "sequence", "error_type", "reason",
)  # fmt: skip
REASON_LIMIT = 500


@dataclass(frozen=True, slots=True)
class Failure:
    topic: str
    partition: int
    kafka_offset: int
    kafka_key: str | None
    logged_at: datetime | None
    event_id: str | None
    event_type: str | None
    aggregate_type: str | None
    aggregate_id: str | None
    sequence: int | None
    error_type: str
    reason: str

    @property
    def aggregate(self) -> str | None:
        """The aggregate the record belongs to: its envelope's, else its Kafka key."""
        return self.aggregate_id or self.kafka_key

    def values(self) -> dict[str, Any]:
        return {column: getattr(self, column) for column in COLUMNS}


def pg_text(value: str | None, limit: int | None = None) -> str | None:
    """`value` as PostgreSQL `text` takes it: the failure row itself must never be refused.

    NUL (often the very reason the record failed) becomes U+FFFD; anything UTF-8 cannot encode
    (a lone surrogate) becomes an escape.
    """
    if value is None:
        return None
    cleaned = value.replace("\x00", "\ufffd").encode("utf-8", "backslashreplace").decode()
    return cleaned[:limit] if limit is not None else cleaned


def failure_of(letter: DeadLetter) -> Failure:
    """The row of one dead letter: where it is in the log, and what can be read of it."""
    record = letter.record
    fields = readable_fields(record.value)
    sequence = fields.get("sequence")
    return Failure(
        topic=record.topic,
        partition=record.partition,
        kafka_offset=record.offset,
        kafka_key=pg_text(record.key.decode("utf-8", "replace")) if record.key else None,
        logged_at=(
            datetime.fromtimestamp(record.timestamp_ms / 1000, UTC)
            if record.timestamp_ms is not None
            else None
        ),
        event_id=_text_field(fields, "event_id"),
        # A command result has no event type: its command's type says what it was.
        event_type=_text_field(fields, "type") or _text_field(fields, "command_type"),
        aggregate_type=_text_field(fields, "aggregate_type"),
        aggregate_id=_text_field(fields, "aggregate_id"),
        # bool is an int to Python, not to the log; and bigint has 64 bits.
        sequence=sequence if type(sequence) is int and -(2**63) <= sequence < 2**63 else None,
        error_type=pg_text(letter.error_type) or "unknown",
        # The first line: PostgreSQL's CONTEXT lines depend on the statement, not the record.
        reason=pg_text((letter.reason.splitlines() or [""])[0], REASON_LIMIT) or "",
    )


def readable_fields(value: bytes | None) -> dict[str, Any]:
    """The top-level fields of a record that may be anything: {} unless it is a JSON object."""
    if not value:
        return {}
    try:
        data = orjson.loads(value)
    except orjson.JSONDecodeError:
        return {}
    return data if isinstance(data, dict) else {}


def _text_field(fields: dict[str, Any], name: str) -> str | None:
    value = fields.get(name)
    return pg_text(value, REASON_LIMIT) if isinstance(value, str) else None


def failures_of(letters: Sequence[DeadLetter]) -> list[Failure]:
    return [failure_of(letter) for letter in letters]


# --- SQL ---------------------------------------------------------------------------------------


def insert_sql(schema: str) -> str:
    # A batch applied again after a crash before its commit finds nothing here (the failure rows
    # rolled back with it); `do nothing` covers a replayed batch that did commit.
    placeholders = ", ".join(f":{c}" for c in COLUMNS)
    return (
        f"insert into {schema}.{TABLE} ({', '.join(COLUMNS)}) values ({placeholders}) "
        "on conflict (topic, partition, kafka_offset) do nothing"
    )


def record_failures(conn: Connection, schema: str, failures: Sequence[Failure]) -> None:
    if failures:
        conn.execute(text(insert_sql(schema)), [failure.values() for failure in failures])
