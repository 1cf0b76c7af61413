"""Projectors: given an event, then these row changes (pure, no services)."""

from __future__ import annotations

from datetime import UTC, datetime

from commands.envelope import CommandResult, EventRef
from events.envelope import EventEnvelope
from events.loops import (
    CheckpointDeleted,
    CheckpointFile,
    CheckpointPromoted,
    CheckpointSaved,
    DomainEvent,
    RunCreated,
    SessionCreated,
    SessionEnded,
    WeightsReady,
)
from events.work import HotloadFailed, HotloadStarted, HotloadSucceeded
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
        category="user",
        events=(EventRef(event_id="e", type="RunCreated", sequence=2),),
        processed_at=AT,
    )
    change = project_result(result, partition=0, offset=5)
    assert change.values["status"] == "rejected" and change.values["field"] == "session_id"
    assert change.values["category"] == "user"  # a future read from the table says who can fix it
    assert change.values["events"] == [{"event_id": "e", "type": "RunCreated", "sequence": 2}]
    assert TABLES["command_results"].insert_only


def test_a_weight_sync_is_a_row_per_sampler_and_version_with_its_command() -> None:
    event = WeightsReady(
        sampler_id="smp-1", run_id="run-1", session_id="ses-1", checkpoint_id="ck-1",
        uri="bt://loops:run-1/sampler_weights/a", content_digest="d" * 64, weights_version=3,
        checkpoint_type="delta", warmup=True,
    )  # fmt: skip
    (change,) = project_event(envelope(event, 9), event)
    assert change.table == "weight_syncs" and change.key == ("smp-1", 3) and change.version == 9
    assert change.values["command_id"] == "cmd-1" and change.values["warmup"] is True
    assert set(change.values) == set(TABLES["weight_syncs"].columns)


def test_hotload_outcomes_fill_the_sync_row_and_the_samplers_last_hotload() -> None:
    uri = "bt://loops:run-1/sampler_weights/a"
    started = HotloadStarted(checkpoint_id="ck-1", uri=uri, from_digest="0" * 64,
                             weights_version=2)  # fmt: skip
    (row,) = project_event(envelope(started, 4, "smp-1"), started)
    assert (row.table, row.key, row.values["status"]) == ("hotloads", ("smp-1", 2), "started")

    ok = HotloadSucceeded(
        checkpoint_id="ck-1", uri=uri, checkpoint_type="delta", content_digest="d" * 64,
        folders_applied=1, bytes_moved=10, fetch_ms=1.0, apply_ms=1.0, total_ms=2.0,
        weights_version=2, warmup_attempts=1, warmup_ms=3.0,
    )  # fmt: skip
    sync, sampler = project_event(envelope(ok, 5, "smp-1"), ok)
    assert sync.values["status"] == "succeeded" and sync.values["warmup_attempts"] == 1
    assert sampler.table == "sampler_weights" and sampler.key == ("smp-1",)
    assert sampler.values["last_hotload_status"] == "succeeded"

    failed = HotloadFailed(
        checkpoint_id="ck-2", uri=uri, reason="WarmupError: no", bytes_moved=10, total_ms=2.0,
        serving_checkpoint_id="ck-1", serving_digest="d" * 64, weights_version=3,
        rolled_back=True,
    )  # fmt: skip
    sync, sampler = project_event(envelope(failed, 8, "smp-1"), failed)
    assert sync.key == ("smp-1", 3) and sync.values["rolled_back"] is True
    assert sampler.values["last_hotload_reason"] == "WarmupError: no"
    assert all(set(c.values) <= set(TABLES[c.table].columns) for c in (sync, sampler))


def test_a_pinned_requests_load_is_not_a_sync() -> None:
    event = HotloadStarted(checkpoint_id="ck-1", uri="bt://loops:r/sampler_weights/a",
                           from_digest="0" * 64)  # fmt: skip
    assert project_event(envelope(event, 2, "smp-1"), event) == []


def test_a_promotion_is_an_insert_only_row_per_environment() -> None:
    event = CheckpointPromoted(
        checkpoint_id="ck-1",
        run_id="run-1",
        session_id="ses-1",
        uri="bt://loops:run-1/sampler_weights/a",
        environment="staging",
    )
    (change,) = project_event(envelope(event, 5), event)
    assert (change.table, change.key) == ("promotions", ("ck-1", "staging"))
    assert TABLES["promotions"].insert_only and change.values["promoted_at"] == AT


# --- tenancy (migration 0008) ------------------------------------------------------------------


def test_rows_created_by_an_event_belong_to_the_envelopes_workspace() -> None:
    event = SessionCreated(session_id="ses-1", base_model="m", project="p", name="n")
    tenant = envelope(event, 1).model_copy(update={"workspace_id": "team-a"})
    (change,) = project_event(tenant, event)
    assert change.values["workspace_id"] == "team-a"
    assert event_log_row(tenant, partition=0, offset=0).values["workspace_id"] == "team-a"


def test_events_written_before_tenancy_belong_to_the_default_workspace() -> None:
    event = SessionCreated(session_id="ses-1", base_model="m", project="p", name="n")
    (change,) = project_event(envelope(event, 1), event)
    assert change.values["workspace_id"] == "default"
    assert event_log_row(envelope(event, 1), partition=0, offset=0).values["workspace_id"] == (
        "default"
    )


def test_an_update_never_moves_a_row_to_another_workspace() -> None:
    event = SessionEnded(session_id="ses-1", reason="user")
    tenant = envelope(event, 2).model_copy(update={"workspace_id": "team-a"})
    (change,) = project_event(tenant, event)
    assert "workspace_id" not in change.values


def test_a_future_belongs_to_the_workspace_its_command_named() -> None:
    def result(workspace_id: str | None) -> CommandResult:
        return CommandResult(
            command_id="cmd-1", command_type="CreateSession", aggregate_id="ses-1",
            status="accepted", workspace_id=workspace_id,
        )  # fmt: skip

    assert project_result(result("team-a"), partition=0, offset=0).values["workspace_id"] == (
        "team-a"
    )
    assert project_result(result(None), partition=0, offset=0).values["workspace_id"] == "default"
