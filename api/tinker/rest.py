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
(create_training_client_from_state[_with_optimizer], load_state), read its
`get_weights_info_by_tinker_path`, sample it (api/tinker/routes.py, create_sampling_session), and
with `access_scope="accessible"` see it and the run holding it (read only, its published
checkpoints only). Everything else stays the owner's: `list_checkpoints` of the run, download
URLs, TTL, deletion, (un)publishing; another workspace gets a 404 there.
"""

from __future__ import annotations

import dataclasses
import re
import time
from datetime import UTC, date, datetime, timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query, Response
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import Engine

from api.auth import AdminCaller, Caller, CallerDep, TrainCaller, authenticate
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
from api.tinker.routes import _liveness, _lookup, _validated, run_of
from commands import tinker_sessions
from commands.loops import (
    Command,
    DeleteCheckpoint,
    PublishCheckpoint,
    SetCheckpointTtl,
    UnpublishCheckpoint,
)
from events.limits import MAX_PAGE_LIMIT, RequestKey, ShortText, UserMetadata
from gpu_workers.checkpoint_store import CheckpointRef, CheckpointStore
from infra.settings import Settings

router = APIRouter(prefix="/api/v1", tags=["tinker"], dependencies=[Depends(authenticate)])

# The SDK's delete, TTL and (un)publish resolve on the HTTP answer: answer once it is applied.
APPLY_WAIT_S = 30.0
CHECKPOINT_TYPES = {"weights": "training", "sampler_weights": "sampler"}
TinkerKind = Literal["weights", "sampler_weights", "external_weights"]
StoredKind = Literal["weights", "sampler_weights"]
# Tinker's access_scope: "owned" (the caller's workspace) or "accessible" (also what another
# workspace published; for sessions the same as owned: nothing of a session is published).
AccessScope = Literal["owned", "accessible"]
# A Tinker model id (`<session>:train:<n>`, or a loops run id) and a checkpoint name.
ModelIdPath = Annotated[RequestKey, Path(description="training run (model) id")]
NamePath = Annotated[ShortText, Path(description="checkpoint name")]


def _run(
    reads: ReadModels, model_id: str, caller: Caller, access_scope: AccessScope = "owned"
) -> Row:
    # Another workspace's run is as missing as one that never was; "accessible" adds the run
    # of a live published checkpoint (read only: its other checkpoints stay hidden).
    run = run_of(reads, ids.run_id_of(model_id), caller)
    if run is None and access_scope == "accessible":
        run = reads.shared_run(ids.run_id_of(model_id))
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
        "user_metadata": row.get("user_metadata"),
        "expires_at": row["expires_at"],
    }


def _training_run_public(reads: ReadModels, run: Row, caller: Caller) -> dict[str, Any]:
    checkpoints = reads.checkpoints_of_run(
        run["run_id"], workspace=run["workspace_id"], include_deleted=False
    )
    if run["workspace_id"] != caller.workspace_id:  # a shared run: its published ones only
        checkpoints = [row for row in checkpoints if row["public"]]
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
    access_scope: AccessScope = "owned",
) -> dict[str, Any]:
    """The workspace's runs, newest first; "accessible" adds every run holding a live
    published checkpoint of another workspace."""
    runs = reads.accessible_runs if access_scope == "accessible" else reads.runs
    rows, total = runs(workspace=caller.workspace_id, limit=limit, offset=offset)
    return {
        "training_runs": [_training_run_public(reads, r, caller) for r in rows],
        "cursor": {"offset": offset, "limit": limit, "total_count": total},
    }


@router.get("/training_runs/{model_id}")
def get_training_run(
    model_id: ModelIdPath, reads: ReadDep, caller: CallerDep, access_scope: AccessScope = "owned"
) -> dict[str, Any]:
    """Also the SDK's get_training_run_by_tinker_path. "accessible": also the run of a live
    published checkpoint of another workspace, showing its published checkpoints only."""
    return _training_run_public(reads, _run(reads, model_id, caller, access_scope), caller)


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
    access_scope: AccessScope = "owned",
) -> dict[str, Any]:
    """Every live checkpoint of the caller's workspace, across its runs, newest first;
    "accessible" (a query parameter the SDK 0.38 does not send here) adds every live published
    checkpoint of other workspaces."""
    listing = (
        reads.accessible_checkpoints
        if access_scope == "accessible"
        else reads.checkpoints_of_workspace
    )
    rows, total = listing(workspace=caller.workspace_id, limit=limit, offset=offset)
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


# --- sessions ------------------------------------------------------------------------------
# One row per Tinker session (commands/tinker_sessions.py). loopstream has no projects: the
# key's workspace owns everything, so it stands where Tinker names a project or an owner.
# `access_scope="accessible"` / `AccessibleSearchOwner` see the same as owned: the caller may
# read no other workspace's sessions (publishing shares checkpoints and their runs, above).


def _session(
    engine: Engine, settings: Settings, session_id: str, caller: Caller
) -> tinker_sessions.SessionInfo:
    info = _liveness(
        engine,
        settings,
        lambda c: tinker_sessions.session_info(c, settings, session_id, caller.workspace_id),
    )
    if info is None:  # never created, or another workspace's
        raise ApiError(404, f"session {session_id} not found", field="session_id")
    return info  # type: ignore[no-any-return]


@router.get("/sessions/{session_id}")
def get_session(
    session_id: RequestKey,
    engine: EngineDep,
    settings: SettingsDep,
    caller: CallerDep,
    access_scope: AccessScope = "owned",
) -> dict[str, Any]:
    """The session's training runs (model ids) and the sampling session ids handed out in it."""
    info = _session(engine, settings, session_id, caller)

    def members(c: Any) -> tuple[list[str], list[str]]:
        runs = tinker_sessions.training_runs_of(c, settings, session_id, caller.workspace_id)
        samplers = tinker_sessions.samplers_of(c, settings, session_id, caller.workspace_id)
        return [ids.model_id_of(r) for r in runs], samplers

    training_run_ids, sampler_ids = _liveness(engine, settings, members)
    return {
        "training_run_ids": training_run_ids,
        "sampler_ids": sampler_ids,
        "user_metadata": info.user_metadata,
        "display_name": info.display_name,
    }


@router.get("/sessions")
def list_sessions(
    engine: EngineDep,
    settings: SettingsDep,
    caller: CallerDep,
    limit: int = Query(20, ge=1, le=MAX_PAGE_LIMIT),
    offset: OffsetQuery = 0,
    access_scope: AccessScope = "owned",
) -> dict[str, Any]:
    """The caller's workspace's session ids, newest first (limit/offset, as the SDK pages)."""
    found = _liveness(
        engine,
        settings,
        lambda c: tinker_sessions.session_ids(
            c, settings, caller.workspace_id, limit=limit, offset=offset
        ),
    )
    return {"sessions": found}


class SessionSearch(BaseModel):
    """The SDK's `SessionSearchRequest` (sent with its None fields left out)."""

    model_config = ConfigDict(extra="forbid")

    session_id: RequestKey | None = None
    project_ids: list[RequestKey] | None = Field(default=None, max_length=MAX_PAGE_LIMIT)
    user_metadata: UserMetadata = {}
    display_name: Annotated[ShortText, Field(min_length=1)] | None = None
    owner: dict[str, Any] = {"type": "own"}
    statuses: list[dict[str, Any]] | None = Field(default=None, min_length=1, max_length=8)
    limit: int = Field(default=50, ge=1, le=200)
    cursor: dict[str, Any] | None = None


def _search_query(search: SessionSearch, caller: Caller) -> tinker_sessions.SessionQuery | None:
    """The filters for the workspace's sessions; None when nothing can match (a project or
    owner list without the caller's workspace)."""
    ws = caller.workspace_id
    if search.project_ids is not None:
        foreign = [p for p in search.project_ids if p != ws]
        if foreign:
            # Tinker: naming a project the caller cannot list is an error.
            raise ApiError(404, f"project {foreign[0]} not found", field="project_ids")
        if not search.project_ids:
            return None
    owner = search.owner.get("type")
    if owner == "user":
        urns = search.owner.get("owner_urns")
        if not isinstance(urns, list) or not 1 <= len(urns) <= 10:
            raise ApiError(400, "owner.owner_urns: 1 to 10 owners", field="owner.owner_urns")
        if ws not in urns:
            return None
    elif owner not in ("own", "accessible"):
        raise ApiError(400, "owner.type: own, accessible or user", field="owner.type")
    query = tinker_sessions.SessionQuery(
        workspace_id=ws,
        session_id=search.session_id,
        display_words=tuple((search.display_name or "").split()),
        user_metadata=search.user_metadata,
    )
    if search.statuses is None:
        return query
    active, finished = False, set[str]()
    for i, status in enumerate(search.statuses):
        kind = status.get("type")
        if kind == "active":
            active = True
        elif kind == "client_finished":
            reasons = status.get("reasons") or tinker_sessions.CLIENT_FINISH_STATUSES
            bad = [r for r in reasons if r not in tinker_sessions.CLIENT_FINISH_STATUSES]
            if bad:
                raise ApiError(
                    400, f"statuses.{i}.reasons: unknown reason {bad[0]!r}", field="statuses"
                )
            finished.update(reasons)
        elif kind not in ("cancelled", "failed"):  # never happen here: match nothing
            raise ApiError(400, f"statuses.{i}.type: unknown status {kind!r}", field="statuses")
    return dataclasses.replace(
        query, any_status=False, active=active, finish_statuses=tuple(sorted(finished))
    )


def _cursor(search: SessionSearch) -> tuple[datetime, str] | None:
    if search.cursor is None:
        return None
    try:
        at = datetime.fromisoformat(str(search.cursor["last_created_at"]))
        last = str(search.cursor["last_session_id"])
    except (KeyError, ValueError) as exc:
        raise ApiError(400, "cursor: pass a response's next_cursor back", field="cursor") from exc
    if at.tzinfo is None:
        raise ApiError(400, "cursor.last_created_at: needs a time zone", field="cursor")
    return at, last


def _summary(
    info: tinker_sessions.SessionInfo, *, now: datetime, timeout_s: float
) -> dict[str, Any]:
    return {
        "session_id": info.tinker_session_id,
        "created_at": info.created_at,
        "owner": info.workspace_id,
        "project_id": info.workspace_id,
        "status": tinker_sessions.status_of(info, now=now, timeout_s=timeout_s),
        "checkpoints_count": info.checkpoints_count,
        "display_name": info.display_name,
        "user_metadata": info.user_metadata,
        "checkpoint_storage_bytes": info.checkpoint_storage_bytes,
    }


@router.post("/sessions/search")
def search_sessions(
    body: dict[str, Any], engine: EngineDep, settings: SettingsDep, caller: CallerDep
) -> dict[str, Any]:
    """The caller's workspace's sessions matching every filter, newest first; `next_cursor`
    (the last one's created_at and id) until a page comes back short."""
    search = _validated(SessionSearch, **body)
    query = _search_query(search, caller)
    if query is None:
        return {"sessions": [], "next_cursor": None}
    timeout_s = settings.tinker_session_timeout_s
    page = _liveness(
        engine,
        settings,
        lambda c: tinker_sessions.search(
            c, settings, query, timeout_s=timeout_s, limit=search.limit + 1, after=_cursor(search)
        ),
    )
    now = datetime.now(UTC)
    more = len(page) > search.limit
    page = page[: search.limit]
    last = page[-1] if page else None
    return {
        "sessions": [_summary(info, now=now, timeout_s=timeout_s) for info in page],
        "next_cursor": (
            {"last_created_at": last.created_at, "last_session_id": last.tinker_session_id}
            if more and last is not None
            else None
        ),
    }


# --- checkpoint storage and the audit log ----------------------------------------------------

BYTES_PER_GIGABYTE = 10**9


@router.get("/billing/usage/checkpoints/current")
def current_checkpoint_storage_usage(
    reads: ReadDep, caller: CallerDep, project_id: RequestKey | None = None
) -> dict[str, Any]:
    """The workspace's live checkpoints, counted and summed now (no lag). No prices:
    loopstream bills nothing, so the rate and the cost are None."""
    if project_id is not None and project_id != caller.workspace_id:
        raise ApiError(404, f"project {project_id} not found", field="project_id")
    count, size = reads.checkpoint_storage(workspace=caller.workspace_id)
    return {
        "effective_rate_usd_per_gigabyte_month": None,
        "data": [
            {
                "project_id": caller.workspace_id,
                "checkpoint_count": count,
                "size_bytes": size,
                "size_gigabytes": size / BYTES_PER_GIGABYTE,
                "estimated_monthly_cost_usd": None,
            }
        ],
    }


# Tinker's audit event families, in loopstream's event log. Checkpoints: their lifecycle;
# organizations: the workspace and its API keys; projects and teams: loopstream has none.
AUDIT_EVENTS: dict[str, tuple[str, ...]] = {
    "checkpoints": (
        "CheckpointSaved", "CheckpointPromoted", "CheckpointTtlChanged", "CheckpointPublished",
        "CheckpointUnpublished", "CheckpointDeleted",
    ),
    "organizations": ("WorkspaceCreated", "ApiKeyCreated", "ApiKeyRevoked"),
    "projects": (),
    "teams": (),
}  # fmt: skip
AUDIT_EVENTS["all"] = tuple(t for types in AUDIT_EVENTS.values() for t in types)
# Payload fields left out of an entry: bulky (a checkpoint's file list) or of no use to a
# reader (a key's hash).
AUDIT_HIDDEN = frozenset({"files", "key_hash"})


def _snake(event_type: str) -> str:
    """`CheckpointTtlChanged` -> `checkpoint_ttl_changed` (Tinker's `<resource>_<action>`)."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", event_type).lower()


def _audit_entry(row: Row) -> dict[str, Any]:
    payload = {k: v for k, v in row["payload"].items() if k not in AUDIT_HIDDEN}
    details = {
        "actor": row["actor"],
        "aggregate_id": row["aggregate_id"],
        "event_id": row["event_id"],
        "command_id": row["command_id"],
        **payload,
    }
    entry: dict[str, Any] = {
        "timestamp": row["occurred_at"],
        "event": _snake(row["type"]),
        "event_details": details,
    }
    uri = payload.get("uri")
    if row["type"].startswith("Checkpoint") and isinstance(uri, str):
        path = ids.tinker_path(uri)
        details["tinker_path"] = path
        entry["tinker_path"] = path
        entry["model_id"] = ids.model_id_of(str(payload.get("run_id")))
    return entry


@router.get("/audit")
def audit_log(
    reads: ReadDep,
    caller: AdminCaller,
    event_type: Literal["all", "checkpoints", "projects", "teams", "organizations"] = "all",
    day: date | None = None,
) -> dict[str, Any]:
    """The workspace's audit events of one UTC day (default today) from the event log, in time
    order: who (`actor`, a key id), what, on which aggregate. The `admin` scope, as Tinker asks
    for an admin role."""
    start = datetime.combine(day or datetime.now(UTC).date(), datetime.min.time(), tzinfo=UTC)
    types = AUDIT_EVENTS[event_type]
    rows = reads.events_of_workspace(
        workspace=caller.workspace_id, types=types, since=start, until=start + timedelta(days=1)
    ) if types else []  # fmt: skip
    return {"entries": [_audit_entry(row) for row in rows]}
