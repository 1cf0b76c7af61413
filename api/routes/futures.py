"""Futures: what became of a request, long-polled from the futures table.

Rule for ids without a result (documented in the OpenAPI description):
- sent by this API process within `request_retention_s` -> 200 `pending` when `wait` runs out;
- otherwise -> 404 "unknown request, resubmit": the result expired, was never produced (a worker
  restarted before answering), or the request never reached this API. Resubmitting with the same
  idempotency key is always safe: whoever already did the work dedupes it by that key.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import APIRouter, Query
from starlette.concurrency import run_in_threadpool

from api.auth import CallerDep
from api.deps import ApiSettingsDep, EngineDep, RequestIdPath, SettingsDep, StateDep
from api.errors import ErrorBody, not_found
from api.models import EventRefPublic, FuturePublic
from api.queries import ReadModels
from api.submit import command_id_for
from commands.envelope import CommandResult, category_of
from events.envelope import DEFAULT_WORKSPACE

router = APIRouter(prefix="/v1/loops/futures", tags=["futures"])

# Checking the in-memory feed is free: poll it every 1 ms for the first 100 ms (a fast call,
# such as an optimizer step on a small model, is answered within that), then every 20 ms.
FAST_POLL_S, FAST_PHASE_S, POLL_INTERVAL_S = 0.001, 0.1, 0.02


def _with_sequence_ids(result: CommandResult, request_id: str) -> dict[str, Any] | None:
    """A recorded sample's sequences carry their sequence_id (`<request id>:<index>`, the
    name a stable_reinforce datum gives them in loss_fn_input_spans)."""
    output = result.output
    if result.command_type != "Sample" or not output or not output.get("stability_recorded"):
        return output
    sequences = [
        {**sequence, "sequence_id": f"{request_id}:{i}"}
        for i, sequence in enumerate(output.get("sequences") or [])
    ]
    return {**output, "sequences": sequences}


def _from_feed(result: CommandResult, request_id: str) -> FuturePublic:
    return FuturePublic(
        request_id=request_id,
        status=result.status,
        request_type=result.command_type,
        result=_with_sequence_ids(result, request_id),
        reason=result.reason,
        field=result.field,
        category=result.category or category_of(result.status),
        events=[EventRefPublic.model_validate(e.model_dump()) for e in result.events],
    )


@router.get(
    "/{request_id}",
    responses={
        404: {
            "model": ErrorBody,
            "description": "unknown request, resubmit (same idempotency key)",
        }
    },
)
async def get_future(
    request_id: RequestIdPath,
    caller: CallerDep,
    settings: SettingsDep,
    api_settings: ApiSettingsDep,
    engine: EngineDep,
    state: StateDep,
    wait: float = Query(0.0, ge=0, le=60, description="seconds to wait for a result"),
) -> FuturePublic:
    """The request's status and result; waits up to `wait` seconds for one to arrive.

    `status`: pending | accepted | rejected | failed; `result` is what the worker computed;
    `reason` and `field` say why a request was rejected or failed. An id with no result answers
    `pending` if this API process sent it in the last `request_retention_s` seconds, and 404
    "unknown request, resubmit" otherwise (resubmitting under the same key is always safe).
    A request of another workspace is unknown here."""
    workspace = caller.workspace_id
    command_id = command_id_for(workspace, request_id)
    # The API's commands have ids within their workspace; a command an external producer sent
    # has the id it chose, looked up as given (its workspace is checked all the same).
    candidates = (command_id, request_id)

    def lookup() -> CommandResult | None:
        with engine.connect() as conn:
            reads = ReadModels(conn, settings.read_schema)
            for candidate in candidates:
                result = reads.command_result(candidate, workspace=workspace)
                if result is not None:
                    return result
        return None

    def awaits_record(result: CommandResult) -> bool:
        return result.command_type == "SaveWeights" and result.status == "accepted"

    def recorded(result: CommandResult) -> bool:
        with engine.connect() as conn:
            return ReadModels(conn, settings.read_schema).save_settled(result, workspace=workspace)

    started = time.monotonic()
    deadline = started + min(wait, api_settings.future_max_wait_s)
    next_table_check = started
    unrecorded = False  # an accepted save whose checkpoint is not in the read models yet
    while True:
        # The Kafka feed first (in memory, resolves as soon as the result is committed), then
        # the futures table (durable; everything this process did not see) every 20 ms.
        result = next(
            (
                fresh
                for fresh in map(state.results.get, candidates)
                if fresh is not None and (fresh.workspace_id or DEFAULT_WORKSPACE) == workspace
            ),
            None,
        )
        if result is not None and not awaits_record(result):
            return _from_feed(result, request_id)
        now = time.monotonic()
        if now >= next_table_check:
            if result is None:
                result = await run_in_threadpool(lookup)
            if result is not None:
                if not awaits_record(result) or await run_in_threadpool(recorded, result):
                    return _from_feed(result, request_id)
                unrecorded = True
            next_table_check = now + POLL_INTERVAL_S
        if now >= deadline:
            break
        interval = FAST_POLL_S if now - started < FAST_PHASE_S else POLL_INTERVAL_S
        await asyncio.sleep(min(interval, deadline - now))
    if unrecorded or state.sent.recently_sent(command_id, workspace=workspace):
        return FuturePublic(request_id=request_id, status="pending")
    raise not_found(
        f"unknown request {request_id}, resubmit: no result, and this API did not send it in "
        f"the last {api_settings.request_retention_s:.0f}s",
        field="request_id",
    )
