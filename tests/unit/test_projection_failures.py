"""A record the projection cannot apply is recorded, never skipped quietly (pure parts)."""

from __future__ import annotations

from datetime import UTC, datetime

import psycopg
import psycopg.errors
import pytest
from sqlalchemy.exc import DataError as SADataError
from sqlalchemy.exc import OperationalError as SAOperationalError

from events.loops import SessionCreated, SessionEnded
from projections import pipeline
from projections.failures import failure_of, pg_text
from projections.health import health_status, partition_lag, total_lag
from projections.pipeline import DeadLetter, ProjectionTopics, SourceRecord, plan_batch
from projections.store import PositionsMoved, refused_by_database
from tests.unit.test_projection_loops import envelope

TOPICS = ProjectionTopics(events="p.events", command_results="p.command-results")


def record(value: bytes | None, offset: int = 7, *, key: bytes | None = b"ses-1") -> SourceRecord:
    return SourceRecord("p.events", 2, offset, key, value, timestamp_ms=1_767_225_600_123)


def test_a_failure_row_names_the_place_the_event_and_the_aggregate() -> None:
    ended = envelope(SessionEnded(session_id="ses-1", reason="a\x00b"), 2)
    failure = failure_of(DeadLetter(record(ended.to_bytes()), "refused_by_database", "NUL"))
    assert (failure.topic, failure.partition, failure.kafka_offset) == ("p.events", 2, 7)
    assert failure.event_id == "evt-2"
    assert failure.event_type == "SessionEnded"
    assert (failure.aggregate_type, failure.aggregate_id, failure.sequence) == (
        "session",
        "ses-1",
        2,
    )
    assert failure.logged_at == datetime(2026, 1, 1, 0, 0, 0, 123000, tzinfo=UTC)
    assert (failure.error_type, failure.reason) == ("refused_by_database", "NUL")


def test_a_non_json_record_is_identified_by_its_key_and_place() -> None:
    failure = failure_of(DeadLetter(record(b"\x00\x01 not json"), "invalid_envelope", "bad"))
    assert failure.event_id is None and failure.aggregate_id is None
    assert failure.kafka_key == "ses-1"
    assert failure.aggregate == "ses-1"


def test_a_failure_row_holds_no_text_postgresql_would_refuse() -> None:
    raw = b'{"event_id": "e\\u0000", "aggregate_id": "a\\u0000b", "type": 5, "sequence": true}'
    letter = DeadLetter(record(raw, key=b"k\x00\xff"), "invalid_envelope", "why\x00\nCONTEXT: x")
    failure = failure_of(letter)
    texts = [failure.event_id, failure.aggregate_id, failure.kafka_key, failure.reason]
    assert all(t is not None and "\x00" not in t for t in texts), texts
    assert failure.reason == "why\ufffd"  # first line only: CONTEXT depends on the statement
    assert failure.event_type is None  # not a string
    assert failure.sequence is None  # a bool is not a sequence
    assert pg_text("\ud800x") == "\\ud800x"  # a lone surrogate cannot be encoded as UTF-8


def test_a_command_result_failure_names_its_command_and_aggregate() -> None:
    raw = b'{"command_id": "c-1", "command_type": "EndSession", "aggregate_id": "ses-9"}'
    failure = failure_of(DeadLetter(record(raw), "invalid_command_result", "status: missing"))
    assert (failure.event_type, failure.aggregate_id) == ("EndSession", "ses-9")


def test_a_projector_that_raises_is_a_dead_letter_and_the_batch_goes_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(envelope: object, event: object) -> list[object]:
        if isinstance(event, SessionEnded):
            raise OverflowError("date value out of range")
        return []

    monkeypatch.setattr(pipeline, "project_event", broken)
    created = envelope(SessionCreated(session_id="ses-1", base_model="m"), 1)
    ended = envelope(SessionEnded(session_id="ses-1", reason="r"), 2)
    batch = plan_batch([record(created.to_bytes(), 1), record(ended.to_bytes(), 2)], TOPICS)
    (letter,) = batch.dead_letters
    assert letter.error_type == "projector_failed"
    assert letter.reason == "OverflowError: date value out of range"
    assert [p.record.offset for p in batch.projected] == [1]
    assert batch.next_offsets == {("p.events", 2): 3}


@pytest.mark.parametrize(
    "exc",
    [
        psycopg.DataError("PostgreSQL text fields cannot contain NUL (0x00) bytes"),
        psycopg.errors.UntranslatableCharacter("unsupported Unicode escape sequence"),
        psycopg.errors.UniqueViolation("duplicate key"),
        psycopg.errors.ProgramLimitExceeded("index row size exceeds btree maximum"),
        SADataError("insert", {}, psycopg.DataError("value out of range")),
        UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed"),
    ],
)
def test_errors_about_the_rows_skip_the_record(exc: BaseException) -> None:
    assert refused_by_database(exc)


@pytest.mark.parametrize(
    "exc",
    [
        psycopg.OperationalError("connection lost"),
        psycopg.errors.DeadlockDetected("deadlock detected"),
        psycopg.errors.UndefinedTable("relation does not exist"),  # our SQL, or no migration
        SAOperationalError("select", {}, psycopg.OperationalError("server closed")),
        PositionsMoved("another runner"),
        RuntimeError("dead letters not delivered"),
    ],
)
def test_errors_about_the_database_or_our_code_retry_the_whole_batch(exc: BaseException) -> None:
    assert not refused_by_database(exc)


def test_health_is_degraded_when_failures_exist_or_are_unknown() -> None:
    assert health_status(0) == "ok"
    assert health_status(3) == "degraded"
    assert health_status(None) == "degraded"


def test_lag_counts_records_past_the_stored_positions() -> None:
    # The commit marker after a transaction's last record takes an offset and is never read.
    assert partition_lag(end=11, position=10) == 0
    assert partition_lag(end=11, position=4) == 6
    assert partition_lag(end=0, position=0) == 0
    ends = {("e", 0): 11, ("e", 1): 5, ("r", 0): 0}
    assert total_lag(ends, {("e", 0): 10}) == 4
