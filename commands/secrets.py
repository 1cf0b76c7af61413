"""The secret aggregate: which named secrets a workspace has, at which version, with which digest.

One aggregate per (workspace, name), id `secret:<workspace>:<name>`, so two workspaces may both
have an `hf_access_token`. The value itself never reaches this module (nor Kafka): the API stores
it encrypted first (infra/secret_store.py) and sends the command with its digest; a rejected
command's value is removed again.

Versions: the API allocates the next version and this aggregate only checks that it moves
forward, so a value stored under a version the log never accepted cannot be confused with one it
did. A version is never reused, not even after a delete.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from datetime import datetime

from pydantic import Field

from commands.loops import Command, Rejected
from events.limits import ShortText
from events.loops import DomainEvent
from events.secrets import DIGEST, SECRET_NAME, SecretCreated, SecretDeleted, SecretUpdated

AGGREGATE_TYPE = "secret"


def secret_aggregate_id(workspace_id: str, name: str) -> str:
    return f"secret:{workspace_id}:{name}"


# --- commands --------------------------------------------------------------------------------


class CreateSecret(Command):
    workspace_id: ShortText
    name: str = Field(pattern=SECRET_NAME)
    version: int = Field(ge=1, le=2**31 - 1)
    digest: str = Field(pattern=DIGEST, description="HMAC-SHA256 of the value, server-keyed")


class UpdateSecret(Command):
    workspace_id: ShortText
    name: str = Field(pattern=SECRET_NAME)
    version: int = Field(ge=1, le=2**31 - 1)
    digest: str = Field(pattern=DIGEST, description="HMAC-SHA256 of the value, server-keyed")


class DeleteSecret(Command):
    workspace_id: ShortText
    name: str = Field(pattern=SECRET_NAME)


COMMANDS: tuple[type[Command], ...] = (CreateSecret, UpdateSecret, DeleteSecret)


# --- state -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SecretState:
    aggregate_id: str
    exists: bool = False
    value_version: int = 0  # the last version the log accepted (kept after a delete)
    digest: str | None = None
    version: int = 0  # sequence of the last event applied


def initial_state(aggregate_id: str) -> SecretState:
    return SecretState(aggregate_id=aggregate_id)


# --- decide ----------------------------------------------------------------------------------

AnySecretCommand = CreateSecret | UpdateSecret | DeleteSecret


def decide(state: SecretState, command: Command, *, now: datetime) -> list[DomainEvent]:
    if not isinstance(command, AnySecretCommand):
        raise Rejected(f"{type(command).__name__} is not a secret command", field="type")
    expected = secret_aggregate_id(command.workspace_id, command.name)
    if state.aggregate_id != expected:
        raise Rejected(f"aggregate_id must be {expected!r} for this secret", field="aggregate_id")
    return _decide(command, state)


@functools.singledispatch
def _decide(command: Command, state: SecretState) -> list[DomainEvent]:
    raise Rejected(f"unsupported command {type(command).__name__}", field="type")


def _check_version_moves_forward(state: SecretState, version: int) -> None:
    if version <= state.value_version:
        raise Rejected(
            f"version {version} is not after the secret's last version {state.value_version}",
            field="version",
        )


@_decide.register
def _(command: CreateSecret, state: SecretState) -> list[DomainEvent]:
    if state.exists:
        raise Rejected(f"secret {command.name} already exists; update it", field="name")
    _check_version_moves_forward(state, command.version)
    return [
        SecretCreated(
            workspace_id=command.workspace_id,
            name=command.name,
            version=command.version,
            digest=command.digest,
        )
    ]


@_decide.register
def _(command: UpdateSecret, state: SecretState) -> list[DomainEvent]:
    if not state.exists:
        raise Rejected(f"secret {command.name} does not exist", field="name")
    _check_version_moves_forward(state, command.version)
    return [
        SecretUpdated(
            workspace_id=command.workspace_id,
            name=command.name,
            version=command.version,
            digest=command.digest,
        )
    ]


@_decide.register
def _(command: DeleteSecret, state: SecretState) -> list[DomainEvent]:
    if not state.exists:
        raise Rejected(f"secret {command.name} does not exist", field="name")
    return [
        SecretDeleted(
            workspace_id=command.workspace_id, name=command.name, version=state.value_version
        )
    ]


# --- evolve ----------------------------------------------------------------------------------


def evolve(state: SecretState, event: DomainEvent) -> SecretState:
    """Fold one event into the state. The caller advances `version` (see `apply`)."""
    return _evolve(event, state)


@functools.singledispatch
def _evolve(event: DomainEvent, state: SecretState) -> SecretState:
    return state


@_evolve.register(SecretCreated)
@_evolve.register(SecretUpdated)
def _(event: SecretCreated | SecretUpdated, state: SecretState) -> SecretState:
    return replace(state, exists=True, value_version=event.version, digest=event.digest)


@_evolve.register
def _(event: SecretDeleted, state: SecretState) -> SecretState:
    return replace(state, exists=False, digest=None)
