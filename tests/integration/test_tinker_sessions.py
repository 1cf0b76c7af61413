"""Tinker sessions end: the janitor's reaper on isolated topics and schema, real Kafka and
PostgreSQL, with a one-second heartbeat timeout."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import psycopg
import pytest

from commands.bus import CommandBus
from commands.envelope import CommandEnvelope
from commands.tinker_sessions import TinkerSessionReaper, finish, heartbeat, start
from events.envelope import utc_now
from events.loops import SessionCreated, SessionEnded
from infra.settings import Settings
from tests.integration.kafka_helpers import isolated_settings, read_topic


@pytest.fixture
def isolated(settings: Settings) -> Iterator[Settings]:
    schema = f"t{uuid.uuid4().hex[:10]}"
    yield isolated_settings(settings, read_schema=schema, tinker_session_timeout_s=1.0)
    with psycopg.connect(settings.pg_conninfo, autocommit=True) as conn:
        conn.execute(f"drop schema if exists {schema}_tinker cascade")


def _created(
    reaper: TinkerSessionReaper, loops_session: str, model_id: str, workspace: str | None = None
) -> None:
    reaper.observe(
        SessionCreated(session_id=loops_session, base_model="tiny", name=f"tinker {model_id}"),
        utc_now(),
        workspace,
    )


def _end_commands(settings: Settings) -> dict[str, CommandEnvelope]:
    ends = {}
    for _, _, value, _ in read_topic(settings, "commands"):
        command = CommandEnvelope.model_validate_json(value or b"")
        if command.type == "EndSession":
            ends[command.aggregate_id] = command
    return ends


def test_silent_and_finished_tinker_sessions_end_and_a_beating_one_stays(
    isolated: Settings,
) -> None:
    reaper = TinkerSessionReaper(isolated, CommandBus(isolated))
    _created(reaper, "quiet-s-0", "quiet:train:0")
    _created(reaper, "quiet-smp0-s-0", "quiet-smp0:train:0")  # its base-model sampler
    _created(reaper, "alive-s-0", "alive:train:0")
    _created(reaper, "done-s-0", "done:train:0", "team-a")  # a session of another workspace
    _created(reaper, "gone-s-0", "gone:train:0")
    reaper.observe(SessionEnded(session_id="gone-s-0", reason="ended by user"), utc_now())
    _created(reaper, "plain", "plain-run")  # a /v1/loops session: not Tinker's to end

    conn = reaper.conn
    start(conn, isolated, "quiet")
    start(conn, isolated, "alive")
    finish(conn, isolated, "done", "tinker session finished")
    time.sleep(1.2)  # the timeout passes for everyone...
    # ...but "alive" beat since (written directly: a heartbeat writes at most every 5 s).
    conn.execute(
        f"update {isolated.read_schema}_tinker.sessions set last_heartbeat_at = now() "
        "where tinker_session_id = 'alive'"
    )

    ended = reaper.end_due(now=utc_now())
    assert sorted(ended) == ["done-s-0", "quiet-s-0", "quiet-smp0-s-0"]
    # Asked once: the next turn sends nothing more.
    reaper.next_check = None
    assert reaper.end_due(now=utc_now()) == []

    commands = _end_commands(isolated)
    sent = {session: command.payload["reason"] for session, command in commands.items()}
    assert sent["done-s-0"] == "tinker session finished"
    assert "no heartbeat" in sent["quiet-s-0"] and "no heartbeat" in sent["quiet-smp0-s-0"]
    # Each EndSession names its session's workspace (the processor refuses one reaching across).
    assert commands["done-s-0"].workspace_id == "team-a"
    assert commands["quiet-s-0"].workspace_id == "default"
    assert "alive-s-0" not in sent and "plain" not in sent and "gone-s-0" not in sent
    # A silent session is over: a heartbeat that comes back late is told so.
    assert heartbeat(conn, isolated, "quiet") is False
    assert heartbeat(conn, isolated, "alive") is True
    # A heartbeat for a session nobody started (or another workspace's) makes no row.
    assert heartbeat(conn, isolated, "never-started") is None
    assert heartbeat(conn, isolated, "alive", "team-a") is None
    assert conn.execute(
        f"select count(*) from {isolated.read_schema}_tinker.sessions "
        "where tinker_session_id = 'never-started'"
    ).fetchone() == (0,)
