"""When a Tinker session's loops sessions end: on finish, or after heartbeats stop."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

from commands.tinker_sessions import (
    Liveness,
    OpenLoopsSession,
    SessionInfo,
    end_session,
    sessions_to_end,
    status_of,
    tinker_session_of,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _open(session_id: str, tinker: str, created_s: float = 0) -> OpenLoopsSession:
    return OpenLoopsSession(session_id, tinker, T0 + timedelta(seconds=created_s))


def test_model_ids_name_their_tinker_session() -> None:
    assert tinker_session_of("abc123:train:0") == "abc123"
    assert tinker_session_of("abc123-smp2:train:0") == "abc123"  # a base-model sampler's run
    assert tinker_session_of("my-run") is None  # a /v1/loops run is no Tinker model


def test_a_beating_session_stays_and_a_silent_one_ends_after_the_timeout() -> None:
    sessions = [_open("a-s-0", "a"), _open("b-s-0", "b"), _open("b-s-1", "b")]
    beats = {"a": Liveness(T0 + timedelta(seconds=590)), "b": Liveness(T0 + timedelta(seconds=5))}
    due = sessions_to_end(sessions, beats, now=T0 + timedelta(seconds=605), timeout_s=600)
    assert [s for s, _ in due] == ["b-s-0", "b-s-1"]
    assert all("no heartbeat for 600s" in reason for _, reason in due)


def test_a_finished_session_ends_at_once() -> None:
    beats = {"a": Liveness(T0, finished_at=T0)}
    due = sessions_to_end([_open("a-s-0", "a")], beats, now=T0, timeout_s=600)
    assert due == [("a-s-0", "tinker session finished")]


def test_a_session_never_heard_from_counts_from_its_models_creation() -> None:
    sessions = [_open("old-s-0", "old", created_s=0), _open("new-s-0", "new", created_s=500)]
    due = sessions_to_end(sessions, {}, now=T0 + timedelta(seconds=700), timeout_s=600)
    assert [s for s, _ in due] == ["old-s-0"]


def test_the_end_command_id_derives_from_the_loops_session() -> None:
    first, again = end_session("a-s-0", "x"), end_session("a-s-0", "y")
    assert first.command_id == again.command_id  # a repeated decision is a duplicate
    assert first.type == "EndSession" and first.aggregate_id == "a-s-0"


def _info(**changes: object) -> SessionInfo:
    info = SessionInfo(
        tinker_session_id="abc",
        workspace_id="ws",
        created_at=T0,
        last_heartbeat_at=T0,
        finished_at=None,
        finish_status=None,
        finish_detail=None,
        user_metadata=None,
        display_name=None,
        checkpoints_count=0,
        checkpoint_storage_bytes=0,
    )
    return dataclasses.replace(info, **changes)  # type: ignore[arg-type]


def test_a_session_is_active_while_it_beats_then_finished_with_its_close_reason() -> None:
    def status(info: SessionInfo, after_s: float) -> object:
        return status_of(info, now=T0 + timedelta(seconds=after_s), timeout_s=600)

    assert status(_info(), 599) == {"type": "active"}
    assert status(_info(), 600) is None  # silent: neither finished nor known to be running
    closed = _info(finished_at=T0, finish_status="errored", finish_detail="oom")
    assert status(closed, 1) == {
        "type": "client_finished",
        "reason": {"type": "errored"},
        "detail": "oom",
    }
    assert status(_info(finished_at=T0), 1) is None  # ended by the janitor: no client reason
