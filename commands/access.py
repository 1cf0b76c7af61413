"""The workspace aggregate: a tenant and its API keys. Commands, state, decide and evolve.

Pure like `commands/loops.py`: key ids and hashes are made by the caller (the API or the CLI,
`api/auth.py`), the clock comes in as an argument. The `default` workspace exists without any
event, so everything written before tenancy (and every producer that names no workspace) has a
home.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field, replace
from datetime import datetime
from types import MappingProxyType

from pydantic import Field

from commands.loops import Command, Rejected
from events.access import ApiKeyCreated, ApiKeyRevoked, Scope, WorkspaceCreated
from events.envelope import DEFAULT_WORKSPACE, WORKSPACE_ID_PATTERN
from events.limits import ShortText, Text
from events.loops import DomainEvent

AGGREGATE_TYPE = "workspace"
# A workspace's aggregate id is "workspace:<id>": the prefix keeps it apart from session ids
# (which other producers choose), so a session named "default" cannot take a workspace's place.
AGGREGATE_PREFIX = "workspace:"
KEY_ID = r"^[0-9a-f]{16}$"
KEY_HASH = r"^[0-9a-f]{64}$"


# --- commands --------------------------------------------------------------------------------


class CreateWorkspace(Command):
    """Create the workspace named by the command's aggregate_id."""

    name: ShortText | None = None


class CreateApiKey(Command):
    """Record a key made by the API or CLI: its id, scopes and the HMAC of its secret."""

    key_id: str = Field(pattern=KEY_ID)
    name: ShortText | None = None
    scopes: tuple[Scope, ...] = Field(min_length=1, max_length=3)
    prefix: str = Field(pattern=r"^tml-[0-9a-f]{16}$")
    key_hash: str = Field(pattern=KEY_HASH, description="hex HMAC-SHA256 of the secret")


class RevokeApiKey(Command):
    key_id: str = Field(pattern=KEY_ID)
    reason: Text | None = None


COMMANDS: tuple[type[Command], ...] = (CreateWorkspace, CreateApiKey, RevokeApiKey)


# --- state -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyState:
    key_id: str
    scopes: tuple[str, ...]
    revoked: bool = False


def _frozen_map() -> MappingProxyType:
    return MappingProxyType({})


@dataclass(frozen=True)
class WorkspaceState:
    workspace_id: str
    exists: bool = False
    name: str | None = None
    version: int = 0  # sequence of the last event applied
    keys: MappingProxyType = field(default_factory=_frozen_map)  # key_id -> KeyState


def aggregate_id_of(workspace_id: str) -> str:
    """The aggregate id (and Kafka key) of a workspace's commands and events."""
    return AGGREGATE_PREFIX + workspace_id


def initial_state(aggregate_id: str) -> WorkspaceState:
    # The default workspace needs no event: it exists from the start.
    # Without the prefix the id names no workspace: "" fails the id pattern at creation.
    prefixed = aggregate_id.startswith(AGGREGATE_PREFIX)
    workspace_id = aggregate_id.removeprefix(AGGREGATE_PREFIX) if prefixed else ""
    return WorkspaceState(
        workspace_id=workspace_id,
        exists=aggregate_id == aggregate_id_of(DEFAULT_WORKSPACE),
    )


# --- decide ----------------------------------------------------------------------------------


def decide(state: WorkspaceState, command: Command, *, now: datetime) -> list[DomainEvent]:
    """The events `command` causes in `state`, or `Rejected`."""
    if isinstance(command, CreateWorkspace):
        if not re.match(WORKSPACE_ID_PATTERN, state.workspace_id):
            raise Rejected(
                f"a workspace's aggregate_id is {AGGREGATE_PREFIX}<id>, the id matching "
                f"{WORKSPACE_ID_PATTERN}",
                field="aggregate_id",
            )
        if state.exists:
            raise Rejected(f"workspace {state.workspace_id} already exists", field="aggregate_id")
        return [WorkspaceCreated(workspace_id=state.workspace_id, name=command.name)]
    if not state.exists:
        raise Rejected(f"workspace {state.workspace_id} does not exist", field="workspace_id")
    return _decide_in_workspace(command, state)


@functools.singledispatch
def _decide_in_workspace(command: Command, state: WorkspaceState) -> list[DomainEvent]:
    raise Rejected(f"{type(command).__name__} is not a workspace command", field="type")


@_decide_in_workspace.register
def _(command: CreateApiKey, state: WorkspaceState) -> list[DomainEvent]:
    if command.key_id in state.keys:
        raise Rejected(f"api key {command.key_id} already exists", field="payload.key_id")
    if command.prefix != f"tml-{command.key_id}":
        raise Rejected("prefix must be tml-<key_id>", field="payload.prefix")
    return [
        ApiKeyCreated(
            key_id=command.key_id,
            workspace_id=state.workspace_id,
            name=command.name,
            scopes=tuple(sorted(set(command.scopes))),
            prefix=command.prefix,
            key_hash=command.key_hash,
        )
    ]


@_decide_in_workspace.register
def _(command: RevokeApiKey, state: WorkspaceState) -> list[DomainEvent]:
    key = state.keys.get(command.key_id)
    if key is None:
        raise Rejected(f"api key {command.key_id} does not exist", field="payload.key_id")
    if key.revoked:
        raise Rejected(f"api key {command.key_id} is already revoked", field="payload.key_id")
    return [
        ApiKeyRevoked(key_id=command.key_id, workspace_id=state.workspace_id, reason=command.reason)
    ]


# --- evolve ----------------------------------------------------------------------------------


def evolve(state: WorkspaceState, event: DomainEvent) -> WorkspaceState:
    """Fold one event into the state (dispatching on the event's type)."""
    return _evolve(event, state)


@functools.singledispatch
def _evolve(event: DomainEvent, state: WorkspaceState) -> WorkspaceState:
    raise TypeError(f"{type(event).__name__} does not belong to a workspace")


@_evolve.register
def _(event: WorkspaceCreated, state: WorkspaceState) -> WorkspaceState:
    return replace(state, exists=True, name=event.name)


@_evolve.register
def _(event: ApiKeyCreated, state: WorkspaceState) -> WorkspaceState:
    keys = dict(state.keys)
    keys[event.key_id] = KeyState(key_id=event.key_id, scopes=tuple(event.scopes))
    return replace(state, keys=MappingProxyType(keys))


@_evolve.register
def _(event: ApiKeyRevoked, state: WorkspaceState) -> WorkspaceState:
    keys = dict(state.keys)
    if event.key_id in keys:
        keys[event.key_id] = replace(keys[event.key_id], revoked=True)
    return replace(state, keys=MappingProxyType(keys))
