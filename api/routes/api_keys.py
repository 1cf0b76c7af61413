"""API keys of the caller's workspace (admin scope): create (the key is shown once), list, revoke.

The key is made here, server-side (`api.auth.new_key`); only its HMAC travels on Kafka in
`CreateApiKey`, so neither the log nor the read models can give it back. Like every write route,
create and revoke answer 202 with the future of their command; a key authenticates once its
`ApiKeyCreated` is projected (well under a second on the local stack).
"""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, status
from pydantic import BaseModel, Field

from api.auth import AdminCaller, new_key
from api.deps import ApiSettingsDep, IdempotencyHeader, ReadDep, SubmitterDep
from api.errors import conflict, error_responses, not_found
from api.routes._common import envelope
from api.submit import resolve_request_id
from commands.access import CreateApiKey, RevokeApiKey, aggregate_id_of
from events.access import Scope
from events.limits import ShortText, Text

router = APIRouter(prefix="/v1/api_keys", tags=["api keys"], responses=error_responses(401))


class ApiKeyCreate(BaseModel):
    name: ShortText | None = Field(default=None, description="a label, e.g. 'ci'")
    scopes: list[Scope] = Field(
        default_factory=lambda: ["train", "infer"], min_length=1, max_length=3
    )


class ApiKeyIssued(BaseModel):
    key_id: str
    key: str = Field(description="the key itself: shown this once, never again")
    prefix: str
    name: str | None
    scopes: list[str]
    request_id: str = Field(description="future of the CreateApiKey command")


class ApiKeyPublic(BaseModel):
    key_id: str
    name: str | None
    scopes: list[str]
    prefix: str
    created_at: datetime
    revoked_at: datetime | None


class ApiKeysPublic(BaseModel):
    data: list[ApiKeyPublic]


class ApiKeyRevokeAccepted(BaseModel):
    key_id: str
    request_id: str


@router.post("", status_code=status.HTTP_202_ACCEPTED, responses=error_responses(403))
def create_api_key(
    body: ApiKeyCreate,
    caller: AdminCaller,
    submitter: SubmitterDep,
    api_settings: ApiSettingsDep,
    idempotency_key: IdempotencyHeader = None,
) -> ApiKeyIssued:
    """Issue a key in the caller's workspace. Not idempotent by design: a second post makes a
    second key (the first one's secret cannot be shown again)."""
    ids = resolve_request_id(
        header=idempotency_key, query=None, body=None, workspace=caller.workspace_id
    )
    issued = new_key(hash_key=api_settings.api_key_hash_secret)
    command = CreateApiKey(
        key_id=issued.key_id,
        name=body.name,
        scopes=tuple(body.scopes),
        prefix=issued.prefix,
        key_hash=issued.key_hash,
    )
    submitter.submit(
        envelope(
            request_id=ids.command_id,
            command=command,
            aggregate_id=aggregate_id_of(caller.workspace_id),
            caller=caller,
        ),
        to="commands",
    )
    return ApiKeyIssued(
        key_id=issued.key_id,
        key=issued.key,
        prefix=issued.prefix,
        name=body.name,
        scopes=sorted(set(body.scopes)),
        request_id=ids.request_id,
    )


@router.get("", responses=error_responses(403))
def list_api_keys(caller: AdminCaller, reads: ReadDep) -> ApiKeysPublic:
    """The workspace's keys: ids, names, scopes, prefixes, when made and revoked (no secrets)."""
    return ApiKeysPublic(
        data=[ApiKeyPublic.model_validate(row) for row in reads.api_keys(caller.workspace_id)]
    )


@router.delete(
    "/{key_id}", status_code=status.HTTP_202_ACCEPTED, responses=error_responses(403, 404, 409)
)
def revoke_api_key(
    key_id: str,
    caller: AdminCaller,
    reads: ReadDep,
    submitter: SubmitterDep,
    reason: Text | None = None,
    idempotency_key: IdempotencyHeader = None,
) -> ApiKeyRevokeAccepted:
    """Revoke a key of the caller's workspace; it stops authenticating once projected."""
    row = reads.api_key(key_id)
    if row is None or row["workspace_id"] != caller.workspace_id:
        raise not_found(f"api key {key_id} not found", field="key_id")
    if row["revoked_at"] is not None:
        raise conflict(f"api key {key_id} is already revoked", field="key_id")
    ids = resolve_request_id(
        header=idempotency_key, query=None, body=None, workspace=caller.workspace_id
    )
    submitter.submit(
        envelope(
            request_id=ids.command_id,
            command=RevokeApiKey(key_id=key_id, reason=reason),
            aggregate_id=aggregate_id_of(caller.workspace_id),
            caller=caller,
        ),
        to="commands",
    )
    return ApiKeyRevokeAccepted(key_id=key_id, request_id=ids.request_id)
