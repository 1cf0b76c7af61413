"""Async predict requests of the gateway (aggregate type `async_request`, id = the request id).

A request is submitted to the `async-requests` topic (`AsyncRequestSubmitted`, keyed by
deployment id: the durable queue). The gateway's async worker that owns the record's partition
is the single writer of the request's events, numbered gap-free from 1:

    AsyncRequestQueued -> AsyncRequestStarted -> AsyncRequestSucceeded | AsyncRequestFailed
                      \\-> AsyncRequestExpired  (waited past max_time_in_queue_seconds)
    then, with a webhook:  AsyncWebhookAttemptFailed* -> AsyncWebhookDelivered | AsyncWebhookFailed

No event carries the model's input or output (the input stays on `async-requests`, the output is
an S3 object named by `output_key`), nor the webhook signing key (only its secret's name).
`fold_status` is the status Baseten's API answers, from the events alone (pure).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from events.loops import DomainEvent

AsyncStatus = Literal["QUEUED", "IN_PROGRESS", "SUCCEEDED", "FAILED", "EXPIRED", "WEBHOOK_FAILED"]
# Baseten's bounds of max_time_in_queue_seconds, and its default.
MIN_QUEUE_S, MAX_QUEUE_S, DEFAULT_QUEUE_S = 10, 72_000, 600
# The workspace secret webhooks are signed with (HMAC-SHA256).
SIGNING_SECRET_NAME = "webhook-signing-key"
MAX_WEBHOOK_URL = 2048
# What `errors[].code` says in a webhook of a request that did not succeed.
ErrorCode = Literal[
    "MODEL_PREDICT_ERROR",
    "MODEL_INVALID_INPUT",
    "MODEL_NOT_READY",
    "MODEL_DOES_NOT_EXIST",
    "REQUEST_EXPIRED",
]


class AsyncRequestSubmitted(BaseModel):
    """The record on `async-requests` (JSON, keyed by deployment id): what the worker runs.

    Not an event of the log: a queue entry, consumed once its request is finished."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    request_id: str = Field(pattern=r"^[a-z0-9]{1,64}$")
    workspace_id: str
    model_id: str
    deployment_id: str
    model_input: dict[str, Any] = Field(description="a PredictInput, validated at submit")
    webhook_endpoint: str | None = Field(default=None, max_length=MAX_WEBHOOK_URL)
    priority: int = Field(default=1, ge=0, le=2, description="0 runs first")
    max_time_in_queue_seconds: int = Field(default=DEFAULT_QUEUE_S, ge=MIN_QUEUE_S, le=MAX_QUEUE_S)
    submitted_at: datetime
    actor: str = Field(description="the API key id that submitted it")


class AsyncRequestEvent(DomainEvent):
    aggregate_type: ClassVar[str] = "async_request"

    request_id: str
    deployment_id: str
    model_id: str


class AsyncRequestQueued(AsyncRequestEvent):
    """The worker took the request off `async-requests` into its queue."""

    priority: int = Field(ge=0, le=2)
    max_time_in_queue_seconds: int = Field(ge=MIN_QUEUE_S, le=MAX_QUEUE_S)
    webhook_endpoint: str | None = Field(default=None, max_length=MAX_WEBHOOK_URL)
    submitted_at: datetime
    source_partition: int = Field(ge=0)
    source_offset: int = Field(ge=0)


class AsyncRequestStarted(AsyncRequestEvent):
    """The worker hands it to the gateway's routing (async priority: after waiting sync calls)."""

    queued_ms: float = Field(ge=0)


class AsyncRequestSucceeded(AsyncRequestEvent):
    replica_id: str | None = None
    output_key: str = Field(description="S3 key of the predict output (JSON)")
    output_bytes: int = Field(ge=0)
    output_sha256: str
    predict_ms: float = Field(ge=0)


class AsyncRequestFailed(AsyncRequestEvent):
    code: ErrorCode
    status_code: int = Field(ge=400, le=599)
    error: str = Field(max_length=2000)


class AsyncRequestExpired(AsyncRequestEvent):
    """It waited longer than max_time_in_queue_seconds: the model was never called."""

    queued_s: float = Field(ge=0)


class AsyncWebhookAttemptFailed(AsyncRequestEvent):
    attempt: int = Field(ge=1)
    status_code: int | None = None
    error: str = Field(max_length=2000)
    retry_in_s: float | None = Field(default=None, ge=0, description="None: the last attempt")


class AsyncWebhookDelivered(AsyncRequestEvent):
    attempts: int = Field(ge=1)
    status_code: int


class AsyncWebhookFailed(AsyncRequestEvent):
    attempts: int = Field(ge=1)
    last_error: str = Field(max_length=2000)


ASYNC_REQUEST_EVENTS: tuple[type[DomainEvent], ...] = (
    AsyncRequestQueued,
    AsyncRequestStarted,
    AsyncRequestSucceeded,
    AsyncRequestFailed,
    AsyncRequestExpired,
    AsyncWebhookAttemptFailed,
    AsyncWebhookDelivered,
    AsyncWebhookFailed,
)

_OUTCOME: dict[type[DomainEvent], AsyncStatus] = {
    AsyncRequestQueued: "QUEUED",
    AsyncRequestStarted: "IN_PROGRESS",
    AsyncRequestSucceeded: "SUCCEEDED",
    AsyncRequestFailed: "FAILED",
    AsyncRequestExpired: "EXPIRED",
}


def next_status(status: AsyncStatus | None, event: DomainEvent) -> AsyncStatus | None:
    """The status after `event`: the request's own outcome, unless its webhook failed for good
    (Baseten's WEBHOOK_FAILED); attempts and a delivered webhook leave it as it is."""
    if isinstance(event, AsyncWebhookFailed):
        return "WEBHOOK_FAILED"
    return _OUTCOME.get(type(event), status)


def fold_status(events: list[DomainEvent]) -> AsyncStatus | None:
    status: AsyncStatus | None = None
    for event in events:
        status = next_status(status, event)
    return status
