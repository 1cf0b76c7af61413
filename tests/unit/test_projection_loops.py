"""Projectors: given an event, then these row changes (pure, no services)."""

from __future__ import annotations

from datetime import UTC, datetime

from commands.envelope import CommandResult, EventRef
from events.envelope import EventEnvelope
from events.loops import (
    CheckpointDeleted,
    CheckpointFile,
    CheckpointSaved,
    DomainEvent,
    RunCreated,
    SessionCreated,
    SessionEnded,
)
from projections.loops import TABLES, event_log_row, project_event, project_result

AT = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def envelope(event: DomainEvent, sequence: int, aggregate_id: str = "ses-1") -> EventEnvelope:
    return EventEnvelope(
        event_id=f"evt-{sequence}",
        type=type(event).__name__,
        schema_version=1,
        aggregate_type="session",
        aggregate_id=aggregate_id,
        sequence=sequence,
        occurred_at=AT,
        command_id="cmd-1",
        causation_id="cmd-1",
        correlation_id="corr-1",
        payload=event.model_dump(mode="json"),
    )


def test_session_created_makes_a_whole_active_session_row() -> None:
    event = SessionCreated(session_id="ses-1", base_model="m", project="p", name="n")
    (change,) = project_event(envelope(event, 1), event)
    assert change.table == "sessions" and change.key == ("ses-1",) and change.creates
    assert change.version == 1
    assert change.values["status"] == "active" and change.values["created_at"] == AT
    assert set(change.values) == set(TABLES["sessions"].columns)


def test_session_ended_only_updates_status_columns() -> None:
    event = SessionEnded(session_id="ses-1", reason="user")
    (change,) = project_event(envelope(event, 7), event)
    assert not change.creates and change.version == 7
    assert change.values == {
        "session_id": "ses-1",
        "status": "ended",
        "end_reason": "user",
        "ended_at": AT,
        "version": 7,
        "updated_at": AT,
    }


def test_run_created_projects_the_run_row() -> None:
    event = RunCreated(
        run_id="run-1",
        session_id="ses-1",
        sampler_id="smp-1",
        base_model="m",
        max_seq_len=2048,
        lora_rank=8,
    )
    (change,) = project_event(envelope(event, 2), event)
    assert change.table == "runs" and change.values["lora_rank"] == 8
    assert set(change.values) == set(TABLES["runs"].columns)


def test_checkpoint_saved_keeps_files_as_json_ready_dicts() -> None:
    sha = "a" * 64
    event = CheckpointSaved(
        checkpoint_id="ck-1",
        run_id="run-1",
        session_id="ses-1",
        name="step-1",
        kind="weights",
        uri="bt://loops:run-1/weights/step-1",
        files=(CheckpointFile(relative_file_name="m.safetensors", size_bytes=3, sha256=sha),),
        total_size_bytes=3,
    )
    (change,) = project_event(envelope(event, 4), event)
    assert change.values["files"] == [
        {"relative_file_name": "m.safetensors", "size_bytes": 3, "sha256": sha}
    ]
    assert change.values["status"] == "active"
    assert "files" in TABLES["checkpoints"].json_columns


def test_checkpoint_deleted_marks_the_row_deleted() -> None:
    event = CheckpointDeleted(
        checkpoint_id="ck-1", run_id="run-1", session_id="ses-1", uri="u", reason="expired"
    )
    (change,) = project_event(envelope(event, 9), event)
    assert change.values["status"] == "deleted" and change.values["delete_reason"] == "expired"
    assert not change.creates


def test_every_event_lands_in_the_event_log_with_its_wire_payload() -> None:
    event = SessionEnded(session_id="ses-1", reason="user")
    change = event_log_row(envelope(event, 3), partition=2, offset=41)
    assert change.table == "event_log" and change.key == ("evt-3",)
    assert change.values["payload"] == {"session_id": "ses-1", "reason": "user"}
    assert (change.values["kafka_partition"], change.values["kafka_offset"]) == (2, 41)
    assert set(change.values) == set(TABLES["event_log"].columns)


def test_command_result_becomes_a_future_row() -> None:
    result = CommandResult(
        command_id="cmd-1",
        command_type="CreateRun",
        aggregate_id="ses-1",
        status="rejected",
        reason="session ended",
        field="session_id",
        events=(EventRef(event_id="e", type="RunCreated", sequence=2),),
        processed_at=AT,
    )
    change = project_result(result, partition=0, offset=5)
    assert change.values["status"] == "rejected" and change.values["field"] == "session_id"
    assert change.values["events"] == [{"event_id": "e", "type": "RunCreated", "sequence": 2}]
    assert TABLES["command_results"].insert_only
