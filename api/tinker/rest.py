"""The Tinker `RestClient` routes: training runs, their checkpoints, download URLs, deletion.

Reads come from the same read models as /v1/loops (runs, checkpoints); deletion is the same
`DeleteCheckpoint` command. Tinker names a checkpoint `<kind>/<name>` inside its training run
(`tinker://<model_id>/<kind>/<name>`); loopstream's checkpoint rows carry run, kind and name, so
the mapping is a lookup (api/tinker/ids.py maps model ids to runs).

Download: the SDK's only download call is `get_external_weights_urls`, one signed URL per file,
for `tinker://<model_id>/external_weights/<name>` paths (the SDK refuses other kinds before
sending). loopstream's sampler_weights checkpoint is its exportable form, so `external_weights`
names the sampler_weights checkpoint of that name; the same per-file presigned URLs as
`GET /v1/loops/checkpoints/{id}/files`. Over plain HTTP the route also serves `weights/<name>`
and `sampler_weights/<name>`.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query, Response

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
from api.routes._common import envelope
from api.tinker import ids
from api.tinker.routes import _lookup, run_of
from commands.loops import DeleteCheckpoint
from events.limits import RequestKey, ShortText
from gpu_workers.checkpoint_store import CheckpointRef, CheckpointStore

router = APIRouter(prefix="/api/v1", tags=["tinker"], dependencies=[Depends(authenticate)])

DELETE_WAIT_S = 30.0  # the SDK's delete resolves on the HTTP answer: answer once it is applied
CHECKPOINT_TYPES = {"weights": "training", "sampler_weights": "sampler"}
TinkerKind = Literal["weights", "sampler_weights", "external_weights"]
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
    run = _run(reads, ids.model_id_of(uri.removeprefix("bt://loops:").split("/")[0]), caller)
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


@router.delete("/training_runs/{model_id}/checkpoints/{kind}/{name}")
def delete_checkpoint(
    model_id: ModelIdPath,
    kind: Literal["weights", "sampler_weights"],
    name: NamePath,
    reads: ReadDep,
    submitter: SubmitterDep,
    state: StateDep,
    engine: EngineDep,
    settings: SettingsDep,
    caller: TrainCaller,
) -> Response:
    row = _checkpoint_row(reads, model_id, kind, name, caller)
    # One command per checkpoint: a retried delete is the same command.
    command_id = f"tinker:delete:{row['checkpoint_id']}"
    submitter.submit(
        envelope(
            request_id=command_id,
            command=DeleteCheckpoint(checkpoint_id=row["checkpoint_id"]),
            aggregate_id=row["session_id"],
            caller=caller,
        ),
        to="commands",
    )
    deadline = time.monotonic() + DELETE_WAIT_S
    while (result := _lookup(state, engine, settings, command_id, caller)) is None:
        if time.monotonic() > deadline:
            raise ApiError(503, f"delete of {row['checkpoint_id']} not applied in time")
        time.sleep(0.01)
    if result.status != "accepted":
        raise ApiError(400, result.reason or result.status, field="path")
    # ...and once the read models say so, so that a listing right after no longer shows it.
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            now = ReadModels(conn, settings.read_schema).checkpoint(
                row["checkpoint_id"], workspace=caller.workspace_id
            )
        if now is None or now["status"] != "active":
            break
        time.sleep(0.01)
    return Response(status_code=200, content=b"null", media_type="application/json")


@router.put("/training_runs/{model_id}/checkpoints/{kind}/{name}/ttl")
def set_checkpoint_ttl(
    model_id: ModelIdPath, kind: ShortText, name: NamePath, caller: TrainCaller
) -> Response:
    # A checkpoint's expiry is fixed when it is recorded (ttl_seconds of save_state /
    # save_weights_for_sampler); changing it later needs an event loopstream does not have yet.
    raise ApiError(
        400,
        "changing a checkpoint's TTL is not served by loopstream: pass ttl_seconds when saving",
        field="ttl_seconds",
    )
