"""Commands on the wire, and their results.

A command is a request to change one aggregate. It carries a client-chosen `command_id`, the
idempotency key: the same id sent twice gets the first result back and changes nothing more. The
Kafka key of a command is its `aggregate_id`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from events.envelope import (
    DEFAULT_WORKSPACE,
    WORKSPACE_ID_PATTERN,
    EventEnvelope,
    utc_now,
)
from events.limits import CommandId, RequestKey, ShortText, Text
from events.loops import DomainEvent


class CommandEnvelope(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    command_id: CommandId = Field(description="idempotency key")
    type: str = Field(description="imperative command type, e.g. CreateRun")
    schema_version: int = Field(default=1, ge=1)
    aggregate_id: RequestKey = Field(description="also the Kafka key")
    actor: ShortText = "anonymous"
    # The tenant the command acts in. A workspace that does not exist is refused; an aggregate
    # of another workspace answers as if it did not exist.
    workspace_id: str = Field(
        default=DEFAULT_WORKSPACE, pattern=WORKSPACE_ID_PATTERN, description="workspace (tenant)"
    )
    correlation_id: Text | None = None
    causation_id: Text | None = None
    issued_at: datetime = Field(default_factory=utc_now)
    payload: dict[str, Any] = Field(default_factory=dict)

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()


class EventRef(BaseModel):
    model_config = ConfigDict(frozen=True)

    event_id: str
    type: str
    sequence: int


class CommandResult(BaseModel):
    """What became of a command. Keyed by command_id on the command-results topic."""

    model_config = ConfigDict(frozen=True)

    command_id: str
    command_type: str | None
    aggregate_id: str | None
    # accepted: done; rejected: refused for its input or a rule (reason, field);
    # failed: a worker could not do it (its error in reason); resubmitting may succeed.
    status: Literal["accepted", "rejected", "failed"]
    events: tuple[EventRef, ...] = ()
    # For a rejection: a human-readable reason, and the field or rule it is about.
    reason: str | None = None
    field: str | None = None
    # Whose fault a rejection or failure is. "user": the input or a rule (fix the request and
    # send it again); "server": loopstream itself failed (retryable, not the caller's fault).
    # None for accepted results and for results written before this field existed.
    category: Literal["user", "server"] | None = None
    # What a worker computed for a work request (loss, metrics, tokens, ...); None otherwise.
    output: dict[str, Any] | None = None
    correlation_id: str | None = None
    # The workspace the command named (None on results written before tenancy, or when the
    # command was too malformed to tell).
    workspace_id: str | None = None
    processed_at: datetime = Field(default_factory=utc_now)

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()


def category_of(status: str) -> Literal["user", "server"] | None:
    """The category of a result that does not carry one (written before the field existed): a
    rejection is the caller's to fix, a worker failure is loopstream's."""
    return {"rejected": "user", "failed": "server"}.get(status)  # type: ignore[return-value]


def caused_event(
    event: DomainEvent,
    *,
    command: CommandEnvelope,
    sequence: int,
    occurred_at: datetime,
    event_id: str,
) -> EventEnvelope:
    """The envelope of an event `command` caused: the command is its cause, and it carries the
    command's id, correlation and actor, whoever (processor or worker) wrote it."""
    return EventEnvelope(
        event_id=event_id,
        type=type(event).__name__,
        schema_version=event.schema_version,
        aggregate_type=event.aggregate_type,
        aggregate_id=command.aggregate_id,
        sequence=sequence,
        occurred_at=occurred_at,
        command_id=command.command_id,
        causation_id=command.command_id,
        correlation_id=command.correlation_id or command.command_id,
        actor=command.actor,
        workspace_id=command.workspace_id,
        payload=event.model_dump(mode="json"),
    )
