"""The faust projection runner on the real stack: crash-safety, dead letters, recorded failures."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from fastapi.testclient import TestClient

from api.app import create_app
from events.envelope import EventEnvelope
from events.loops import SessionCreated, SessionEnded
from infra.settings import Settings
from projections.check import check_against_log
from projections.db import get_engine
from projections.health import projection_health
from projections.replay import compare, replay_into_shadow
from projections.sample import SampleMessage, envelopes, messages
from tests.integration.projection_support import (
    REPO,
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
    # And the read model says it lacks them: one failure row per dead letter.
    with psycopg.connect(isolated.settings.pg_conninfo) as conn:
        recorded = conn.execute(
            "select error_type from loops.projection_failures order by partition, kafka_offset"
        ).fetchall()
    assert sorted(kind for (kind,) in recorded) == sorted(kinds)


def _raw_produce(settings: Settings, records: list[tuple[bytes, bytes]]) -> None:
    """As any local producer can: no transaction, no schema, straight onto the events topic."""
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap_servers})
    for key, value in records:
        producer.produce(settings.topic("events"), key=key, value=value)
    assert producer.flush(30) == 0


def _cli(isolated: Isolated, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "api.cli", *args],
        cwd=REPO,
        env={**isolated.env, "COLUMNS": "250"},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_events_the_projection_cannot_apply_are_recorded_and_the_check_names_their_aggregate(
    isolated: Isolated, tmp_path: Path
) -> None:
    settings = isolated.settings
    good = [env for env, _ in envelopes(60, sessions=4)]
    created = EventEnvelope(
        event_id="evt-x-1",
        type="SessionCreated",
        schema_version=1,
        aggregate_type="session",
        aggregate_id="ses-x",
        sequence=1,
        occurred_at=good[0].occurred_at,
        payload=SessionCreated(session_id="ses-x", base_model="m").model_dump(mode="json"),
    )
    # A valid event PostgreSQL cannot store (NUL in text): the log says ended, the read model
    # cannot. And a record that is not even JSON, keyed by its aggregate as producers do.
    ended = created.model_copy(
        update={
            "event_id": "evt-x-2",
            "type": "SessionEnded",
            "sequence": 2,
            "payload": SessionEnded(session_id="ses-x", reason="a\x00b").model_dump(mode="json"),
        }
    )
    stream = [(e.aggregate_id.encode(), e.to_bytes()) for e in good[:30]]
    stream += [(b"ses-x", created.to_bytes()), (b"ses-x", ended.to_bytes())]
    stream += [(b"ses-y", b"{not json")]
    stream += [(e.aggregate_id.encode(), e.to_bytes()) for e in good[30:]]
    _raw_produce(settings, stream)

    runner = start_runner(isolated, log_path=tmp_path / "runner.log")
    try:
        wait_for(
            lambda: (
                _count(isolated, "select count(*) from loops.event_log") == len(good) + 1
                and _count(isolated, "select count(*) from loops.projection_failures") == 2
            ),
            timeout_s=60,
            what="the runner to apply the good events and record the two failures",
        )
        assert runner.poll() is None, "the runner must survive events it cannot apply"
    finally:
        stop(runner)

    # Recorded, with where it is in the log and what it was.
    with psycopg.connect(settings.pg_conninfo) as conn:
        failures = conn.execute(
            "select topic, event_id, event_type, aggregate_id, sequence, kafka_key, error_type, "
            "reason, logged_at is not null from loops.projection_failures order by error_type"
        ).fetchall()
        (status,) = conn.execute(
            "select status from loops.sessions where session_id = 'ses-x'"
        ).fetchone()  # type: ignore[misc]
    assert [f[:7] for f in failures] == [
        (settings.topic("events"), None, None, None, None, "ses-y", "invalid_envelope"),
        (settings.topic("events"), "evt-x-2", "SessionEnded", "ses-x", 2, "ses-x",
         "refused_by_database"),
    ]  # fmt: skip
    assert failures[1][7]  # PostgreSQL's words (jsonb refuses \u0000)
    assert all(f[8] for f in failures)  # dated by the log's record timestamps
    # Every other event of the log was applied, those of the NUL event's batch included.
    assert status == "active"  # what the read model cannot know; the failure row says so
    assert _count(isolated, "select count(*) from loops.sessions") == 5

    # Visible: the health query, GET /health and `projections status`.
    health = projection_health(settings, get_engine(settings), "loops")
    assert (health.status, health.failures, health.lag) == ("degraded", 2, 0)
    body = TestClient(create_app(settings)).get("/health").json()
    assert body == {"status": "degraded", "projection": "loops", "projection_failures": 2,
                    "lag": 0}  # fmt: skip
    shown = _cli(isolated, "projections", "status")
    assert shown.returncode == 0, shown.stderr
    assert "loops failures: 2" in shown.stdout and "evt-x-2" in shown.stdout

    # A replay skips the same records, so shadow and live agree (all the old check compared) ...
    replay_into_shadow(settings)
    comparisons = compare(get_engine(settings), live="loops", shadow="loops__shadow")
    assert all(c.matches for c in comparisons), comparisons
    # ... but the log does not: both aggregates are named, and --check fails.
    check = check_against_log(settings)
    assert {m.aggregate_id: m.missing for m in check.mismatches} == {"ses-x": 1, "ses-y": 1}
    replayed = _cli(isolated, "replay", "--check")
    assert replayed.returncode == 1, replayed.stdout + replayed.stderr
    assert "MISMATCH" in replayed.stderr and "ses-x" in replayed.stdout
