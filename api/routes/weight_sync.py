"""Weight sync: hotload a saved snapshot, and what each sampler serves (the weight syncer's
server side, seed 002).

Saving sampler weights syncs them by default (training routes); `hotload` syncs a snapshot saved
earlier with `hotload: null`. Every sync is numbered per sampler (`weights_version`), and the
sampler reports each one as started, succeeded or failed.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, status

from api.auth import Caller, CallerDep, TrainCaller
from api.deps import (
    IdempotencyHeader,
    ReadDep,
    RequestIdQuery,
    RunIdPath,
    SamplerIdPath,
    SubmitterDep,
)
from api.errors import error_responses, not_found
from api.models import (
    HotloadCreate,
    RequestAccepted,
    SamplerWeightsPublic,
    WeightSyncPublic,
    WeightSyncsPublic,
)
from api.queries import ReadModels, Row
from api.routes._common import active_run, envelope
from api.submit import command_id_for, request_id_of, resolve_request_id
from commands.loops import HotloadOptions, HotloadWeights
from events.limits import RequestKey

runs_router = APIRouter(
    prefix="/v1/loops/runs", tags=["weight sync"], responses=error_responses(404, 409)
)
samplers_router = APIRouter(
    prefix="/v1/loops/samplers", tags=["weight sync"], responses=error_responses(404)
)


@runs_router.post("/{run_id}/hotload", status_code=status.HTTP_202_ACCEPTED)
def hotload(
    run_id: RunIdPath,
    body: HotloadCreate,
    caller: TrainCaller,
    reads: ReadDep,
    submitter: SubmitterDep,
    idempotency_key: IdempotencyHeader = None,
    request_id: RequestIdQuery = None,
) -> RequestAccepted:
    """Sync a sampler snapshot of this run (saved with `hotload: null`, or saved and synced
    before) to the run's sampler. The future is accepted once the sync is recorded; the
    sampler's progress is at GET /v1/loops/samplers/{sampler_id}/syncs?request_id=..."""
    ids = resolve_request_id(
        header=idempotency_key,
        query=request_id,
        body=body.request_id,
        workspace=caller.workspace_id,
    )
    run = active_run(reads, run_id, caller)
    options = HotloadOptions.model_validate(
        body.model_dump(include=set(HotloadOptions.model_fields))
    )
    command = HotloadWeights(
        run_id=run_id, name=body.name, checkpoint_type=body.checkpoint_type, options=options
    )
    submitter.submit(
        envelope(
            request_id=ids.command_id,
            command=command,
            aggregate_id=run["session_id"],
            caller=caller,
        ),
        to="commands",
    )
    return RequestAccepted(request_id=ids.request_id)


def _sampler(reads: ReadModels, sampler_id: str, caller: Caller) -> Row:
    # Sampler ids are unique across workspaces, so once the sampler is the caller's, so are its
    # weights and hotloads (those tables, written by sampler events, need no workspace column).
    sampler = reads.sampler(sampler_id, workspace=caller.workspace_id)
    if sampler is None:
        raise not_found(f"sampler {sampler_id} not found", field="sampler_id")
    return sampler


@samplers_router.get("/{sampler_id}/weights")
def sampler_weights(
    sampler_id: SamplerIdPath, caller: CallerDep, reads: ReadDep
) -> SamplerWeightsPublic:
    """Which weights the sampler serves, the newest sync sent to it, and how the last hotload
    went (the weight syncer's `check_deployment_state`)."""
    sampler = _sampler(reads, sampler_id, caller)
    row = reads.sampler_weights(sampler_id) or {}
    target, serving = row.get("target_version"), row.get("serving_version")
    pending = (
        target is not None
        and (serving or 0) < target
        and (row.get("last_hotload_version") or 0) < target
    )
    return SamplerWeightsPublic(
        sampler_id=sampler_id,
        status=sampler["status"],
        ready=row.get("ready_at") is not None,
        ready_at=row.get("ready_at"),
        serving_version=serving,
        serving_checkpoint_id=row.get("serving_checkpoint_id"),
        serving_uri=row.get("serving_uri"),
        serving_digest=row.get("serving_digest"),
        target_version=target,
        pending=pending,
        last_hotload_version=row.get("last_hotload_version"),
        last_hotload_status=row.get("last_hotload_status"),
        last_hotload_reason=row.get("last_hotload_reason"),
        last_hotload_at=row.get("last_hotload_at"),
    )


@samplers_router.get("/{sampler_id}/syncs")
def weight_syncs(
    sampler_id: SamplerIdPath,
    caller: CallerDep,
    reads: ReadDep,
    request_id: Annotated[
        RequestKey | None, Query(description="the save or hotload request that caused the sync")
    ] = None,
    checkpoint_id: Annotated[
        RequestKey | None, Query(description="syncs of one checkpoint")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> WeightSyncsPublic:
    """The sampler's syncs, newest first, each with its hotload outcome, timings and bytes."""
    _sampler(reads, sampler_id, caller)
    rows = reads.weight_syncs(
        sampler_id,
        workspace=caller.workspace_id,
        command_id=command_id_for(caller.workspace_id, request_id) if request_id else None,
        checkpoint_id=checkpoint_id,
        limit=limit,
    )
    for row in rows:  # the client knows its request ids, not their ids on Kafka
        if row["command_id"] is not None:
            row["command_id"] = request_id_of(caller.workspace_id, row["command_id"])
    data = [WeightSyncPublic.model_validate(row) for row in rows]
    return WeightSyncsPublic(data=data, count=len(data))
