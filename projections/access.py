"""Projectors of the access context: workspaces and API keys -> read-model row changes.

Pure, like `projections/loops.py`. `api_keys` is what authentication reads on every request
(key id -> workspace, scopes, hash, revoked_at), so a revocation counts once its event is
projected. Both tables are versioned by the workspace aggregate's sequence.
"""

from __future__ import annotations

from functools import singledispatch

from events.access import ApiKeyCreated, ApiKeyRevoked, WorkspaceCreated
from events.envelope import EventEnvelope
from events.loops import DomainEvent
from projections.rows import RowChange, TableSpec, entity_change

ACCESS_TABLES: dict[str, TableSpec] = {
    spec.name: spec
    for spec in (
        TableSpec(
            "workspaces",
            key=("workspace_id",),
            columns=("workspace_id", "name", "created_at", "version", "updated_at"),
        ),
        TableSpec(
            "api_keys",
            key=("key_id",),
            columns=(
                "key_id", "workspace_id", "name", "scopes", "prefix", "key_hash", "created_at",
                "revoked_at", "revoke_reason", "version", "updated_at",
            ),
            json_columns=frozenset({"scopes"}),
        ),
    )
}  # fmt: skip


@singledispatch
def project_access_event(event: DomainEvent, envelope: EventEnvelope) -> list[RowChange]:
    return []  # not an access event


@project_access_event.register
def _(event: WorkspaceCreated, envelope: EventEnvelope) -> list[RowChange]:
    values = {
        "workspace_id": event.workspace_id,
        "name": event.name,
        "created_at": envelope.occurred_at,
    }
    return [entity_change("workspaces", event.workspace_id, envelope, values, creates=True)]


@project_access_event.register
def _(event: ApiKeyCreated, envelope: EventEnvelope) -> list[RowChange]:
    values = {
        "key_id": event.key_id,
        "workspace_id": event.workspace_id,
        "name": event.name,
        "scopes": list(event.scopes),
        "prefix": event.prefix,
        "key_hash": event.key_hash,
        "created_at": envelope.occurred_at,
        "revoked_at": None,
        "revoke_reason": None,
    }
    return [entity_change("api_keys", event.key_id, envelope, values, creates=True)]


@project_access_event.register
def _(event: ApiKeyRevoked, envelope: EventEnvelope) -> list[RowChange]:
    values = {
        "key_id": event.key_id,
        "revoked_at": envelope.occurred_at,
        "revoke_reason": event.reason,
    }
    return [entity_change("api_keys", event.key_id, envelope, values, creates=False)]
