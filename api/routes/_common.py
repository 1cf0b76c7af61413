"""Small helpers the routes share: envelopes and the state checks every write route makes."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from api.auth import Caller
from api.errors import conflict, not_found
from api.queries import ReadModels, Row
from commands.envelope import DEFAULT_WORKSPACE, CommandEnvelope

ACTOR = "api"


def envelope(
    *,
    request_id: str,
    command: BaseModel | dict[str, Any],
    type_: str | None = None,
    aggregate_id: str,
    correlation_id: str | None = None,
    caller: Caller | None = None,
) -> CommandEnvelope:
    """The envelope of a command a route sends: with a caller, its key id is the actor and its
    workspace the command's; without one (routes not yet authenticated), actor "api" in the
    default workspace."""
    payload = command if isinstance(command, dict) else command.model_dump(mode="json")
    return CommandEnvelope(
        command_id=request_id,
        type=type_ or type(command).__name__,
        aggregate_id=aggregate_id,
        actor=caller.key_id if caller else ACTOR,
        workspace_id=caller.workspace_id if caller else DEFAULT_WORKSPACE,
        correlation_id=correlation_id,
        payload=payload,
    )


def active_session(reads: ReadModels, session_id: str, caller: Caller) -> Row:
    session = reads.session(session_id, workspace=caller.workspace_id)
    if session is None:
        raise not_found(f"session {session_id} not found", field="session_id")
    if session["status"] != "active":
        raise conflict(f"session {session_id} has ended", field="session_id")
    return session


def active_run(reads: ReadModels, run_id: str, caller: Caller) -> Row:
    run = reads.run(run_id, workspace=caller.workspace_id)
    if run is None:
        raise not_found(f"run {run_id} not found", field="run_id")
    if run["status"] != "active":
        raise conflict(f"run {run_id} is stopped ({run['stop_reason']})", field="run_id")
    return run


def source_run(reads: ReadModels, uri: str, caller: Caller) -> Row | None:
    """The run holding checkpoint `uri`, when the caller may start a run from it: a run of the
    caller's workspace (the trainer checks the checkpoint itself when it loads it), or the run
    of a live published checkpoint of any workspace. None otherwise: another workspace's
    unpublished checkpoint is as missing as one never saved."""
    run = reads.run(uri.removeprefix("bt://loops:").split("/")[0], workspace=caller.workspace_id)
    if run is not None:
        return run
    published = reads.published_checkpoint(uri)
    if published is None:
        return None
    return reads.run(published["run_id"], workspace=published["workspace_id"] or DEFAULT_WORKSPACE)
