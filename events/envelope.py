"""The envelope every event travels in, and how it looks on the wire.

An event is immutable. Its payload is typed by the catalog (`events/catalog.py`); the envelope
carries what every consumer needs without knowing the payload: who, what, when, why (causation)
and which conversation (correlation), and the per-aggregate `sequence` that makes an aggregate's
history gap-free and lets projections ignore replays.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

WIRE_CONTENT_TYPE = "application/json"

# The workspace (tenant) of everything that names none: it always exists, no event creates it,
# so producers and tools written before tenancy keep working, in "default".
DEFAULT_WORKSPACE = "default"
# What a workspace id looks like (the same shape as the API's resource ids).
WORKSPACE_ID_PATTERN = r"^[a-z0-9][a-z0-9-]{0,62}$"


class EventEnvelope(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    event_id: str = Field(description="UUIDv7, unique per event")
    type: str = Field(description="past-tense event type, e.g. CheckpointSaved")
    schema_version: int = Field(ge=1, description="version of the payload schema for this type")
    aggregate_type: str = Field(description="e.g. session")
    aggregate_id: str = Field(description="also the Kafka message key")
    sequence: int = Field(ge=1, description="per-aggregate, gap-free, starting at 1")
    occurred_at: datetime
    command_id: str | None = Field(default=None, description="the command that produced it")
    causation_id: str | None = Field(
        default=None, description="id of the message (command or event) that caused this one"
    )
    correlation_id: str | None = Field(
        default=None, description="id shared by everything in one user-level conversation"
    )
    actor: str = Field(default="system", description="who asked: a user, a service, a worker")
    # None on events written before tenancy: read as DEFAULT_WORKSPACE (see `workspace`).
    workspace_id: str | None = Field(
        default=None, description="the workspace (tenant) the aggregate belongs to"
    )
    payload: dict[str, Any]

    @property
    def workspace(self) -> str:
        """The event's workspace, with events written before tenancy in the default one."""
        return self.workspace_id or DEFAULT_WORKSPACE

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def from_bytes(cls, data: bytes | None) -> EventEnvelope:
        return cls.model_validate_json(data or b"")

    def kafka_headers(self) -> list[tuple[str, str | bytes | None]]:
        """Headers let consumers route or filter without parsing the value."""
        return [
            ("event_type", self.type.encode()),
            ("schema_version", str(self.schema_version).encode()),
            ("event_id", self.event_id.encode()),
            ("content-type", WIRE_CONTENT_TYPE.encode()),
        ]


def utc_now() -> datetime:
    return datetime.now(UTC)
