"""Runs: a trainer server and its paired sampler, provisioned in one call."""

from __future__ import annotations

from fastapi import APIRouter, Query, status

from api.auth import CallerDep, TrainCaller
from api.deps import (
    IdempotencyHeader,
    OffsetQuery,
    ReadDep,
    RequestIdQuery,
    RunIdPath,
    SubmitterDep,
)
from api.errors import error_responses, not_found
from api.models import RunAccepted, RunCreate, RunPublic, RunsPublic
from api.routes._common import active_session, envelope, source_run
from api.submit import derived_resource_id, new_resource_id, resolve_request_id
from commands.loops import CreateRun

router = APIRouter(prefix="/v1/loops/runs", tags=["runs"])


@router.post("", status_code=status.HTTP_202_ACCEPTED, responses=error_responses(404, 409))
def create_run(
    body: RunCreate,
    caller: TrainCaller,
    reads: ReadDep,
    submitter: SubmitterDep,
    idempotency_key: IdempotencyHeader = None,
    request_id: RequestIdQuery = None,
) -> RunAccepted:
    """Provision a run (trainer) and its sampler; both ids come back at once. `from_checkpoint`
    names a checkpoint of the caller's workspace, or a published one of any workspace."""
    ids = resolve_request_id(
        header=idempotency_key,
        query=request_id,
        body=body.request_id,
        workspace=caller.workspace_id,
    )
    if not submitter.already_submitted(ids.command_id):
        active_session(reads, body.session_id, caller)
        if (
            body.from_checkpoint is not None
            and source_run(reads, body.from_checkpoint, caller) is None
        ):
            # Another workspace's checkpoint is as missing as one never saved, unless published.
            raise not_found(f"checkpoint {body.from_checkpoint} not found", field="from_checkpoint")
    if ids.chosen:  # the same key names the same run and sampler
        run_id, sampler_id = (
            derived_resource_id(ids.command_id, "run"),
            derived_resource_id(ids.command_id, "sampler"),
        )
    else:
        run_id, sampler_id = new_resource_id(), new_resource_id()
    command = CreateRun(
        run_id=run_id,
        sampler_id=sampler_id,
        max_seq_len=body.max_seq_len,
        lora_rank=body.lora_rank,
        from_checkpoint=body.from_checkpoint,
        keep_last_checkpoints=body.keep_last_checkpoints,
        user_metadata=body.user_metadata,
    )
    submitter.submit(
        envelope(
            request_id=ids.command_id, command=command, aggregate_id=body.session_id, caller=caller
        ),
        to="commands",
    )
    return RunAccepted(
        run_id=run_id, sampler_id=sampler_id, session_id=body.session_id, request_id=ids.request_id
    )


@router.get("")
def list_runs(
    caller: CallerDep,
    reads: ReadDep,
    limit: int = Query(100, ge=1, le=1000),
    offset: OffsetQuery = 0,
) -> RunsPublic:
    """The workspace's runs, newest first, across its sessions."""
    rows, total = reads.runs(workspace=caller.workspace_id, limit=limit, offset=offset)
    return RunsPublic(data=[RunPublic.model_validate(r) for r in rows], count=total)


@router.get("/{run_id}", responses=error_responses(404))
def get_run(run_id: RunIdPath, caller: CallerDep, reads: ReadDep) -> RunPublic:
    row = reads.run(run_id, workspace=caller.workspace_id)
    if row is None:
        raise not_found(f"run {run_id} not found", field="run_id")
    return RunPublic.model_validate(row)
