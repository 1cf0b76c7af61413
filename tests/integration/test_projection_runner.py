"""The faust projection runner on the real stack: crash-safety and dead letters."""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from confluent_kafka import Consumer, TopicPartition

from events.envelope import EventEnvelope
from events.loops import SessionCreated
from infra.settings import Settings
from projections.db import get_engine
from projections.replay import compare, replay_into_shadow
from projections.sample import SampleMessage, envelopes, messages
from tests.integration.projection_support import (
    Isolated,
    caught_up,
    isolated_slice,
    produce,
    start_runner,
    stop,
    stored_positions,
    wait_for,
)


@pytest.fixture
def isolated(settings: Settings) -> Iterator[Isolated]:
    yield from isolated_slice(settings)


def _count(isolated: Isolated, sql: str) -> int:
    with psycopg.connect(isolated.settings.pg_conninfo) as conn:
        return conn.execute(sql).fetchone()[0]  # type: ignore[index]


def _open_transactions(isolated: Isolated) -> int:
    """Transactions of other sessions in the test database (only the runner writes there)."""
    return _count(
        isolated,
        "select count(*) from pg_stat_activity where datname = current_database() "
        "and pid <> pg_backend_pid() and xact_start is not null",
    )


def test_runner_killed_mid_batch_resumes_to_the_same_state_as_a_replay(
    isolated: Isolated, tmp_path: Path
) -> None:
    events = 6000
    produce(isolated.settings, messages(events, sessions=60))
    log = tmp_path / "runner.log"

    # Small batches held open for a while before COMMIT, so the kill lands inside one.
    runner = start_runner(
        isolated, "--batch-size", "400", "--pause-before-commit", "0.5",
        "--session-timeout", "6", log_path=log,
    )  # fmt: skip
    try:
        wait_for(
            lambda: (
                _count(isolated, "select count(*) from loops.event_log") > 0
                and _open_transactions(isolated) > 0
            ),
            timeout_s=60,
            what="the runner to be inside a batch after at least one commit",
        )
        committed_before = stored_positions(isolated.settings)
        runner.send_signal(signal.SIGKILL)
        runner.wait(10)
    finally:
        stop(runner)
    applied_at_kill = _count(isolated, "select count(*) from loops.event_log")
    assert 0 < applied_at_kill < events, "the kill should land in the middle of the log"
    # The open batch died with the process: neither its rows nor its positions are visible.
    wait_for(lambda: _open_transactions(isolated) == 0, timeout_s=10, what="rollback")
    assert stored_positions(isolated.settings) == committed_before

    restarted = start_runner(isolated, "--session-timeout", "6", log_path=log)
    try:
        wait_for(caught_up(isolated.settings), timeout_s=120, what="the restarted runner")
    finally:
        stop(restarted)

    assert _count(isolated, "select count(*) from loops.event_log") == events
    assert _count(isolated, "select count(*) from loops.command_results") == events
    # Nothing applied twice: one row per (aggregate, sequence), and each entity's version is its
    # aggregate's last sequence that touched it (checked against the replay below).
    assert (
        _count(isolated, "select count(distinct (aggregate_id, sequence)) from loops.event_log")
        == events
    )

    report = replay_into_shadow(isolated.settings)
    assert report.events == events and report.dead_letters == 0
    comparisons = compare(get_engine(isolated.settings), live="loops", shadow="loops__shadow")
    assert all(c.matches for c in comparisons), comparisons


def _dlq_records(isolated: Isolated, expected: int) -> list[tuple[bytes | None, dict[str, bytes]]]:
    topic = isolated.settings.topic("events.dlq")
    consumer = Consumer(
        {
            "bootstrap.servers": isolated.settings.kafka_bootstrap_servers,
            "group.id": f"test-dlq-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
        }
    )
    consumer.assign([TopicPartition(topic, 0, 0)])
    found: list[tuple[bytes | None, dict[str, bytes]]] = []
    deadline = time.monotonic() + 30
    while len(found) < expected and time.monotonic() < deadline:
        for message in consumer.consume(num_messages=100, timeout=0.5):
            if not message.error():
                found.append((message.value(), dict(message.headers() or [])))
    consumer.close()
    return found


def test_undecodable_events_go_to_the_dlq_and_the_projection_keeps_going(
    isolated: Isolated, tmp_path: Path
) -> None:
    good = [env for env, _ in envelopes(40, sessions=4)]
    valid = SessionCreated(session_id="ses-x", base_model="m")
    template = EventEnvelope(
        event_id=str(uuid.uuid4()),
        type="SessionCreated",
        schema_version=1,
        aggregate_type="session",
        aggregate_id="ses-x",
        sequence=1,
        occurred_at=good[0].occurred_at,
        payload=valid.model_dump(mode="json"),
    )
    unknown = template.model_copy(update={"type": "SessionTeleported", "event_id": "u-1"})
    too_new = template.model_copy(update={"schema_version": 42, "event_id": "u-2"})
    # Valid for pydantic, refused by PostgreSQL (text cannot hold NUL): isolated, dead-lettered.
    nul = template.model_copy(
        update={"event_id": "u-3", "payload": {**valid.model_dump(mode="json"), "name": "a\x00b"}}
    )
    bad = [b"\x00\x01 definitely not json", unknown.to_bytes(), too_new.to_bytes(), nul.to_bytes()]

    def as_message(value: bytes) -> SampleMessage:
        return SampleMessage("events", b"ses-x", value)

    stream = [as_message(e.to_bytes()) for e in good[:20]]
    stream += [as_message(v) for v in bad]
    stream += [as_message(e.to_bytes()) for e in good[20:]]
    produce(isolated.settings, stream, per_transaction=7)

    runner = start_runner(isolated, log_path=tmp_path / "runner.log")
    try:
        wait_for(caught_up(isolated.settings), timeout_s=60, what="the runner")
        assert runner.poll() is None, "the runner must survive bad events"
    finally:
        stop(runner)

    assert _count(isolated, "select count(*) from loops.event_log") == len(good)
    letters = _dlq_records(isolated, expected=len(bad))
    assert [value for value, _ in letters] == bad  # the original bytes, untouched
    kinds = [headers["dlq.error_type"].decode() for _, headers in letters]
    assert kinds == [
        "invalid_envelope",
        "unknown_event_type",
        "unsupported_schema_version",
        "refused_by_database",
    ]
    assert all(headers["dlq.reason"] and headers["dlq.source_offset"] for _, headers in letters)
