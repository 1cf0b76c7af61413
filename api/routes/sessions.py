"""Sessions: the container of one base model's trainer run, sampler and checkpoints."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, status

from api.auth import CallerDep, TrainCaller
from api.deps import (
    IdempotencyHeader,
    OffsetQuery,
    ReadDep,
    RequestIdQuery,
    SessionIdPath,
    SettingsDep,
    SubmitterDep,
)
from api.errors import ApiError, error_responses, not_found
from api.models import (
    CheckpointPublic,
    RequestAccepted,
    RunPublic,
    SamplerPublic,
    SessionAccepted,
    SessionCreate,
    SessionDetail,
    SessionPublic,
    SessionsPublic,
)
from api.routes._common import active_session, envelope
from api.submit import derived_resource_id, new_resource_id, resolve_request_id
from commands.loops import CreateSession, EndSession
from events.limits import Text
from gpu_workers.models import UnknownBaseModel, require_base_model

router = APIRouter(prefix="/v1/loops/sessions", tags=["sessions"])
ITEM_ERRORS = error_responses(404, 409)


@router.post("", status_code=status.HTTP_202_ACCEPTED, responses=error_responses(400))
def create_session(
    body: SessionCreate,
    caller: TrainCaller,
    submitter: SubmitterDep,
    settings: SettingsDep,
    idempotency_key: IdempotencyHeader = None,
    request_id: RequestIdQuery = None,
) -> SessionAccepted:
    """Create a session; `request_id` is the future of its CreateSession command. A base model
    this deployment does not serve is refused at once (400 naming the available ones), as the
    Tinker door does, not at the first sample."""
    try:
        require_base_model(settings, body.base_model)
    except UnknownBaseModel as exc:
        raise ApiError(status.HTTP_400_BAD_REQUEST, str(exc), field="base_model") from exc
    ids = resolve_request_id(
        header=idempotency_key,
        query=request_id,
        body=body.request_id,
        workspace=caller.workspace_id,
    )
    # A re-post with the same key must name the same session, so the id derives from the key.
    session_id = derived_resource_id(ids.command_id, "session") if ids.chosen else new_resource_id()
    command = CreateSession(base_model=body.base_model, project=body.project, name=body.name)
    submitter.submit(
        envelope(
            request_id=ids.command_id, command=command, aggregate_id=session_id, caller=caller
        ),
        to="commands",
    )
    return SessionAccepted(session_id=session_id, request_id=ids.request_id)


@router.get("")
def list_sessions(
    caller: CallerDep,
    reads: ReadDep,
    status_: Literal["active", "ended"] | None = Query(None, alias="status"),
    limit: int = Query(100, ge=1, le=1000),
    offset: OffsetQuery = 0,
) -> SessionsPublic:
    rows, total = reads.sessions(
        workspace=caller.workspace_id, status=status_, limit=limit, offset=offset
    )
    return SessionsPublic(data=[SessionPublic.model_validate(r) for r in rows], count=total)


@router.get("/{session_id}", responses=error_responses(404))
def get_session(session_id: SessionIdPath, caller: CallerDep, reads: ReadDep) -> SessionDetail:
    """The session with its runs, samplers and checkpoints (deleted ones included)."""
    workspace = caller.workspace_id
    row = reads.session(session_id, workspace=workspace)
    if row is None:
        raise not_found(f"session {session_id} not found", field="session_id")
    return SessionDetail(
        **SessionPublic.model_validate(row).model_dump(),
        runs=[
            RunPublic.model_validate(r)
            for r in reads.runs_of_session(session_id, workspace=workspace)
        ],
        samplers=[
            SamplerPublic.model_validate(r)
            for r in reads.samplers_of_session(session_id, workspace=workspace)
        ],
        checkpoints=[
            CheckpointPublic.model_validate(r)
            for r in reads.checkpoints_of_session(session_id, workspace=workspace)
        ],
    )


@router.delete("/{session_id}", status_code=status.HTTP_202_ACCEPTED, responses=ITEM_ERRORS)
def end_session(
    session_id: SessionIdPath,
    caller: TrainCaller,
    reads: ReadDep,
    submitter: SubmitterDep,
    idempotency_key: IdempotencyHeader = None,
    request_id: RequestIdQuery = None,
    reason: Annotated[Text, Query(description="why (kept on the session)")] = "ended by user",
) -> RequestAccepted:
    """End the session: its run and sampler stop and their workers release them."""
    ids = resolve_request_id(
        header=idempotency_key, query=request_id, body=None, workspace=caller.workspace_id
    )
    if not submitter.already_submitted(ids.command_id):
        active_session(reads, session_id, caller)
    command = EndSession(reason=reason)
    submitter.submit(
        envelope(
            request_id=ids.command_id, command=command, aggregate_id=session_id, caller=caller
        ),
        to="commands",
    )
    return RequestAccepted(request_id=ids.request_id)
