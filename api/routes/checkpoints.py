"""Checkpoints: listings, details, per-file presigned URLs (paginated), deletion, promotion,
TTL changes and publishing."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Query, status

from api.auth import Caller, CallerDep, TrainCaller
from api.deps import (
    ApiSettingsDep,
    CheckpointIdPath,
    IdempotencyHeader,
    ReadDep,
    RequestIdQuery,
    RunIdPath,
    StoreDep,
    SubmitterDep,
)
from api.errors import ApiError, error_responses, not_found
from api.models import (
    CheckpointFilesPage,
    CheckpointPublic,
    CheckpointsPublic,
    CheckpointTtlUpdate,
    PresignedUrl,
    PromoteCreate,
    RequestAccepted,
)
from api.pagination import InvalidPageToken, decode_page_token, encode_page_token
from api.queries import ReadModels, Row
from api.routes._common import envelope
from api.submit import Submitter, resolve_request_id
from commands.loops import (
    Command,
    DeleteCheckpoint,
    PromoteCheckpoint,
    PublishCheckpoint,
    SetCheckpointTtl,
    UnpublishCheckpoint,
)
from events.limits import Text
from gpu_workers.checkpoint_store import CheckpointRef, CheckpointStore

router = APIRouter(prefix="/v1/loops", tags=["checkpoints"])


def _checkpoint(reads: ReadModels, checkpoint_id: str, caller: Caller) -> Row:
    row = reads.checkpoint(checkpoint_id, workspace=caller.workspace_id)
    if row is None:
        raise not_found(f"checkpoint {checkpoint_id} not found", field="checkpoint_id")
    return row


@router.get("/runs/{run_id}/checkpoints", responses=error_responses(404))
def list_run_checkpoints(
    run_id: RunIdPath,
    caller: CallerDep,
    reads: ReadDep,
    include_deleted: bool = Query(False, description="also list deleted/expired checkpoints"),
) -> CheckpointsPublic:
    workspace = caller.workspace_id
    if reads.run(run_id, workspace=workspace) is None:
        raise not_found(f"run {run_id} not found", field="run_id")
    rows = reads.checkpoints_of_run(run_id, workspace=workspace, include_deleted=include_deleted)
    return CheckpointsPublic(
        data=[CheckpointPublic.model_validate(r) for r in rows], count=len(rows)
    )


@router.get("/checkpoints/{checkpoint_id}", responses=error_responses(404))
def get_checkpoint(
    checkpoint_id: CheckpointIdPath, caller: CallerDep, reads: ReadDep
) -> CheckpointPublic:
    return CheckpointPublic.model_validate(_checkpoint(reads, checkpoint_id, caller))


@router.get(
    "/checkpoints/{checkpoint_id}/files",
    responses=error_responses(400, 404, 410),
)
def list_checkpoint_files(
    checkpoint_id: CheckpointIdPath,
    caller: CallerDep,
    reads: ReadDep,
    store: StoreDep,
    api_settings: ApiSettingsDep,
    page_size: int = Query(100, ge=1, le=1000),
    page_token: Annotated[
        Text | None, Query(description="next_page_token of the previous page")
    ] = None,
) -> CheckpointFilesPage:
    """One presigned GET URL per file of the checkpoint folder, `page_size` at a time."""
    row = _checkpoint(reads, checkpoint_id, caller)
    if row["status"] != "active":
        raise ApiError(
            status.HTTP_410_GONE,
            f"checkpoint {checkpoint_id} was deleted ({row['delete_reason']})",
            field="checkpoint_id",
        )
    secret = api_settings.page_token_secret
    offset = 0
    if page_token is not None:
        try:
            offset = decode_page_token(
                page_token,
                checkpoint_id=checkpoint_id,
                secret=secret,
                workspace_id=caller.workspace_id,
            )
        except InvalidPageToken as exc:
            raise ApiError(status.HTTP_400_BAD_REQUEST, str(exc), field="page_token") from exc
    # A stable order makes offsets meaningful across pages.
    files = sorted(row["files"], key=lambda f: f["relative_file_name"])
    if offset > len(files):
        raise ApiError(
            status.HTTP_400_BAD_REQUEST, "page_token is past the end", field="page_token"
        )
    prefix = CheckpointStore(store).prefix(CheckpointRef(row["run_id"], row["kind"], row["name"]))
    expires = timedelta(seconds=api_settings.presigned_url_ttl_s)
    page = files[offset : offset + page_size]
    end = offset + len(page)
    return CheckpointFilesPage(
        presigned_urls=[
            PresignedUrl(
                url=store.presigned_get_url(prefix + f["relative_file_name"], expires=expires),
                relative_file_name=f["relative_file_name"],
                size_bytes=f["size_bytes"],
            )
            for f in page
        ],
        total_count=len(files),
        next_page_token=(
            encode_page_token(
                checkpoint_id=checkpoint_id,
                offset=end,
                secret=secret,
                workspace_id=caller.workspace_id,
            )
            if end < len(files)
            else None
        ),
    )


def _submit(
    row: Row, command: Command, *, request_id: str, caller: Caller, submitter: Submitter
) -> None:
    submitter.submit(
        envelope(
            request_id=request_id, command=command, aggregate_id=row["session_id"], caller=caller
        ),
        to="commands",
    )


@router.delete(
    "/checkpoints/{checkpoint_id}",
    status_code=status.HTTP_202_ACCEPTED,
    responses=error_responses(404, 410),
)
def delete_checkpoint(
    checkpoint_id: CheckpointIdPath,
    caller: TrainCaller,
    reads: ReadDep,
    submitter: SubmitterDep,
    idempotency_key: IdempotencyHeader = None,
    request_id: RequestIdQuery = None,
) -> RequestAccepted:
    ids = resolve_request_id(
        header=idempotency_key, query=request_id, body=None, workspace=caller.workspace_id
    )
    row = _checkpoint(reads, checkpoint_id, caller)
    if row["status"] != "active" and not submitter.already_submitted(ids.command_id):
        raise ApiError(
            status.HTTP_410_GONE, f"checkpoint {checkpoint_id} is already deleted",
            field="checkpoint_id",
        )  # fmt: skip
    command = DeleteCheckpoint(checkpoint_id=checkpoint_id)
    _submit(row, command, request_id=ids.command_id, caller=caller, submitter=submitter)
    return RequestAccepted(request_id=ids.request_id)


@router.post(
    "/checkpoints/{checkpoint_id}/promote",
    status_code=status.HTTP_202_ACCEPTED,
    responses=error_responses(404),
)
def promote_checkpoint(
    checkpoint_id: CheckpointIdPath,
    body: PromoteCreate,
    caller: TrainCaller,
    reads: ReadDep,
    submitter: SubmitterDep,
    idempotency_key: IdempotencyHeader = None,
    request_id: RequestIdQuery = None,
) -> RequestAccepted:
    """Promote a sampler checkpoint to an environment (default `production`): it is kept from
    then on (no TTL expiry, no keep-last retention). Only a standalone model is promotable: for
    full-parameter training the first checkpoint of a chain (a base), for LoRA any; anything
    else is rejected in the future with the rule."""
    ids = resolve_request_id(
        header=idempotency_key,
        query=request_id,
        body=body.request_id,
        workspace=caller.workspace_id,
    )
    row = _checkpoint(reads, checkpoint_id, caller)
    command = PromoteCheckpoint(checkpoint_id=checkpoint_id, environment=body.environment)
    _submit(row, command, request_id=ids.command_id, caller=caller, submitter=submitter)
    return RequestAccepted(request_id=ids.request_id)


@router.put(
    "/checkpoints/{checkpoint_id}/ttl",
    status_code=status.HTTP_202_ACCEPTED,
    responses=error_responses(404),
)
def set_checkpoint_ttl(
    checkpoint_id: CheckpointIdPath,
    body: CheckpointTtlUpdate,
    caller: TrainCaller,
    reads: ReadDep,
    submitter: SubmitterDep,
    idempotency_key: IdempotencyHeader = None,
    request_id: RequestIdQuery = None,
) -> RequestAccepted:
    """Set the checkpoint's expiry anew: `ttl_seconds` from now (1 s to 10 years, as at save
    time), or never (`null`). The janitor expires it then; a promoted checkpoint never expires
    (a TTL on it is rejected in the future)."""
    ids = resolve_request_id(
        header=idempotency_key,
        query=request_id,
        body=body.request_id,
        workspace=caller.workspace_id,
    )
    row = _checkpoint(reads, checkpoint_id, caller)
    command = SetCheckpointTtl(checkpoint_id=checkpoint_id, ttl_seconds=body.ttl_seconds)
    _submit(row, command, request_id=ids.command_id, caller=caller, submitter=submitter)
    return RequestAccepted(request_id=ids.request_id)


def _set_public(
    public: bool,
    checkpoint_id: str,
    *,
    caller: Caller,
    reads: ReadModels,
    submitter: Submitter,
    idempotency_key: str | None,
    request_id: str | None,
) -> RequestAccepted:
    ids = resolve_request_id(
        header=idempotency_key, query=request_id, body=None, workspace=caller.workspace_id
    )
    row = _checkpoint(reads, checkpoint_id, caller)
    command = (PublishCheckpoint if public else UnpublishCheckpoint)(checkpoint_id=checkpoint_id)
    _submit(row, command, request_id=ids.command_id, caller=caller, submitter=submitter)
    return RequestAccepted(request_id=ids.request_id)


@router.post(
    "/checkpoints/{checkpoint_id}/publish",
    status_code=status.HTTP_202_ACCEPTED,
    responses=error_responses(404),
)
def publish_checkpoint(
    checkpoint_id: CheckpointIdPath,
    caller: TrainCaller,
    reads: ReadDep,
    submitter: SubmitterDep,
    idempotency_key: IdempotencyHeader = None,
    request_id: RequestIdQuery = None,
) -> RequestAccepted:
    """Publish the checkpoint: any workspace may then start a run from its URI
    (`from_checkpoint`, Tinker's create_training_client_from_state / load_state). Its listings,
    files, TTL and deletion stay its workspace's. Already public: rejected in the future."""
    return _set_public(
        True, checkpoint_id, caller=caller, reads=reads, submitter=submitter,
        idempotency_key=idempotency_key, request_id=request_id,
    )  # fmt: skip


@router.delete(
    "/checkpoints/{checkpoint_id}/publish",
    status_code=status.HTTP_202_ACCEPTED,
    responses=error_responses(404),
)
def unpublish_checkpoint(
    checkpoint_id: CheckpointIdPath,
    caller: TrainCaller,
    reads: ReadDep,
    submitter: SubmitterDep,
    idempotency_key: IdempotencyHeader = None,
    request_id: RequestIdQuery = None,
) -> RequestAccepted:
    """Make a published checkpoint private again (runs already started from it keep what they
    loaded). Not public: rejected in the future."""
    return _set_public(
        False, checkpoint_id, caller=caller, reads=reads, submitter=submitter,
        idempotency_key=idempotency_key, request_id=request_id,
    )  # fmt: skip
