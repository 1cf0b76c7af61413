"""The Loops session aggregate as given events / when command / then events (or rejection)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from commands.loops import (
    CreateRun,
    CreateSession,
    DeleteCheckpoint,
    EndSession,
    RecordCheckpoint,
    Rejected,
    SessionState,
    decide,
    initial_state,
)
from commands.registry import SESSION
from events.loops import (
    CheckpointDeleted,
    CheckpointFile,
    CheckpointSaved,
    DomainEvent,
    RunCreated,
    RunStopped,
    SamplerCreated,
    SessionCreated,
)

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
FILES = (CheckpointFile(relative_file_name="model.safetensors", size_bytes=100, sha256="b" * 64),)


def given(*events: DomainEvent) -> SessionState:
    state = initial_state("s1")
    for sequence, event in enumerate(events, start=1):
        state = SESSION.advance(state, event, sequence)
    return state


def created() -> list[DomainEvent]:
    return [SessionCreated(session_id="s1", base_model="tiny")]


def with_run() -> list[DomainEvent]:
    return [
        *created(),
        RunCreated(
            run_id="r1", session_id="s1", sampler_id="p1", base_model="tiny", max_seq_len=128,
            lora_rank=0,
        ),
        SamplerCreated(sampler_id="p1", run_id="r1", session_id="s1", base_model="tiny"),
    ]  # fmt: skip


def record(name: str = "step-1", checkpoint_id: str = "c1", **kw: object) -> RecordCheckpoint:
    return RecordCheckpoint(
        run_id="r1", checkpoint_id=checkpoint_id, name=name, kind="weights", files=FILES, **kw
    )  # type: ignore[arg-type]


def test_creates_a_session() -> None:
    events = decide(given(), CreateSession(base_model="tiny"), now=NOW)
    assert events == [SessionCreated(session_id="s1", base_model="tiny")]


def test_rejects_creating_a_session_twice() -> None:
    with pytest.raises(Rejected, match="already exists") as exc:
        decide(given(*created()), CreateSession(base_model="tiny"), now=NOW)
    assert exc.value.field == "aggregate_id"


def test_rejects_commands_for_a_missing_session() -> None:
    with pytest.raises(Rejected, match="does not exist"):
        decide(given(), EndSession(), now=NOW)


def test_creating_a_run_provisions_its_sampler_too() -> None:
    events = decide(
        given(*created()), CreateRun(run_id="r1", sampler_id="p1", max_seq_len=128), now=NOW
    )
    assert [type(e) for e in events] == [RunCreated, SamplerCreated]
    assert events[0].base_model == "tiny"  # type: ignore[attr-defined]


def test_rejects_a_second_active_run_in_one_session() -> None:
    with pytest.raises(Rejected, match="already has an active run") as exc:
        decide(given(*with_run()), CreateRun(run_id="r2", sampler_id="p2", max_seq_len=8), now=NOW)
    assert exc.value.field == "run_id"


def test_rejects_start_from_a_missing_checkpoint_of_this_session() -> None:
    stopped = given(*with_run(), RunStopped(run_id="r1", session_id="s1", reason="done"))
    with pytest.raises(Rejected, match="does not exist") as exc:
        decide(
            stopped,
            CreateRun(
                run_id="r2", sampler_id="p2", max_seq_len=8,
                from_checkpoint="bt://loops:r1/weights/nope",
            ),
            now=NOW,
        )  # fmt: skip
    assert exc.value.field == "from_checkpoint"


def test_starts_from_a_live_checkpoint_of_this_session() -> None:
    saved = decide(given(*with_run()), record(), now=NOW)
    stopped = given(*with_run(), *saved, RunStopped(run_id="r1", session_id="s1", reason="done"))
    events = decide(
        stopped,
        CreateRun(
            run_id="r2", sampler_id="p2", max_seq_len=8,
            from_checkpoint="bt://loops:r1/weights/step-1",
        ),
        now=NOW,
    )  # fmt: skip
    assert events[0].from_checkpoint == "bt://loops:r1/weights/step-1"  # type: ignore[attr-defined]


def test_checkpoint_gets_the_platform_uri_and_ttl() -> None:
    [event] = decide(given(*with_run()), record(ttl_seconds=60, step=3), now=NOW)
    assert isinstance(event, CheckpointSaved)
    assert event.uri == "bt://loops:r1/weights/step-1"
    assert event.expires_at == NOW + timedelta(seconds=60)
    assert event.total_size_bytes == 100


def test_rejects_checkpoint_name_reused_in_the_same_run_and_kind() -> None:
    state = given(*with_run(), *decide(given(*with_run()), record(), now=NOW))
    with pytest.raises(Rejected, match="already exists") as exc:
        decide(state, record(checkpoint_id="c2"), now=NOW)
    assert exc.value.field == "name"


def test_rejects_checkpoint_for_unknown_run() -> None:
    with pytest.raises(Rejected, match="run r1 does not exist"):
        decide(given(*created()), record(), now=NOW)


def test_rejects_checkpoint_files_escaping_the_folder() -> None:
    bad = RecordCheckpoint(
        run_id="r1", checkpoint_id="c1", name="x", kind="weights",
        files=(CheckpointFile(relative_file_name="../etc/passwd", size_bytes=1, sha256="c" * 64),),
    )  # fmt: skip
    with pytest.raises(Rejected, match="inside the checkpoint folder"):
        decide(given(*with_run()), bad, now=NOW)


def test_deleting_a_checkpoint_frees_its_name() -> None:
    saved = decide(given(*with_run()), record(), now=NOW)
    deleted = decide(given(*with_run(), *saved), DeleteCheckpoint(checkpoint_id="c1"), now=NOW)
    state = given(*with_run(), *saved, *deleted)
    assert state.checkpoints["c1"].deleted
    assert decide(state, record(checkpoint_id="c2"), now=NOW)  # same name, new checkpoint
    with pytest.raises(Rejected, match="already deleted"):
        decide(state, DeleteCheckpoint(checkpoint_id="c1"), now=NOW)


def test_ending_a_session_stops_its_run_and_sampler_first() -> None:
    events = decide(given(*with_run()), EndSession(reason="done"), now=NOW)
    assert [type(e).__name__ for e in events] == ["RunStopped", "SamplerStopped", "SessionEnded"]
    state = given(*with_run(), *events)
    assert state.status == "ended" and not state.runs["r1"].active
    with pytest.raises(Rejected, match="has ended"):
        decide(state, CreateRun(run_id="r2", sampler_id="p2", max_seq_len=8), now=NOW)


def test_version_follows_the_sequence() -> None:
    assert given(*with_run()).version == 3


def test_command_models_name_the_bad_field() -> None:
    with pytest.raises(ValueError, match="from_checkpoint"):
        CreateRun(run_id="r1", sampler_id="p1", max_seq_len=8, from_checkpoint="s3://x/y")
    with pytest.raises(ValueError, match="lora_rank"):
        CreateRun(run_id="r1", sampler_id="p1", max_seq_len=8, lora_rank=-1)


def test_keep_last_deletes_the_oldest_of_the_same_kind_on_save() -> None:
    history: list[DomainEvent] = [
        *created(),
        RunCreated(
            run_id="r1", session_id="s1", sampler_id="p1", base_model="tiny", max_seq_len=8,
            lora_rank=0, keep_last_checkpoints=2,
        ),
    ]  # fmt: skip
    for i in range(3):
        events = decide(given(*history), record(f"step-{i}", f"c{i}"), now=NOW)
        history += events
    deleted = [e for e in history if isinstance(e, CheckpointDeleted)]
    assert [(e.checkpoint_id, e.reason) for e in deleted] == [("c0", "retention")]
    state = given(*history)
    assert [c.checkpoint_id for c in state.checkpoints.values() if not c.deleted] == ["c1", "c2"]
