"""Secrets: create, list, update, delete per workspace (admin keys only). No route returns a
value after creation, nor a digest: a listing holds names, versions and timestamps.

The value is encrypted and stored first (infra/secret_store.py), then the command goes to the
log with the value's digest; the route waits for the command's result, so a rejected command's
value is removed at once and the caller gets the rule it broke. A delete is sent first and
destroys the ciphertext once the log accepted it.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime

import psycopg
from fastapi import APIRouter, Path, status
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from api.auth import AdminCaller, Caller
from api.deps import EngineDep, SettingsDep, StateDep
from api.errors import ApiError, conflict, error_responses, not_found, unprocessable
from api.queries import ReadModels
from api.routes._common import envelope
from commands.envelope import CommandResult
from commands.secrets import CreateSecret, DeleteSecret, UpdateSecret, secret_aggregate_id
from events.limits import check_text
from events.secrets import SECRET_NAME
from infra.secret_store import MAX_VALUE_BYTES, SecretInfo, SecretStore
from infra.settings import Settings

router = APIRouter(prefix="/v1/secrets", tags=["secrets"])
RESULT_WAIT_S = 15.0  # how long a route waits for its command's result
SecretNamePath = Path(pattern=SECRET_NAME, description="secret name, e.g. hf_access_token")


class SecretCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=SECRET_NAME, description="e.g. hf_access_token")
    # SecretStr: never printed in a repr, a log line or a validation error.
    value: SecretStr = Field(min_length=1, max_length=MAX_VALUE_BYTES)


class SecretUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    value: SecretStr = Field(min_length=1, max_length=MAX_VALUE_BYTES)


class SecretPublic(BaseModel):
    name: str
    version: int
    created_at: datetime | None
    updated_at: datetime


class SecretsPublic(BaseModel):
    secrets: list[SecretPublic]


class SecretDeletedPublic(BaseModel):
    name: str
    deleted: bool = True
    version: int = Field(description="the last version, now destroyed")


def _public(info: SecretInfo) -> SecretPublic:
    return SecretPublic(
        name=info.name, version=info.version, created_at=info.created_at, updated_at=info.updated_at
    )


@contextmanager
def _store(settings: Settings) -> Iterator[SecretStore]:
    with psycopg.connect(settings.pg_conninfo, autocommit=True) as conn:
        yield SecretStore(conn, settings)


def _value(secret: SecretStr) -> str:
    value = secret.get_secret_value()
    try:
        check_text(value)
    except ValueError as exc:
        raise unprocessable(f"value: {exc}", field="value") from None
    return value


def _send_and_wait(
    state: StateDep, engine: EngineDep, settings: Settings, caller: Caller, command: BaseModel
) -> CommandResult:
    """Send the command and wait for its result (the API's result feed, else the futures
    table). A command that gets no result in time is a 503; the caller may retry."""
    command_id = f"secret:{uuid.uuid4()}"
    name = getattr(command, "name", "")
    state.bus.send(
        envelope(
            request_id=command_id,
            command=command,
            aggregate_id=secret_aggregate_id(caller.workspace_id, name),
            caller=caller,
        )
    )
    deadline = time.monotonic() + RESULT_WAIT_S
    next_table_check = time.monotonic() + 0.5
    while time.monotonic() < deadline:
        result = state.results.get(command_id)
        if result is not None:
            return result
        if time.monotonic() >= next_table_check:
            next_table_check = time.monotonic() + 0.5
            with engine.connect() as conn:
                reads = ReadModels(conn, settings.read_schema)
                stored = reads.command_result(command_id, workspace=caller.workspace_id)
            if stored is not None:
                return stored
        time.sleep(0.01)
    raise ApiError(status.HTTP_503_SERVICE_UNAVAILABLE, "not applied in time; retry")


def _refusal(result: CommandResult) -> ApiError:
    reason = result.reason or result.status
    if "does not exist" in reason:
        return not_found(reason, field=result.field)
    if result.status == "rejected" and result.field in ("name", "version"):
        return conflict(reason, field=result.field)
    return ApiError(status.HTTP_400_BAD_REQUEST, reason, field=result.field)


@router.post("", status_code=status.HTTP_201_CREATED, responses=error_responses(401, 403, 409, 503))
def create_secret(
    body: SecretCreate,
    caller: AdminCaller,
    state: StateDep,
    engine: EngineDep,
    settings: SettingsDep,
) -> SecretPublic:
    """Store a new secret; its value is never shown again."""
    return _put(body.name, _value(body.value), caller, state, engine, settings, created=True)


@router.put("/{name}", responses=error_responses(401, 403, 404, 409, 503))
def update_secret(
    body: SecretUpdate,
    caller: AdminCaller,
    state: StateDep,
    engine: EngineDep,
    settings: SettingsDep,
    name: str = SecretNamePath,
) -> SecretPublic:
    """Give a secret a new value: a new version; the old value is destroyed."""
    return _put(name, _value(body.value), caller, state, engine, settings, created=False)


def _put(
    name: str,
    value: str,
    caller: Caller,
    state: StateDep,
    engine: EngineDep,
    settings: Settings,
    *,
    created: bool,
) -> SecretPublic:
    workspace = caller.workspace_id
    with _store(settings) as store:
        version = store.next_version(workspace, name)
        digest = store.store(workspace, name, version, value)
        kind = CreateSecret if created else UpdateSecret
        command = kind(workspace_id=workspace, name=name, version=version, digest=digest)
        try:
            result = _send_and_wait(state, engine, settings, caller, command)
        except BaseException:
            store.discard(workspace, name, version)  # no answer: the value must not linger
            raise
        if result.status != "accepted":
            store.discard(workspace, name, version)
            raise _refusal(result)
        store.confirm(workspace, name, version, created=created)
        info = store.current(workspace, name)
    if info is None:  # deleted in between
        raise not_found(f"secret {name} does not exist", field="name")
    return _public(info)


@router.get("", responses=error_responses(401, 403))
def list_secrets(caller: AdminCaller, settings: SettingsDep) -> SecretsPublic:
    """Names, versions and timestamps of the workspace's secrets; never a value."""
    with _store(settings) as store:
        return SecretsPublic(secrets=[_public(s) for s in store.listing(caller.workspace_id)])


@router.get("/{name}", responses=error_responses(401, 403, 404))
def get_secret(
    caller: AdminCaller, settings: SettingsDep, name: str = SecretNamePath
) -> SecretPublic:
    """One secret's name, version and timestamps; never its value."""
    with _store(settings) as store:
        info = store.current(caller.workspace_id, name)
    if info is None:
        raise not_found(f"secret {name} does not exist", field="name")
    return _public(info)


@router.delete("/{name}", responses=error_responses(401, 403, 404, 503))
def delete_secret(
    caller: AdminCaller,
    state: StateDep,
    engine: EngineDep,
    settings: SettingsDep,
    name: str = SecretNamePath,
) -> SecretDeletedPublic:
    """Delete a secret: every stored version of its value is destroyed."""
    workspace = caller.workspace_id
    command = DeleteSecret(workspace_id=workspace, name=name)
    result = _send_and_wait(state, engine, settings, caller, command)
    if result.status != "accepted":
        raise _refusal(result)
    with _store(settings) as store:
        last = store.current(workspace, name)
        store.destroy(workspace, name)
    return SecretDeletedPublic(name=name, version=last.version if last else 0)
