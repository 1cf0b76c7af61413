"""Events of the access bounded context: workspaces (tenants) and their API keys.

A workspace is the consistency boundary (aggregate type `workspace`, aggregate id = workspace
id); its API keys are entities inside it. A key's secret never appears here: `ApiKeyCreated`
carries its public prefix and an HMAC of the secret under a server key (`api/auth.py`), and the
log is immutable, so a secret written here could never be taken back.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from events.loops import DomainEvent

Scope = Literal["admin", "train", "infer"]


class AccessEvent(DomainEvent):
    aggregate_type: ClassVar[str] = "workspace"


class WorkspaceCreated(AccessEvent):
    workspace_id: str
    name: str | None = None


class ApiKeyCreated(AccessEvent):
    key_id: str
    workspace_id: str
    name: str | None = None
    scopes: tuple[Scope, ...]
    prefix: str  # public: "tml-<key_id>", shown in lists
    key_hash: str  # hex HMAC-SHA256 of the secret; never the secret


class ApiKeyRevoked(AccessEvent):
    key_id: str
    workspace_id: str
    reason: str | None = None


ACCESS_EVENTS: tuple[type[DomainEvent], ...] = (WorkspaceCreated, ApiKeyCreated, ApiKeyRevoked)
