"""The Tinker `RestClient` routes: training runs, their checkpoints, download URLs, deletion,
TTL changes, publishing.

Reads come from the same read models as /v1/loops (runs, checkpoints); deletion, TTL changes
and publishing are the same `DeleteCheckpoint`, `SetCheckpointTtl`, `PublishCheckpoint` and
`UnpublishCheckpoint` commands, answered once the session applied them and the read models show
it (the SDK resolves these calls on the HTTP answer). Tinker names a checkpoint `<kind>/<name>`
inside its training run (`tinker://<model_id>/<kind>/<name>`); loopstream's checkpoint rows
carry run, kind and name, so the mapping is a lookup (api/tinker/ids.py maps model ids to runs).

Download: the SDK's only download call is `get_external_weights_urls`, one signed URL per file,
for `tinker://<model_id>/external_weights/<name>` paths (the SDK refuses other kinds before
sending). loopstream's sampler_weights checkpoint is its exportable form, so `external_weights`
names the sampler_weights checkpoint of that name; the same per-file presigned URLs as
`GET /v1/loops/checkpoints/{id}/files`. Over plain HTTP the route also serves `weights/<name>`
and `sampler_weights/<name>`.

Published (`public: true`): any workspace may start a training run from the checkpoint's path
(create_training_client_from_state[_with_optimizer], load_state) and read its
`get_weights_info_by_tinker_path`. Everything else stays the owner's: listings, the run, download
URLs, sampling clients, TTL, deletion, (un)publishing; another workspace gets a 404 there.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query, Response
from sqlalchemy import Engine

from api.auth import Caller, CallerDep, TrainCaller, authenticate
from api.deps import (
    ApiSettingsDep,
    EngineDep,
    OffsetQuery,
    ReadDep,
    SettingsDep,
    StateDep,
    StoreDep,
    SubmitterDep,
)
from api.errors import ApiError
from api.queries import ReadModels, Row
from api.routes._common import envelope, source_run
from api.submit import Submitter, new_resource_id
from api.tinker import ids
from api.tinker.routes import _lookup, _validated, run_of
from commands.loops import (
    Command,
    DeleteCheckpoint,
    PublishCheckpoint,
    SetCheckpointTtl,
    UnpublishCheckpoint,
)
from events.limits import MAX_PAGE_LIMIT, RequestKey, ShortText
from gpu_workers.checkpoint_store import CheckpointRef, CheckpointStore
from infra.settings import Settings

router = APIRouter(prefix="/api/v1", tags=["tinker"], dependencies=[Depends(authenticate)])

# The SDK's delete, TTL and (un)publish resolve on the HTTP answer: answer once it is applied.
APPLY_WAIT_S = 30.0
CHECKPOINT_TYPES = {"weights": "training", "sampler_weights": "sampler"}
TinkerKind = Literal["weights", "sampler_weights", "external_weights"]
StoredKind = Literal["weights", "sampler_weights"]
# A Tinker model id (`<session>:train:<n>`, or a loops run id) and a checkpoint name.
ModelIdPath = Annotated[RequestKey, Path(description="training run (model) id")]
NamePath = Annotated[ShortText, Path(description="checkpoint name")]


def _run(reads: ReadModels, model_id: str, caller: Caller) -> Row:
    # Another workspace's run is as missing as one that never was.
    run = run_of(reads, ids.run_id_of(model_id), caller)
    if run is None:
        raise ApiError(404, f"training run {model_id} not found", field="training_run_id")
    return run


def _checkpoint_public(row: Row) -> dict[str, Any]:
    return {
        "checkpoint_id": f"{row['kind']}/{row['name']}",
        "checkpoint_type": CHECKPOINT_TYPES[row["kind"]],
        "time": row["created_at"],
        "tinker_path": ids.tinker_path(row["uri"]),
        "size_bytes": row["total_size_bytes"],
        "public": bool(row.get("public")),
        "expires_at": row["expires_at"],
    }


def _training_run_public(reads: ReadModels, run: Row) -> dict[str, Any]:
    checkpoints = reads.checkpoints_of_run(
        run["run_id"], workspace=run["workspace_id"], include_deleted=False
    )
    latest = {row["kind"]: row for row in checkpoints}  # ordered by creation: the last wins
    return {
        "training_run_id": ids.model_id_of(run["run_id"]),
        "base_model": run["base_model"],
        "model_owner": run["workspace_id"],  # runs belong to workspaces
        "is_lora": run["lora_rank"] > 0,
        "lora_rank": run["lora_rank"] or None,
        "corrupted": False,
        "last_request_time": run["stopped_at"] or run["created_at"],
        "last_checkpoint": _checkpoint_public(latest["weights"]) if "weights" in latest else None,
        "last_sampler_checkpoint": (
            _checkpoint_public(latest["sampler_weights"]) if "sampler_weights" in latest else None
        ),
        "user_metadata": run.get("user_metadata"),
    }


def _checkpoint_row(reads: ReadModels, model_id: str, kind: str, name: str, caller: Caller) -> Row:
    run = _run(reads, model_id, caller)
    for row in reads.checkpoints_of_run(
        run["run_id"], workspace=caller.workspace_id, include_deleted=False
    ):
        if row["kind"] == kind and row["name"] == name:
            return row
    raise ApiError(404, f"checkpoint tinker://{model_id}/{kind}/{name} not found", field="path")


@router.get("/training_runs")
def list_training_runs(
    reads: ReadDep,
    caller: CallerDep,
    limit: int = Query(20, ge=1, le=1000),
    offset: OffsetQuery = 0,
) -> dict[str, Any]:
    rows, total = reads.runs(workspace=caller.workspace_id, limit=limit, offset=offset)
    return {
        "training_runs": [_training_run_public(reads, r) for r in rows],
        "cursor": {"offset": offset, "limit": limit, "total_count": total},
    }


@router.get("/training_runs/{model_id}")
def get_training_run(model_id: ModelIdPath, reads: ReadDep, caller: CallerDep) -> dict[str, Any]:
    return _training_run_public(reads, _run(reads, model_id, caller))


@router.post("/weights_info")
def weights_info(body: dict[str, Any], reads: ReadDep, caller: CallerDep) -> dict[str, Any]:
    try:
        uri = ids.bt_uri(str(body.get("tinker_path")))
    except ValueError as exc:
        raise ApiError(400, str(exc), field="tinker_path") from exc
    # The caller's run, or the run of a published checkpoint (what create-from-state needs).
    run = source_run(reads, uri, caller)
    if run is None:
        model_id = ids.model_id_of(uri.removeprefix("bt://loops:").split("/")[0])
        raise ApiError(404, f"training run {model_id} not found", field="training_run_id")
    return {
        "base_model": run["base_model"],
        "is_lora": run["lora_rank"] > 0,
        "lora_rank": run["lora_rank"] or None,
    }


@router.get("/training_runs/{model_id}/checkpoints")
def list_checkpoints(model_id: ModelIdPath, reads: ReadDep, caller: CallerDep) -> dict[str, Any]:
    run = _run(reads, model_id, caller)
    rows = reads.checkpoints_of_run(
        run["run_id"], workspace=caller.workspace_id, include_deleted=False
    )
    return {"checkpoints": [_checkpoint_public(r) for r in rows]}


@router.get("/checkpoints")
def list_user_checkpoints(
    reads: ReadDep,
    caller: CallerDep,
    limit: int = Query(100, ge=1, le=MAX_PAGE_LIMIT),
    offset: OffsetQuery = 0,
) -> dict[str, Any]:
    """Every live checkpoint of the caller's workspace, across its runs, newest first."""
    rows, total = reads.checkpoints_of_workspace(
        workspace=caller.workspace_id, limit=limit, offset=offset
    )
    return {
        "checkpoints": [_checkpoint_public(r) for r in rows],
        "cursor": {"offset": offset, "limit": limit, "total_count": total},
    }


@router.get("/training_runs/{model_id}/checkpoints/{kind}/{name}/external_weights_urls")
def external_weights_urls(
    model_id: ModelIdPath,
    kind: TinkerKind,
    name: NamePath,
    reads: ReadDep,
    store: StoreDep,
    api_settings: ApiSettingsDep,
    caller: CallerDep,
) -> dict[str, Any]:
    kind_of_row = "sampler_weights" if kind != "weights" else kind
    row = _checkpoint_row(reads, model_id, kind_of_row, name, caller)
    prefix = CheckpointStore(store).prefix(CheckpointRef(row["run_id"], row["kind"], row["name"]))
    expires = timedelta(seconds=api_settings.presigned_url_ttl_s)
    return {
        "urls": {
            f["relative_file_name"]: store.presigned_get_url(
                prefix + f["relative_file_name"], expires=expires
            )
            for f in row["files"]
        },
        "expires": datetime.now(UTC) + expires,
    }


def _apply(
    row: Row,
    command: Command,
    *,
    command_id: str,
    submitter: Submitter,
    state: Any,
    engine: Engine,
    settings: Settings,
    caller: Caller,
) -> None:
    """Send a command on the checkpoint's session and return once it is applied and the read
    models show it, so that a listing right after the answer sees the change. A rejection is a
    400 naming its field; a 409 when a concurrent request (un)published it first (the SDK
    retries that, and the retry finds the state it asked for)."""
    submitter.submit(
        envelope(
            request_id=command_id, command=command, aggregate_id=row["session_id"], caller=caller
        ),
        to="commands",
    )
    what = f"{type(command).__name__} of {row['checkpoint_id']}"
    deadline = time.monotonic() + APPLY_WAIT_S
    while (result := _lookup(state, engine, settings, command_id, caller)) is None:
        if time.monotonic() > deadline:
            raise ApiError(503, f"{what} not applied in time")
        time.sleep(0.01)
    if result.status != "accepted":
        status = 409 if result.field == "public" else 400
        raise ApiError(status, result.reason or result.status, field=result.field or "path")
    applied = max((ref.sequence for ref in result.events), default=0)
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            now = ReadModels(conn, settings.read_schema).checkpoint(
                row["checkpoint_id"], workspace=caller.workspace_id
            )
        if now is None or now["version"] >= applied:
            return
        time.sleep(0.01)
    # Applied all the same: the listing catches up a moment later.


def _done() -> Response:
    return Response(status_code=200, content=b"null", media_type="application/json")


@router.delete("/training_runs/{model_id}/checkpoints/{kind}/{name}")
def delete_checkpoint(
    model_id: ModelIdPath,
    kind: StoredKind,
    name: NamePath,
    reads: ReadDep,
    submitter: SubmitterDep,
    state: StateDep,
    engine: EngineDep,
    settings: SettingsDep,
    caller: TrainCaller,
) -> Response:
    row = _checkpoint_row(reads, model_id, kind, name, caller)
    _apply(
        row,
        DeleteCheckpoint(checkpoint_id=row["checkpoint_id"]),
        # One command per checkpoint: a retried delete is the same command.
        command_id=f"tinker:delete:{row['checkpoint_id']}",
        submitter=submitter,
        state=state,
        engine=engine,
        settings=settings,
        caller=caller,
    )
    return _done()


@router.put("/training_runs/{model_id}/checkpoints/{kind}/{name}/ttl")
def set_checkpoint_ttl(
    model_id: ModelIdPath,
    kind: StoredKind,
    name: NamePath,
    body: dict[str, Any],
    reads: ReadDep,
    submitter: SubmitterDep,
    state: StateDep,
    engine: EngineDep,
    settings: SettingsDep,
    caller: TrainCaller,
) -> Response:
    """`{"ttl_seconds": n}`: the checkpoint expires n seconds from now (1 s to 10 years, as at
    save time); `{"ttl_seconds": null}`: it never expires."""
    if "ttl_seconds" not in body:
        raise ApiError(
            400, "ttl_seconds: field required (null: never expires)", field="ttl_seconds"
        )
    row = _checkpoint_row(reads, model_id, kind, name, caller)
    command = _validated(
        SetCheckpointTtl, checkpoint_id=row["checkpoint_id"], ttl_seconds=body["ttl_seconds"]
    )
    _apply(
        row,
        command,
        # Each change is its own: counted from now, a later one is not a retry of an earlier.
        command_id=f"tinker:ttl:{row['checkpoint_id']}:{new_resource_id(12)}",
        submitter=submitter,
        state=state,
        engine=engine,
        settings=settings,
        caller=caller,
    )
    return _done()


def _set_public(
    public: bool,
    *,
    model_id: str,
    kind: str,
    name: str,
    reads: ReadModels,
    submitter: Submitter,
    state: Any,
    engine: Engine,
    settings: Settings,
    caller: Caller,
) -> Response:
    row = _checkpoint_row(reads, model_id, kind, name, caller)
    if bool(row["public"]) == public:
        # Already so: nothing to change, and no 409. The SDK retries a 409 for five minutes
        # before raising it, so a repeated publish would hang; the state asked for holds.
        return _done()
    command = PublishCheckpoint if public else UnpublishCheckpoint
    _apply(
        row,
        command(checkpoint_id=row["checkpoint_id"]),
        # Per version of the row: two identical requests on one state are one command.
        command_id=f"tinker:{command.__name__}:{row['checkpoint_id']}:{row['version']}",
        submitter=submitter,
        state=state,
        engine=engine,
        settings=settings,
        caller=caller,
    )
    return _done()


@router.post("/training_runs/{model_id}/checkpoints/{kind}/{name}/publish")
def publish_checkpoint(
    model_id: ModelIdPath,
    kind: StoredKind,
    name: NamePath,
    reads: ReadDep,
    submitter: SubmitterDep,
    state: StateDep,
    engine: EngineDep,
    settings: SettingsDep,
    caller: TrainCaller,
) -> Response:
    """Any workspace may then start a training run from the checkpoint's path. Already public:
    a 200 that changes nothing."""
    return _set_public(
        True, model_id=model_id, kind=kind, name=name, reads=reads, submitter=submitter,
        state=state, engine=engine, settings=settings, caller=caller,
    )  # fmt: skip


@router.delete("/training_runs/{model_id}/checkpoints/{kind}/{name}/publish")
def unpublish_checkpoint(
    model_id: ModelIdPath,
    kind: StoredKind,
    name: NamePath,
    reads: ReadDep,
    submitter: SubmitterDep,
    state: StateDep,
    engine: EngineDep,
    settings: SettingsDep,
    caller: TrainCaller,
) -> Response:
    """Private again: a run another workspace already started from it keeps what it loaded.
    Already private: a 200 that changes nothing."""
    return _set_public(
        False, model_id=model_id, kind=kind, name=name, reads=reads, submitter=submitter,
        state=state, engine=engine, settings=settings, caller=caller,
    )  # fmt: skip
