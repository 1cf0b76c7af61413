"""Projectors of the Loops context: events and command results -> read-model row changes.

Pure functions, no I/O: `project_event(envelope, event)` and `project_result(result)` return the
row changes; `projections/store.py` writes them. Columns match migration 0002 and later ones;
`workspace_id` (0008) is set when a row is created, from the envelope (None -> "default");
a run's `user_metadata` and a checkpoint's `public` flag come with 0009, a checkpoint's
`user_metadata` with 0011.
"""

from __future__ import annotations

from functools import singledispatch
from typing import Any

from pydantic import BaseModel

from commands.envelope import CommandResult
from events.envelope import DEFAULT_WORKSPACE, EventEnvelope
from events.loops import (
    CheckpointDeleted,
    CheckpointPromoted,
    CheckpointPublished,
    CheckpointSaved,
    CheckpointTtlChanged,
    CheckpointUnpublished,
    DomainEvent,
    RunCreated,
    RunStopped,
    SamplerCreated,
    SamplerStopped,
    SessionCreated,
    SessionEnded,
    WeightsReady,
)
from events.work import (
    HotloadFailed,
    HotloadStarted,
    HotloadSucceeded,
    SamplerReady,
    WeightsLoaded,
)
from projections.rows import RowChange, TableSpec, entity_change

_ENTITY = ("version", "updated_at")

TABLES: dict[str, TableSpec] = {
    spec.name: spec
    for spec in (
        TableSpec(
            "sessions",
            key=("session_id",),
            columns=(
                "session_id", "base_model", "project", "name", "status", "end_reason",
                "created_at", "ended_at", *_ENTITY, "workspace_id",
            ),
        ),
        TableSpec(
            "runs",
            key=("run_id",),
            columns=(
                "run_id", "session_id", "sampler_id", "base_model", "max_seq_len", "lora_rank",
                "from_checkpoint", "status", "stop_reason", "created_at", "stopped_at", *_ENTITY,
                "workspace_id", "user_metadata",
            ),
            json_columns=frozenset({"user_metadata"}),
        ),
        TableSpec(
            "samplers",
            key=("sampler_id",),
            columns=(
                "sampler_id", "run_id", "session_id", "base_model", "status", "stop_reason",
                "created_at", "stopped_at", *_ENTITY, "workspace_id",
            ),
        ),
        TableSpec(
            "checkpoints",
            key=("checkpoint_id",),
            columns=(
                "checkpoint_id", "run_id", "session_id", "name", "kind", "uri", "files",
                "total_size_bytes", "step", "expires_at", "status", "delete_reason",
                "created_at", "deleted_at", *_ENTITY, "checkpoint_type", "chain_position",
                "workspace_id", "public", "user_metadata",
            ),
            json_columns=frozenset({"files", "user_metadata"}),
        ),
        TableSpec(
            "promotions",
            key=("checkpoint_id", "environment"),
            columns=(
                "checkpoint_id", "environment", "run_id", "session_id", "uri", "promoted_at",
                "workspace_id",
            ),
            insert_only=True,
        ),
        # Written by session events (WeightsReady): versioned by the session's sequence.
        TableSpec(
            "weight_syncs",
            key=("sampler_id", "weights_version"),
            columns=(
                "sampler_id", "weights_version", "run_id", "session_id", "checkpoint_id", "uri",
                "content_digest", "checkpoint_type", "warmup", "warmup_max_retries",
                "reset_prompt_cache", "requested_at", "command_id", *_ENTITY, "workspace_id",
            ),
        ),
        # Written by sampler events: versioned by the sampler's sequence.
        TableSpec(
            "hotloads",
            key=("sampler_id", "weights_version"),
            columns=(
                "sampler_id", "weights_version", "checkpoint_id", "uri", "status", "reason",
                "rolled_back", "checkpoint_type", "folders_applied", "bytes_moved", "fetch_ms",
                "apply_ms", "total_ms", "warmup_attempts", "warmup_ms",
                "prompt_cache_entries_dropped", "started_at", "finished_at", *_ENTITY,
            ),
        ),
        TableSpec(
            "sampler_weights",
            key=("sampler_id",),
            columns=(
                "sampler_id", "ready_at", "serving_version", "serving_checkpoint_id",
                "serving_uri", "serving_digest", "last_hotload_version", "last_hotload_status",
                "last_hotload_reason", "last_hotload_at", *_ENTITY,
            ),
        ),
        TableSpec(
            "command_results",
            key=("command_id",),
            columns=(
                "command_id", "command_type", "aggregate_id", "status", "reason", "field",
                "events", "correlation_id", "processed_at", "kafka_partition", "kafka_offset",
                "output", "category", "workspace_id",
            ),
            insert_only=True,
            json_columns=frozenset({"events", "output"}),
            json_text_columns=frozenset({"output"}),  # migration 0003: `json`, not `jsonb`
        ),
        TableSpec(
            "event_log",
            key=("event_id",),
            columns=(
                "event_id", "aggregate_type", "aggregate_id", "sequence", "type",
                "schema_version", "occurred_at", "command_id", "causation_id", "correlation_id",
                "actor", "payload", "kafka_partition", "kafka_offset", "workspace_id",
            ),
            insert_only=True,
            json_columns=frozenset({"payload"}),
        ),
    )
}  # fmt: skip


def event_log_row(
    envelope: EventEnvelope, *, partition: int, offset: int, payload: dict[str, Any] | None = None
) -> RowChange:
    """Every envelope, as it was written, for audit queries.

    `payload`: the wire payload, when the caller validated the envelope with a typed payload.
    """
    return RowChange(
        table="event_log",
        key=(envelope.event_id,),
        version=envelope.sequence,
        creates=True,
        values={
            "event_id": envelope.event_id,
            "aggregate_type": envelope.aggregate_type,
            "aggregate_id": envelope.aggregate_id,
            "sequence": envelope.sequence,
            "type": envelope.type,
            "schema_version": envelope.schema_version,
            "occurred_at": envelope.occurred_at,
            "command_id": envelope.command_id,
            "causation_id": envelope.causation_id,
            "correlation_id": envelope.correlation_id,
            "actor": envelope.actor,
            "payload": envelope.payload if payload is None else payload,
            "kafka_partition": partition,
            "kafka_offset": offset,
            "workspace_id": envelope.workspace,
        },
    )


def project_result(result: CommandResult, *, partition: int, offset: int) -> RowChange:
    """The future of a command: the API long-polls this row by command_id."""
    return RowChange(
        table="command_results",
        key=(result.command_id,),
        version=0,
        creates=True,
        values={
            "command_id": result.command_id,
            "command_type": result.command_type,
            "aggregate_id": result.aggregate_id,
            "status": result.status,
            "reason": result.reason,
            "field": result.field,
            "events": [_plain(ref) for ref in result.events],
            "correlation_id": result.correlation_id,
            "processed_at": result.processed_at,
            "kafka_partition": partition,
            "kafka_offset": offset,
            "output": result.output,
            "category": result.category,
            "workspace_id": result.workspace_id or DEFAULT_WORKSPACE,
        },
    )


def _plain(model: BaseModel) -> dict[str, Any]:
    # model_dump() without its Python-side argument handling: half the cost, same dict.
    return model.__pydantic_serializer__.to_python(model)  # type: ignore[no-any-return]


def project_event(envelope: EventEnvelope, event: DomainEvent) -> list[RowChange]:
    """The entity rows one event changes (the event_log row is added by the caller)."""
    return _project(event, envelope)


@singledispatch
def _project(event: DomainEvent, envelope: EventEnvelope) -> list[RowChange]:
    return []  # an event with no read model of its own still lands in event_log


@_project.register
def _(event: SessionCreated, envelope: EventEnvelope) -> list[RowChange]:
    values = {
        "session_id": event.session_id,
        "base_model": event.base_model,
        "project": event.project,
        "name": event.name,
        "status": "active",
        "end_reason": None,
        "created_at": envelope.occurred_at,
        "ended_at": None,
        "workspace_id": envelope.workspace,
    }
    return [entity_change("sessions", event.session_id, envelope, values, creates=True)]


@_project.register
def _(event: SessionEnded, envelope: EventEnvelope) -> list[RowChange]:
    values = {
        "session_id": event.session_id,
        "status": "ended",
        "end_reason": event.reason,
        "ended_at": envelope.occurred_at,
    }
    return [entity_change("sessions", event.session_id, envelope, values, creates=False)]


@_project.register
def _(event: RunCreated, envelope: EventEnvelope) -> list[RowChange]:
    values = {
        "run_id": event.run_id,
        "session_id": event.session_id,
        "sampler_id": event.sampler_id,
        "base_model": event.base_model,
        "max_seq_len": event.max_seq_len,
        "lora_rank": event.lora_rank,
        "from_checkpoint": event.from_checkpoint,
        "status": "active",
        "stop_reason": None,
        "created_at": envelope.occurred_at,
        "stopped_at": None,
        "workspace_id": envelope.workspace,
        "user_metadata": event.user_metadata,
    }
    return [entity_change("runs", event.run_id, envelope, values, creates=True)]


@_project.register
def _(event: SamplerCreated, envelope: EventEnvelope) -> list[RowChange]:
    values = {
        "sampler_id": event.sampler_id,
        "run_id": event.run_id,
        "session_id": event.session_id,
        "base_model": event.base_model,
        "status": "active",
        "stop_reason": None,
        "created_at": envelope.occurred_at,
        "stopped_at": None,
        "workspace_id": envelope.workspace,
    }
    return [entity_change("samplers", event.sampler_id, envelope, values, creates=True)]


@_project.register
def _(event: RunStopped, envelope: EventEnvelope) -> list[RowChange]:
    values = {
        "run_id": event.run_id,
        "status": "stopped",
        "stop_reason": event.reason,
        "stopped_at": envelope.occurred_at,
    }
    return [entity_change("runs", event.run_id, envelope, values, creates=False)]


@_project.register
def _(event: SamplerStopped, envelope: EventEnvelope) -> list[RowChange]:
    values = {
        "sampler_id": event.sampler_id,
        "status": "stopped",
        "stop_reason": event.reason,
        "stopped_at": envelope.occurred_at,
    }
    return [entity_change("samplers", event.sampler_id, envelope, values, creates=False)]


@_project.register
def _(event: CheckpointSaved, envelope: EventEnvelope) -> list[RowChange]:
    values = {
        "checkpoint_id": event.checkpoint_id,
        "run_id": event.run_id,
        "session_id": event.session_id,
        "name": event.name,
        "kind": event.kind,
        "uri": event.uri,
        "files": [_plain(file) for file in event.files],
        "total_size_bytes": event.total_size_bytes,
        "step": event.step,
        "expires_at": event.expires_at,
        "status": "active",
        "delete_reason": None,
        "created_at": envelope.occurred_at,
        "deleted_at": None,
        "checkpoint_type": event.checkpoint_type,
        "chain_position": event.chain_position,
        "workspace_id": envelope.workspace,
        "public": False,
        "user_metadata": event.user_metadata,
    }
    return [entity_change("checkpoints", event.checkpoint_id, envelope, values, creates=True)]


@_project.register
def _(event: CheckpointDeleted, envelope: EventEnvelope) -> list[RowChange]:
    values = {
        "checkpoint_id": event.checkpoint_id,
        "status": "deleted",
        "delete_reason": event.reason,
        "deleted_at": envelope.occurred_at,
    }
    return [entity_change("checkpoints", event.checkpoint_id, envelope, values, creates=False)]


@_project.register
def _(event: CheckpointTtlChanged, envelope: EventEnvelope) -> list[RowChange]:
    values = {"checkpoint_id": event.checkpoint_id, "expires_at": event.expires_at}
    return [entity_change("checkpoints", event.checkpoint_id, envelope, values, creates=False)]


@_project.register
def _(event: CheckpointPublished, envelope: EventEnvelope) -> list[RowChange]:
    values = {"checkpoint_id": event.checkpoint_id, "public": True}
    return [entity_change("checkpoints", event.checkpoint_id, envelope, values, creates=False)]


@_project.register
def _(event: CheckpointUnpublished, envelope: EventEnvelope) -> list[RowChange]:
    values = {"checkpoint_id": event.checkpoint_id, "public": False}
    return [entity_change("checkpoints", event.checkpoint_id, envelope, values, creates=False)]


@_project.register
def _(event: CheckpointPromoted, envelope: EventEnvelope) -> list[RowChange]:
    values = {
        "checkpoint_id": event.checkpoint_id,
        "environment": event.environment,
        "run_id": event.run_id,
        "session_id": event.session_id,
        "uri": event.uri,
        "promoted_at": envelope.occurred_at,
        "workspace_id": envelope.workspace,
    }
    return [
        RowChange(
            table="promotions",
            key=(event.checkpoint_id, event.environment),
            version=envelope.sequence,
            values=values,
            creates=True,
        )
    ]


# --- weight syncs and what samplers serve ------------------------------------------------------


def _sync_change(
    table: str, sampler_id: str, weights_version: int, envelope: EventEnvelope, values: dict
) -> RowChange:
    return RowChange(
        table=table,
        key=(sampler_id, weights_version),
        version=envelope.sequence,
        creates=True,
        values={
            "sampler_id": sampler_id,
            "weights_version": weights_version,
            **values,
            "version": envelope.sequence,
            "updated_at": envelope.occurred_at,
        },
    )


@_project.register
def _(event: WeightsReady, envelope: EventEnvelope) -> list[RowChange]:
    values = {
        "run_id": event.run_id,
        "session_id": event.session_id,
        "checkpoint_id": event.checkpoint_id,
        "uri": event.uri,
        "content_digest": event.content_digest,
        "checkpoint_type": event.checkpoint_type,
        "warmup": event.warmup,
        "warmup_max_retries": event.warmup_max_retries,
        "reset_prompt_cache": event.reset_prompt_cache,
        "requested_at": envelope.occurred_at,
        "command_id": envelope.command_id,
        "workspace_id": envelope.workspace,
    }
    return [_sync_change("weight_syncs", event.sampler_id, event.weights_version, envelope, values)]


def _sampler_weights(envelope: EventEnvelope, values: dict[str, Any]) -> RowChange:
    # Sampler events create the row whichever comes first (a hotload can precede SamplerReady
    # when a worker hosts a sampler and loads its newest weights in one go).
    return entity_change("sampler_weights", envelope.aggregate_id, envelope,
                   {"sampler_id": envelope.aggregate_id, **values}, creates=True)  # fmt: skip


@_project.register
def _(event: SamplerReady, envelope: EventEnvelope) -> list[RowChange]:
    return [
        _sampler_weights(
            envelope,
            {
                "ready_at": envelope.occurred_at,
                "serving_version": 0,
                "serving_digest": event.content_digest,
            },
        )
    ]


@_project.register
def _(event: WeightsLoaded, envelope: EventEnvelope) -> list[RowChange]:
    return [
        _sampler_weights(
            envelope,
            {
                "serving_version": event.weights_version,
                "serving_checkpoint_id": event.checkpoint_id,
                "serving_uri": event.uri,
                "serving_digest": event.content_digest,
            },
        )
    ]


@_project.register
def _(event: HotloadStarted, envelope: EventEnvelope) -> list[RowChange]:
    if event.weights_version is None:
        return []  # a pinned request's checkpoint: not a sync
    values = {
        "checkpoint_id": event.checkpoint_id,
        "uri": event.uri,
        "status": "started",
        "started_at": envelope.occurred_at,
    }
    return [_sync_change("hotloads", envelope.aggregate_id, event.weights_version, envelope,
                         values)]  # fmt: skip


def _hotload_finished(
    weights_version: int, envelope: EventEnvelope, values: dict[str, Any]
) -> list[RowChange]:
    """The sync's row, and the sampler's "last hotload" columns, from one outcome."""
    last = {
        "last_hotload_version": weights_version,
        "last_hotload_status": values["status"],
        "last_hotload_reason": values["reason"],
        "last_hotload_at": envelope.occurred_at,
    }
    return [
        _sync_change("hotloads", envelope.aggregate_id, weights_version, envelope, values),
        _sampler_weights(envelope, last),
    ]


@_project.register
def _(event: HotloadSucceeded, envelope: EventEnvelope) -> list[RowChange]:
    if event.weights_version is None:
        return []
    values = {
        "checkpoint_id": event.checkpoint_id,
        "uri": event.uri,
        "status": "succeeded",
        "reason": None,
        "rolled_back": False,
        "checkpoint_type": event.checkpoint_type,
        "folders_applied": event.folders_applied,
        "bytes_moved": event.bytes_moved,
        "fetch_ms": event.fetch_ms,
        "apply_ms": event.apply_ms,
        "total_ms": event.total_ms,
        "warmup_attempts": event.warmup_attempts,
        "warmup_ms": event.warmup_ms,
        "prompt_cache_entries_dropped": event.prompt_cache_entries_dropped,
        "finished_at": envelope.occurred_at,
    }
    return _hotload_finished(event.weights_version, envelope, values)


@_project.register
def _(event: HotloadFailed, envelope: EventEnvelope) -> list[RowChange]:
    if event.weights_version is None:
        return []
    values = {
        "checkpoint_id": event.checkpoint_id,
        "uri": event.uri,
        "status": "failed",
        "reason": event.reason,
        "rolled_back": event.rolled_back,
        "bytes_moved": event.bytes_moved,
        "total_ms": event.total_ms,
        "finished_at": envelope.occurred_at,
    }
    return _hotload_finished(event.weights_version, envelope, values)
