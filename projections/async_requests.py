"""Projector of the gateway's async requests -> the `async_requests` read model (migration 0013).

Pure, like the other projectors: one row per request, versioned by the request's own sequence,
so a replayed event is a no-op. The row answers `GET /async_request/{request_id}`; the predict
output is not here but in S3 (`output_key`): outputs can be megabytes (n samples with logprobs),
and the event log is kept forever.
"""

from __future__ import annotations

from functools import singledispatch

from events.async_requests import (
    AsyncRequestEvent,
    AsyncRequestExpired,
    AsyncRequestFailed,
    AsyncRequestQueued,
    AsyncRequestStarted,
    AsyncRequestSucceeded,
    AsyncWebhookAttemptFailed,
    AsyncWebhookDelivered,
    AsyncWebhookFailed,
)
from events.envelope import EventEnvelope
from events.loops import DomainEvent
from projections.rows import RowChange, TableSpec, entity_change

ASYNC_REQUEST_TABLES: dict[str, TableSpec] = {
    "async_requests": TableSpec(
        "async_requests",
        key=("request_id",),
        columns=(
            "request_id",
            "workspace_id",
            "model_id",
            "deployment_id",
            "status",
            "priority",
            "max_time_in_queue_seconds",
            "webhook_endpoint",
            "submitted_at",
            "queued_at",
            "started_at",
            "completed_at",
            "replica_id",
            "output_key",
            "output_bytes",
            "output_sha256",
            "error_code",
            "error",
            "webhook_status",
            "webhook_attempts",
            "webhook_last_error",
            "webhook_done_at",
            "version",
            "updated_at",
        ),
    )
}


@singledispatch
def project_async_request_event(event: DomainEvent, envelope: EventEnvelope) -> list[RowChange]:
    return []  # not an async request's event


def _update(event: AsyncRequestEvent, envelope: EventEnvelope, **values: object) -> list[RowChange]:
    return [
        entity_change(
            "async_requests",
            event.request_id,
            envelope,
            {"request_id": event.request_id, **values},
            creates=False,
        )
    ]


@project_async_request_event.register
def _(event: AsyncRequestQueued, envelope: EventEnvelope) -> list[RowChange]:
    values = {
        "request_id": event.request_id,
        "workspace_id": envelope.workspace,
        "model_id": event.model_id,
        "deployment_id": event.deployment_id,
        "status": "QUEUED",
        "priority": event.priority,
        "max_time_in_queue_seconds": event.max_time_in_queue_seconds,
        "webhook_endpoint": event.webhook_endpoint,
        "submitted_at": event.submitted_at,
        "queued_at": envelope.occurred_at,
        "started_at": None,
        "completed_at": None,
        "replica_id": None,
        "output_key": None,
        "output_bytes": None,
        "output_sha256": None,
        "error_code": None,
        "error": None,
        "webhook_status": "PENDING" if event.webhook_endpoint else "NONE",
        "webhook_attempts": 0,
        "webhook_last_error": None,
        "webhook_done_at": None,
    }
    return [entity_change("async_requests", event.request_id, envelope, values, creates=True)]


@project_async_request_event.register
def _(event: AsyncRequestStarted, envelope: EventEnvelope) -> list[RowChange]:
    return _update(event, envelope, status="IN_PROGRESS", started_at=envelope.occurred_at)


@project_async_request_event.register
def _(event: AsyncRequestSucceeded, envelope: EventEnvelope) -> list[RowChange]:
    return _update(
        event,
        envelope,
        status="SUCCEEDED",
        completed_at=envelope.occurred_at,
        replica_id=event.replica_id,
        output_key=event.output_key,
        output_bytes=event.output_bytes,
        output_sha256=event.output_sha256,
    )


@project_async_request_event.register
def _(event: AsyncRequestFailed, envelope: EventEnvelope) -> list[RowChange]:
    return _update(
        event,
        envelope,
        status="FAILED",
        completed_at=envelope.occurred_at,
        error_code=event.code,
        error=event.error,
    )


@project_async_request_event.register
def _(event: AsyncRequestExpired, envelope: EventEnvelope) -> list[RowChange]:
    return _update(
        event,
        envelope,
        status="EXPIRED",
        completed_at=envelope.occurred_at,
        error_code="REQUEST_EXPIRED",
        error=f"waited {event.queued_s:.1f} s, past max_time_in_queue_seconds",
    )


@project_async_request_event.register
def _(event: AsyncWebhookAttemptFailed, envelope: EventEnvelope) -> list[RowChange]:
    return _update(event, envelope, webhook_attempts=event.attempt, webhook_last_error=event.error)


@project_async_request_event.register
def _(event: AsyncWebhookDelivered, envelope: EventEnvelope) -> list[RowChange]:
    return _update(
        event,
        envelope,
        webhook_status="DELIVERED",
        webhook_attempts=event.attempts,
        webhook_done_at=envelope.occurred_at,
    )


@project_async_request_event.register
def _(event: AsyncWebhookFailed, envelope: EventEnvelope) -> list[RowChange]:
    return _update(
        event,
        envelope,
        status="WEBHOOK_FAILED",
        webhook_status="FAILED",
        webhook_attempts=event.attempts,
        webhook_last_error=event.last_error,
        webhook_done_at=envelope.occurred_at,
    )
