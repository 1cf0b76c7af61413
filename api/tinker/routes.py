"""The Tinker wire protocol (`/api/v1/...`), so the official `tinker` SDK runs unchanged.

Another shape over the same commands as /v1/loops: create_model is CreateSession + CreateRun on
a loops session, forward_backward the same ForwardBackward work request, futures the same
CommandResults (Kafka result feed first, then the futures table). Only the encodings differ
(api/tinker/wire.py) and the ids (api/tinker/ids.py).

Errors: what this API can judge at once (unknown model, unknown loss, a sequence longer than the
run's max_seq_len, a bad path) is a 400 whose body carries the message, raised by the SDK as its
`BadRequestError`; what a worker refuses arrives in the future as `RequestFailedResponse`
(category `user` for a rejection, `server` for a worker failure), raised as `RequestFailedError`.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError
from starlette.concurrency import run_in_threadpool

from api.auth import Caller, CallerDep, InferCaller, TrainCaller, authenticate
from api.deps import EngineDep, ReadDep, SettingsDep, StateDep, SubmitterDep
from api.errors import ApiError
from api.queries import ReadModels, Row
from api.recorded import RecordError, table_lookup, with_recorded_logprobs
from api.routes._common import envelope, source_run
from api.submit import Submitter, derived_resource_id, new_resource_id
from api.tinker import ids
from api.tinker.wire import (
    WireError,
    decode_forward_backward,
    encode_forward_backward_output,
    encode_sample_response,
    id_matrix_from_json,
    model_input_from_json,
)
from commands import tinker_sessions
from commands.envelope import DEFAULT_WORKSPACE, CommandResult, category_of
from commands.loops import CreateRun, CreateSession, checkpoint_uri
from commands.work import (
    RECORDED_LOSSES,
    AdamParams,
    Forward,
    ForwardBackward,
    LoadState,
    OptimStep,
    Sample,
    SaveWeights,
)
from events.limits import MAX_TEXT_LENGTH, ShortText, UserMetadata
from gpu_workers.models import UnknownBaseModel, available_base_models, resolve_base_model
from infra.settings import Settings

PROTO = "application/x-protobuf"
DEFAULT_MAX_SEQ_LEN = 2048  # a Tinker training client names no context length; capped by the model
# How long one retrieve_future waits for a result before answering try_again (the SDK's own
# request timeout is 45 s).
LONG_POLL_S = 20.0
SEQ_GATE_WAIT_S = 30.0  # how long a request waits for the seq_ids before it to be sent
# The future of create_training_client_from_state (weights only): the id of the LoadState that
# follows the CreateRun, `tinker:<model_id>:create_run` + this.
WEIGHTS_ONLY = ":load_weights_only"


def bad_request(detail: str, field: str | None = None) -> ApiError:
    return ApiError(400, detail, field=field)


_REQUIRED: Any = object()


def _field(
    data: dict[str, Any], name: str, kind: Callable[[Any], Any], default: Any = _REQUIRED
) -> Any:
    """One field of a free-form Tinker body converted with `kind`, or a 400 naming it: the SDK's
    bodies are not modelled field by field, and a missing or mistyped one is the caller's error."""
    value = data.get(name)
    if value is None:
        if default is _REQUIRED:
            raise bad_request(f"{name}: field required", name)
        return default
    if kind in (int, float) and isinstance(value, bool | str):
        raise bad_request(f"{name}: expected a number, got {type(value).__name__}", name)
    try:
        return kind(value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise bad_request(f"{name}: {exc}", name) from exc


def _flag(data: dict[str, Any], name: str) -> bool:
    """A boolean field (absent or null: false); "false", 5 or [] is the caller's error, not a
    silent true."""
    value = data.get(name)
    if value is not None and not isinstance(value, bool):
        raise bad_request(f"{name}: expected a boolean, got {type(value).__name__}", name)
    return bool(value)


def _seq_id(data: dict[str, Any]) -> int | None:
    """The client's call number: it orders the calls of one client (see SeqGate)."""
    seq_id = _field(data, "seq_id", int, None)
    if seq_id is not None and not 0 <= seq_id < 2**63:
        raise bad_request("seq_id: must be between 0 and 2**63 - 1", "seq_id")
    return seq_id


def _object(data: dict[str, Any], name: str) -> dict[str, Any]:
    value = data.get(name) or {}
    if not isinstance(value, dict):
        raise bad_request(f"{name}: expected an object, got {type(value).__name__}", name)
    return value


# Every route authenticates: the SDK sends its key as X-API-Key (it refuses keys that do not
# start with `tml-`, which loopstream's keys do). A key loopstream did not issue, or revoked, is a
# 401, which the SDK raises as its AuthenticationError. Training routes need the `train` scope,
# sampling routes `infer`; who calls is the actor of every command sent.
router = APIRouter(prefix="/api/v1", tags=["tinker"], dependencies=[Depends(authenticate)])


def workspace_of(row: Row | CommandResult) -> str:
    """The workspace a read-model row or a result belongs to (null: written before tenancy)."""
    value = row.workspace_id if isinstance(row, CommandResult) else row.get("workspace_id")
    return value or DEFAULT_WORKSPACE


def owned(row: Row | None, caller: Caller) -> Row | None:
    """The row if the caller's workspace holds it; another workspace's is as if missing (its
    existence is not disclosed)."""
    return row if row is not None and workspace_of(row) == caller.workspace_id else None


def run_of(reads: ReadModels, run_id: str, caller: Caller) -> Row | None:
    """A run of the caller's workspace (the read models answer another's as missing)."""
    return reads.run(run_id, workspace=caller.workspace_id)


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")


# ------------------------------------------------------------------ seq_id ordering


class SeqGate:
    """Sends each client's requests to Kafka in seq_id order, from what is durable.

    One run is one partition and the trainer runs a partition in order, so the order of sends is
    the order of execution. The SDK posts a client's requests one at a time (each waits for the
    previous post's answer, retries included), so in-order arrival is the rule; a concurrent or
    raw client, or two API processes, could still overtake. seq_id N therefore goes out only once
    N-1 is known to be on its way:
    - sent or refused at the door by this process (memory: the fast path), or
    - answered: its CommandResult is in the result feed or the futures table. The worker that ran
      it wrote that to the log, so a restarted API, or another API process, sees it too.
    seq_id 1 has no predecessor (the SDK numbers a client's requests from 1). A request whose
    predecessor is still unknown after SEQ_GATE_WAIT_S is answered 503 ("retry"), which the SDK
    retries, instead of being sent out of order.
    """

    def __init__(self) -> None:
        self._done: dict[str, int] = {}  # client -> highest seq_id sent or refused here
        self._cond = threading.Condition()

    def passed(self, client: str, seq_id: int | None) -> None:
        """seq_id is settled (sent, or refused before sending): its successor may go."""
        if seq_id is None:
            return
        with self._cond:
            self._done[client] = max(self._done.get(client, 0), seq_id)
            self._cond.notify_all()

    def send_in_order(
        self,
        client: str,
        seq_id: int | None,
        send: Callable[[], object],
        *,
        answered: Callable[[str], bool],
    ) -> None:
        """`answered(command_id)`: whether the log holds a result for that command."""
        if seq_id is not None and seq_id > 1:
            self._wait_for(client, seq_id, answered)
        send()
        self.passed(client, seq_id)

    def _wait_for(self, client: str, seq_id: int, answered: Callable[[str], bool]) -> None:
        before = _command_id(client, seq_id - 1)
        deadline = time.monotonic() + SEQ_GATE_WAIT_S
        while True:
            with self._cond:
                if self._done.get(client, 0) >= seq_id - 1:
                    return
            if answered(before):
                self.passed(client, seq_id - 1)
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise ApiError(
                    503,
                    f"seq_id {seq_id} of {client} waits for seq_id {seq_id - 1}, which has not "
                    f"arrived in {SEQ_GATE_WAIT_S:.0f}s; retry (sending it now could run it "
                    "before its predecessor)",
                    field="seq_id",
                )
            with self._cond:  # woken by a send here; results of other processes are polled
                self._cond.wait(timeout=min(0.05, left))


_GATE = SeqGate()


def _command_id(client: str, seq_id: int | None) -> str:
    # Derived from (client, seq_id): a retried post of the same call is the same command.
    return f"tinker:{client}:{seq_id}" if seq_id is not None else f"tinker:{new_resource_id(16)}"


def _future(request_id: str, model_id: str | None = None) -> dict[str, Any]:
    return {"request_id": request_id, "model_id": model_id}


def _validated(model: type[BaseModel], **values: Any) -> Any:
    try:
        return model(**values)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"])
        raise bad_request(f"{where + ': ' if where else ''}{error['msg']}", where or None) from exc


# ------------------------------------------------------------------ service


@router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.post("/client/config")
def client_config() -> dict[str, Any]:
    # Plain API keys, httpx transport, uncompressed protobuf; no server-side custom losses.
    return {
        "pjwt_auth_enabled": False,
        "credential_default_source": "api_key",
        "use_pyqwest_transport": False,
        "proto_compress_fwdbwd": False,
        "parallel_fwdbwd_chunks": False,
        "sample_use_retrieve_futures": False,
        "custom_loss_server_side": False,
        "sample_join_sampling_session": False,
    }


@router.post("/client/dynamic_config")
def client_dynamic_config() -> dict[str, Any]:
    return {"refresh_interval_sec": 300, "sample_cancel_enabled": False}


@router.get("/get_server_capabilities")
def get_server_capabilities(settings: SettingsDep) -> dict[str, Any]:
    return {
        "supported_models": [
            {"model_name": name, "trainable": True, "sampleable": True}
            for name in available_base_models(settings)
        ]
    }


def _liveness(engine: Any, settings: Settings, action: Callable[[Any], Any]) -> Any:
    """Run `action(psycopg connection)` on the Tinker sessions' liveness rows, committed."""
    with engine.begin() as conn:
        raw = conn.connection.driver_connection
        tinker_sessions.ensure_table(raw, settings)  # once per process
        return action(raw)


def _refuse_foreign_session(raw: Any, settings: Settings, session_id: str, caller: Caller) -> None:
    """A Tinker session another workspace created, or nobody did, is not found here: its
    models, heartbeats and finish are that workspace's (a model made in it would be ended with
    it), and a made-up id would leave rows behind."""
    if tinker_sessions.owner_of(raw, settings, session_id) != caller.workspace_id:
        raise ApiError(404, f"session {session_id} not found", field="session_id")


def _check_session(engine: Any, settings: Settings, session_id: str, caller: Caller) -> str:
    _liveness(engine, settings, lambda c: _refuse_foreign_session(c, settings, session_id, caller))
    return session_id


class _DisplayName(BaseModel):
    display_name: ShortText | None = None


@router.post("/create_session")
def create_session(
    body: _Body, engine: EngineDep, settings: SettingsDep, caller: CallerDep
) -> dict[str, Any]:
    """A Tinker session groups the client's models and samplers (each model gets a loops
    session of its own, see api/tinker/ids.py); its liveness row starts its heartbeat clock and
    names the caller's workspace, which alone may use it. Its `user_metadata` (flat strings,
    as a run's) and `display_name` come back in get_session and search_sessions."""
    data = body.model_dump()
    user_metadata = _user_metadata(data)
    display_name = _validated(_DisplayName, display_name=data.get("display_name")).display_name
    session_id = new_resource_id(10)
    _liveness(
        engine,
        settings,
        lambda c: tinker_sessions.start(
            c,
            settings,
            session_id,
            caller.workspace_id,
            user_metadata=user_metadata,
            display_name=display_name,
        ),
    )
    return {"type": "create_session", "session_id": session_id}


@router.post("/session_heartbeat")
def session_heartbeat(
    body: _Body, engine: EngineDep, settings: SettingsDep, caller: CallerDep
) -> dict[str, Any]:
    session_id = str(body.model_dump().get("session_id") or "")
    if not session_id:
        raise bad_request("session_id is required", "session_id")

    alive = _liveness(
        engine,
        settings,
        lambda raw: tinker_sessions.heartbeat(raw, settings, session_id, caller.workspace_id),
    )
    if alive is None:  # never created, or another workspace's
        raise ApiError(404, f"session {session_id} not found", field="session_id")
    if not alive:  # the SDK stops its heartbeat loop on a 410
        raise ApiError(410, f"session {session_id} has finished", field="session_id")
    return {"type": "session_heartbeat"}


@router.post("/sessions/{session_id}/finish")
def finish_session(
    session_id: str,
    body: _Body,
    engine: EngineDep,
    settings: SettingsDep,
    submitter: SubmitterDep,
    caller: CallerDep,
) -> Response:
    """Ends the loops sessions of the Tinker session's models (their runs stop, the workers
    release the engines). Those the read models do not show yet are ended by the janitor, which
    sees the finished row (commands/tinker_sessions.py): same command ids, so never twice."""
    reason = "tinker session finished"
    # close(status, detail): kept for search_sessions' `client_finished` status.
    data = body.model_dump()
    said = data.get("reason")
    status = said.get("type") if isinstance(said, dict) else None
    if status not in tinker_sessions.CLIENT_FINISH_STATUSES:
        status = None
    detail = data.get("detail")
    detail = detail.replace("\x00", "")[:MAX_TEXT_LENGTH] if isinstance(detail, str) else None

    def finish(raw: Any) -> None:
        _refuse_foreign_session(raw, settings, session_id, caller)
        tinker_sessions.finish(
            raw, settings, session_id, reason, caller.workspace_id, status=status, detail=detail
        )

    _liveness(engine, settings, finish)
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(
            f"select session_id, name from {settings.read_schema}.sessions "
            "where status = 'active' and workspace_id = %(ws)s and name like 'tinker %%' "
            "and session_id like %(prefix)s",
            {
                "ws": caller.workspace_id,
                "prefix": session_id.replace("%", "").replace("_", "") + "-%",
            },
        ).fetchall()
    for loops_session_id, name in rows:
        if tinker_sessions.tinker_session_of(name.removeprefix(tinker_sessions.NAME_PREFIX)) == (
            session_id
        ):
            command = tinker_sessions.end_session(loops_session_id, reason, caller.workspace_id)
            submitter.submit(command.model_copy(update={"actor": caller.key_id}), to="commands")
    return Response(status_code=200, content=b"null", media_type="application/json")


@router.post("/telemetry")
def telemetry(body: _Body) -> dict[str, Any]:
    return {"status": "accepted"}


# ------------------------------------------------------------------ models

_USER_METADATA: TypeAdapter[dict[str, str] | None] = TypeAdapter(UserMetadata | None)


def _user_metadata(data: dict[str, Any]) -> dict[str, str] | None:
    """The user_metadata of a run (create_model, create-from-state) or a checkpoint (saves): a
    flat object of strings of bounded sizes (events/limits.py), or a 400 naming the key."""
    try:
        return _USER_METADATA.validate_python(data.get("user_metadata"))
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(p) for p in ("user_metadata", *error["loc"]))
        raise bad_request(f"{where}: {error['msg']}", where) from exc


def _check_model(settings: Settings, base_model: str) -> None:
    try:
        resolve_base_model(settings, base_model)
    except UnknownBaseModel as exc:
        raise bad_request(str(exc), "base_model") from exc


def _create_run(
    *,
    caller: Caller,
    submitter: Submitter,
    model_id: str,
    base_model: str,
    lora_rank: int,
    from_checkpoint: str | None,
    max_seq_len: int,
    user_metadata: dict[str, str] | None = None,
) -> str:
    """CreateSession + CreateRun on the model's own loops session, in that order on its
    partition; the future is the CreateRun's. The run is checked first (a bad user_metadata is
    a 400 naming its key), so nothing is sent for a request refused."""
    run = _validated(
        CreateRun,
        run_id=ids.run_id_of(model_id),
        sampler_id=ids.sampler_id_of(model_id),
        max_seq_len=max_seq_len,
        lora_rank=lora_rank,
        from_checkpoint=from_checkpoint,
        user_metadata=user_metadata,
    )
    session_id = ids.run_id_of(model_id).replace("-train-", "-s-")
    create_session_id = f"tinker:{model_id}:create_session"
    create_run_id = f"tinker:{model_id}:create_run"
    submitter.submit(
        envelope(
            request_id=create_session_id,
            command=CreateSession(
                base_model=base_model, name=f"{tinker_sessions.NAME_PREFIX}{model_id}"
            ),
            aggregate_id=session_id,
            caller=caller,
        ),
        to="commands",
    )
    submitter.submit(
        envelope(request_id=create_run_id, command=run, aggregate_id=session_id, caller=caller),
        to="commands",
    )
    return create_run_id


def _max_seq_len(settings: Settings, base_model: str) -> int:
    config = json.loads((resolve_base_model(settings, base_model) / "config.json").read_text())
    return int(min(DEFAULT_MAX_SEQ_LEN, config.get("max_position_embeddings") or 2048))


@router.post("/create_model")
def create_model(
    body: _Body,
    settings: SettingsDep,
    engine: EngineDep,
    submitter: SubmitterDep,
    caller: TrainCaller,
) -> dict[str, Any]:
    data = body.model_dump()
    base_model = str(data.get("base_model") or "")
    _check_model(settings, base_model)
    # The body first (400 naming the field), then whether its session exists (404).
    session_id, seq_id = _field(data, "session_id", str), _field(data, "model_seq_id", int)
    lora = _object(data, "lora_config")
    lora_rank = _field(lora, "rank", int, 0)
    user_metadata = _user_metadata(data)
    model_id = ids.model_id_for(_check_session(engine, settings, session_id, caller), seq_id)
    request_id = _create_run(
        caller=caller,
        submitter=submitter,
        model_id=model_id,
        base_model=base_model,
        lora_rank=lora_rank,
        from_checkpoint=None,
        max_seq_len=_max_seq_len(settings, base_model),
        user_metadata=user_metadata,
    )
    return _future(request_id, model_id)


def _run_row(reads: ReadModels, model_id: str, caller: Caller) -> Row:
    run = run_of(reads, ids.run_id_of(model_id), caller)
    if run is None:
        raise ApiError(404, f"model {model_id} not found", field="model_id")
    if run["status"] != "active":
        raise bad_request(f"model {model_id} is stopped ({run['stop_reason']})", "model_id")
    return run


@router.post("/get_info")
def get_info(
    body: _Body, reads: ReadDep, settings: SettingsDep, caller: CallerDep
) -> dict[str, Any]:
    model_id = str(body.model_dump().get("model_id"))
    run = _run_row(reads, model_id, caller)
    folder = resolve_base_model(settings, run["base_model"])
    return {
        "type": "get_info",
        "model_id": model_id,
        "model_name": run["base_model"],
        # A local folder: the SDK's get_tokenizer loads it with AutoTokenizer, no hub needed.
        "model_data": {
            "arch": "llama",
            "model_name": run["base_model"],
            "tokenizer_id": str(folder),
        },
        "is_lora": run["lora_rank"] > 0,
        "lora_rank": run["lora_rank"] or None,
    }


# ------------------------------------------------------------------ training


@contextmanager
def _seq_door(model_id: str, seq_id: int | None) -> Iterator[None]:
    """A training call refused here (400/404) never reaches Kafka: its seq_id is settled all
    the same, so the client's next call does not wait for it."""
    try:
        yield
    except ApiError:
        _GATE.passed(model_id, seq_id)
        raise


def _submit_training(
    *, caller: Caller, submitter: Submitter, model_id: str, seq_id: int | None, request: Any
) -> dict[str, Any]:
    command_id = _command_id(model_id, seq_id)
    command = envelope(
        request_id=command_id,
        command=request,
        aggregate_id=ids.run_id_of(model_id),
        caller=caller,
    )
    _GATE.send_in_order(
        model_id,
        seq_id,
        lambda: submitter.submit(command, to="trainer-requests"),
        answered=lambda request_id: (
            submitter.reads.command_result(request_id, workspace=caller.workspace_id) is not None
        ),
    )
    return _future(command_id, model_id)


def _recorded(work: ForwardBackward, state: Any, reads: ReadModels, caller: Caller) -> Any:
    """stable_reinforce's logprobs from the sampler's record (api/recorded.py): this API's
    result feed first, then the futures table."""
    table = table_lookup(reads, caller.workspace_id, lambda request_id: request_id)

    def lookup(request_id: str) -> dict[str, Any] | None:
        fresh: CommandResult | None = state.results.get(request_id)
        if (
            fresh is not None
            and workspace_of(fresh) == caller.workspace_id
            and fresh.command_type == "Sample"
            and fresh.status == "accepted"
        ):
            return fresh.output
        return table(request_id)

    try:
        return with_recorded_logprobs(work, lookup)
    except RecordError as exc:
        raise bad_request(str(exc), exc.field) from exc


@router.post("/forward_backward")
async def forward_backward(
    request: Request, state: StateDep, reads: ReadDep, submitter: SubmitterDep, caller: TrainCaller
) -> Any:
    try:
        call = decode_forward_backward(await request.body())
    except WireError as exc:
        raise bad_request(str(exc), exc.field) from exc
    with _seq_door(call.model_id, call.seq_id):
        run = _run_row(reads, call.model_id, caller)
        for i, datum in enumerate(call.data):
            n = len(datum["model_input"])
            if n > run["max_seq_len"]:
                raise bad_request(
                    f"data.{i}.model_input: sequence of {n} tokens exceeds max_seq_len "
                    f"{run['max_seq_len']}",
                    f"data.{i}.model_input",
                )
            if call.loss_fn == "cross_entropy" and "weights" not in datum["loss_fn_inputs"]:
                datum["loss_fn_inputs"]["weights"] = [1.0] * n  # Tinker's default: every target
        if call.loss_fn == "custom":
            raise bad_request(
                "loss_fn: custom losses run in the SDK (forward_backward_custom computes them "
                "on forward logprobs and sends cross_entropy with their gradients as weights); "
                "this server takes no uploaded losses (client config "
                "custom_loss_server_side=false)",
                "loss_fn",
            )
        kind = Forward if call.forward_only else ForwardBackward
        work = _validated(
            kind, data=call.data, loss_fn=call.loss_fn, loss_fn_config=call.loss_fn_config
        )
        if work.loss_fn in RECORDED_LOSSES:
            work = await run_in_threadpool(_recorded, work, state, reads, caller)
    return await run_in_threadpool(
        _submit_training,
        caller=caller,
        submitter=submitter,
        model_id=call.model_id,
        seq_id=call.seq_id,
        request=work,
    )


@router.post("/optim_step")
def optim_step(
    body: _Body, reads: ReadDep, submitter: SubmitterDep, caller: TrainCaller
) -> dict[str, Any]:
    data = body.model_dump()
    with _seq_door(str(data.get("model_id")), _seq_id(data)):
        _run_row(reads, str(data.get("model_id")), caller)
        params = data.get("adam_params")
        if params is None:
            raise bad_request("only the adamw optimizer is served (adam_params)", "optim_params")
        work = OptimStep(adam_params=_validated(AdamParams, **params))
    return _submit_training(
        caller=caller,
        submitter=submitter,
        model_id=_field(data, "model_id", str),
        seq_id=_seq_id(data),
        request=work,
    )


def _save_name(data: dict[str, Any], seq_id: int | None) -> str:
    # save_weights_and_get_sampling_client names no checkpoint: one per call, ephemeral.
    return str(data.get("path") or f"ephemeral-{seq_id}-{new_resource_id(6)}")


def _save(
    body: _Body,
    reads: ReadModels,
    submitter: Submitter,
    kind: Literal["weights", "sampler_weights"],
    caller: Caller,
    name: str | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """A SaveWeights of `kind` (and `fields`), in the client's seq_id order; `name`: the
    checkpoint's, when the caller chose it (else the request's path, or an ephemeral one)."""
    data = body.model_dump()
    with _seq_door(str(data.get("model_id")), _seq_id(data)):
        if data.get("age_encryption_recipients"):
            raise bad_request(
                "age_encryption_recipients: not served; exports are stored unencrypted in your "
                "own S3 store (encrypt at rest there, or download and `age -e` them)",
                "age_encryption_recipients",
            )
        _run_row(reads, str(data.get("model_id")), caller)
        work = _validated(
            SaveWeights,
            name=name or _save_name(data, _seq_id(data)),
            kind=kind,
            ttl_seconds=data.get("ttl_seconds"),
            user_metadata=_user_metadata(data),
            **fields,
        )
    return _submit_training(
        caller=caller,
        submitter=submitter,
        model_id=_field(data, "model_id", str),
        seq_id=_seq_id(data),
        request=work,
    )


@router.post("/save_weights")
def save_weights(
    body: _Body, reads: ReadDep, submitter: SubmitterDep, caller: TrainCaller
) -> dict[str, Any]:
    return _save(body, reads, submitter, "weights", caller)


@router.post("/save_weights_for_sampler")
def save_weights_for_sampler(
    body: _Body,
    reads: ReadDep,
    submitter: SubmitterDep,
    engine: EngineDep,
    settings: SettingsDep,
    caller: TrainCaller,
) -> dict[str, Any]:
    data = body.model_dump()
    if data.get("path"):
        return _save(body, reads, submitter, "sampler_weights", caller)
    # save_weights_and_get_sampling_client: its future answers a sampling session derived from
    # the command (_tinker_response); list it under the model's Tinker session now.
    name = _save_name(data, _seq_id(data))
    future = _save(body, reads, submitter, "sampler_weights", caller, name=name)
    model_id = str(data.get("model_id"))
    session_id = tinker_sessions.tinker_session_of(model_id)
    if session_id is not None:
        run_id = ids.run_id_of(model_id)
        nonce = derived_resource_id(future["request_id"], "sampling_session", 6)
        uri = checkpoint_uri(run_id, "sampler_weights", name)
        sampling_id = ids.SamplingSession(run_id, uri, nonce).id
        _record_sampler(engine, settings, session_id, sampling_id, caller)
    return future


@router.post("/save_weights_external")
def save_weights_external(
    body: _Body, reads: ReadDep, submitter: SubmitterDep, caller: TrainCaller
) -> dict[str, Any]:
    """An export in Hugging Face format: a full (base) sampler-weights folder, not synced to the
    sampler, listed and deleted like any checkpoint; its files are downloaded through
    `get_external_weights_urls` (`tinker://<model>/external_weights/<name>`)."""
    return _save(
        body, reads, submitter, "sampler_weights", caller,
        checkpoint_type="base", hotload=None, export=True,
    )  # fmt: skip


@router.post("/load_weights")
def load_weights(
    body: _Body,
    reads: ReadDep,
    settings: SettingsDep,
    engine: EngineDep,
    submitter: SubmitterDep,
    caller: TrainCaller,
) -> dict[str, Any]:
    data = body.model_dump()
    try:
        uri = ids.bt_uri(str(data.get("path")))
    except ValueError as exc:
        raise bad_request(str(exc), "path") from exc
    optimizer = bool(data.get("optimizer"))
    if data.get("model_id"):  # load_state on an existing training client
        with _seq_door(str(data["model_id"]), _seq_id(data)):
            _run_row(reads, str(data["model_id"]), caller)
            if source_run(reads, uri, caller) is None:
                raise bad_request(f"no run holds {data.get('path')}", "path")
            work = _validated(LoadState, checkpoint_uri=uri, optimizer=optimizer)
        return _submit_training(
            caller=caller,
            submitter=submitter,
            model_id=_field(data, "model_id", str),
            seq_id=_seq_id(data),
            request=work,
        )
    # create_training_client_from_state[_with_optimizer]: a new run started from the checkpoint.
    # From a checkpoint of the caller's workspace, or a published one of any workspace.
    source = source_run(reads, uri, caller)
    if source is None:
        raise bad_request(f"no run holds {data.get('path')}", "path")
    base_model = str(data.get("base_model") or source["base_model"])
    _check_model(settings, base_model)
    session_id, seq_id = _field(data, "session_id", str), _field(data, "model_seq_id", int)
    user_metadata = _user_metadata(data)
    model_id = ids.model_id_for(_check_session(engine, settings, session_id, caller), seq_id)
    request_id = _create_run(
        caller=caller,
        submitter=submitter,
        model_id=model_id,
        base_model=base_model,
        lora_rank=source["lora_rank"],
        from_checkpoint=uri,
        max_seq_len=source["max_seq_len"],
        user_metadata=user_metadata,
    )
    if not optimizer:
        # Weights only: once the run exists, a LoadState(optimizer=False) of its start
        # checkpoint follows. The future handed out is that LoadState's id, derived from the
        # CreateRun's: whichever API process polls it (restarted or not) reads the rest from the
        # log and the read models (_resolve_weights_only); nothing waits in memory.
        return _future(request_id + WEIGHTS_ONLY, model_id)
    return _future(request_id, model_id)


# ------------------------------------------------------------------ sampling


def _sampler_of(reads: ReadModels, run: Row) -> str:
    if ids.model_id_of(run["run_id"]) != run["run_id"]:
        return ids.sampler_id_of(ids.model_id_of(run["run_id"]))
    for sampler in reads.samplers_of_session(run["session_id"], workspace=workspace_of(run)):
        if sampler["run_id"] == run["run_id"]:
            return str(sampler["sampler_id"])
    raise bad_request(f"run {run['run_id']} has no sampler", "model_path")


def _wait_visible(
    engine: Any, settings: Settings, run_id: str, caller: Caller, timeout_s: float = 30.0
) -> Row:
    """A run created a moment ago reaches the read models through the projection."""
    deadline = time.monotonic() + timeout_s
    while True:
        with engine.connect() as conn:
            run = run_of(ReadModels(conn, settings.read_schema), run_id, caller)
        if run is not None or time.monotonic() > deadline:
            if run is None:
                raise ApiError(503, f"run {run_id} did not appear in {timeout_s:.0f}s")
            return run
        time.sleep(0.01)


def _record_sampler(
    engine: Any, settings: Settings, session_id: str, sampling_session_id: str, caller: Caller
) -> None:
    """List the sampling session under its Tinker session (get_session's `sampler_ids`); a
    session of another workspace, or none, is a 404 as for a model made in it."""

    def record(raw: Any) -> None:
        _refuse_foreign_session(raw, settings, session_id, caller)
        tinker_sessions.record_sampler(
            raw,
            settings,
            tinker_session_id=session_id,
            sampling_session_id=sampling_session_id,
            workspace_id=caller.workspace_id,
        )

    _liveness(engine, settings, record)


@router.post("/create_sampling_session")
def create_sampling_session(
    body: _Body,
    reads: ReadDep,
    settings: SettingsDep,
    engine: EngineDep,
    submitter: SubmitterDep,
    caller: InferCaller,
) -> dict[str, Any]:
    data = body.model_dump()
    nonce = new_resource_id(6)
    if data.get("model_path"):
        try:
            uri = ids.bt_uri(str(data["model_path"]))
        except ValueError as exc:
            raise bad_request(str(exc), "model_path") from exc
        if "/sampler_weights/" not in uri:
            raise bad_request("sampling needs a sampler_weights checkpoint", "model_path")
        run_id = uri.removeprefix("bt://loops:").split("/")[0]
        if run_of(reads, run_id, caller) is None:
            # Another workspace's checkpoint: only a live published one, served by a sampler of
            # the caller's own (the sampler worker checks it again when it loads it).
            published = reads.published_checkpoint(uri)
            source = None
            if published is not None:
                source = reads.run(published["run_id"], workspace=workspace_of(published))
            if source is None:
                raise bad_request(f"no run holds {data['model_path']}", "model_path")
            run_id = _sampler_run(
                data, engine, settings, submitter, caller,
                base_model=source["base_model"], max_seq_len=source["max_seq_len"],
            )  # fmt: skip
            sampling_id = ids.SamplingSession(run_id, uri, nonce).id
            _record_sampler(engine, settings, _field(data, "session_id", str), sampling_id, caller)
            return {"type": "create_sampling_session", "sampling_session_id": sampling_id}
        sampling_id = ids.SamplingSession(run_id, uri, nonce).id
        if data.get("session_id"):  # the SDK always names its session; by hand it may not
            _record_sampler(engine, settings, str(data["session_id"]), sampling_id, caller)
        return {"type": "create_sampling_session", "sampling_session_id": sampling_id}
    base_model = str(data.get("base_model") or "")
    _check_model(settings, base_model)
    # Sampling a bare base model: a run of its own whose sampler serves the base weights.
    run_id = _sampler_run(
        data, engine, settings, submitter, caller,
        base_model=base_model, max_seq_len=_max_seq_len(settings, base_model),
    )  # fmt: skip
    sampling_id = ids.SamplingSession(run_id, None, nonce).id
    _record_sampler(engine, settings, _field(data, "session_id", str), sampling_id, caller)
    return {"type": "create_sampling_session", "sampling_session_id": sampling_id}


def _sampler_run(
    data: dict[str, Any],
    engine: Any,
    settings: Settings,
    submitter: Submitter,
    caller: Caller,
    *,
    base_model: str,
    max_seq_len: int,
) -> str:
    """A run of the caller's own, on `base_model`, made for one sampling session (its Tinker
    session's `sampling_session_seq_id`): its sampler serves the base weights, or the
    checkpoint each request pins. Returns the run id once the read models show it."""
    _check_model(settings, base_model)
    session = _check_session(engine, settings, _field(data, "session_id", str), caller)
    model_id = ids.model_id_for(f"{session}-smp{_field(data, 'sampling_session_seq_id', int)}", 0)
    _create_run(
        caller=caller,
        submitter=submitter,
        model_id=model_id,
        base_model=base_model,
        lora_rank=0,
        from_checkpoint=None,
        max_seq_len=max_seq_len,
    )
    run_id = ids.run_id_of(model_id)
    _wait_visible(engine, settings, run_id, caller)
    return run_id


def _sampling_session(sampling_session_id: str) -> ids.SamplingSession:
    try:
        return ids.SamplingSession.parse(sampling_session_id)
    except ValueError as exc:
        raise ApiError(404, str(exc), field="sampling_session_id") from exc


@router.get("/samplers/{sampling_session_id}")
def get_sampler(sampling_session_id: str, reads: ReadDep, caller: CallerDep) -> dict[str, Any]:
    session = _sampling_session(sampling_session_id)
    run = run_of(reads, session.run_id, caller)
    if run is None:
        raise ApiError(404, f"sampler {sampling_session_id} not found", field="sampler_id")
    path = ids.tinker_path(session.checkpoint_uri) if session.checkpoint_uri else None
    return {"sampler_id": sampling_session_id, "base_model": run["base_model"], "model_path": path}


@router.post("/asample")
def asample(
    body: _Body, reads: ReadDep, submitter: SubmitterDep, caller: InferCaller
) -> dict[str, Any]:
    data = body.model_dump()
    session = _sampling_session(str(data.get("sampling_session_id")))
    run = run_of(reads, session.run_id, caller)
    if run is None:
        raise bad_request(f"sampling session {session.id} has no run", "sampling_session_id")
    targets = None
    try:
        prompt = model_input_from_json(data.get("prompt"), "prompt")
        if data.get("target_prompt_logprobs") is not None:
            targets = id_matrix_from_json(data["target_prompt_logprobs"], "target_prompt_logprobs")
    except WireError as exc:
        raise bad_request(str(exc), exc.field) from exc
    params = _object(data, "sampling_params")
    stop = params.get("stop")
    work = _validated(
        Sample,
        prompt_tokens=prompt,
        num_samples=_field(data, "num_samples", int, 1),
        max_tokens=_field(params, "max_tokens", int, 16),
        temperature=_field(params, "temperature", float, 1.0),
        top_p=_field(params, "top_p", float, 1.0),
        top_k=_field(params, "top_k", int, -1),
        seed=params.get("seed"),
        stop=[stop] if isinstance(stop, str) else stop,
        prompt_logprobs=_flag(data, "prompt_logprobs"),
        prompt_logprobs_last_n=data.get("prompt_logprobs_last_n"),
        topk_prompt_logprobs=_field(data, "topk_prompt_logprobs", int, 0),
        topk_sample_logprobs=_field(data, "topk_sample_logprobs", int, 0),
        target_prompt_logprobs=targets,
        prompt_alt_tokens_k=_field(data, "prompt_alt_tokens_k", int, 0),
        record_stability_info=_flag(data, "record_stability_info"),
        checkpoint_uri=session.checkpoint_uri,
    )
    seq_id = _seq_id(data)
    command_id = _command_id(session.id, seq_id)
    submitter.submit(
        envelope(
            request_id=command_id,
            command=work,
            aggregate_id=_sampler_of(reads, run),
            caller=caller,
        ),
        to="sampler-requests",
    )
    return {
        "request_id": command_id,
        "sample_sequence_ids": [f"{command_id}:{i}" for i in range(work.num_samples)],
    }


# ------------------------------------------------------------------ futures


def _tinker_response(result: CommandResult) -> Response:
    """A CommandResult in the shape the SDK expects for that kind of request."""
    if result.status != "accepted":
        # The worker's or processor's own say when the result carries it; else by status.
        category = result.category or category_of(result.status)
        return JSONResponse({"error": result.reason or result.status, "category": category})
    out: dict[str, Any] = result.output or {}
    kind = result.command_type
    if kind in ("ForwardBackward", "Forward"):
        return Response(encode_forward_backward_output(out), media_type=PROTO)
    if kind == "Sample":
        return Response(encode_sample_response(out), media_type=PROTO)
    if kind == "OptimStep":
        return JSONResponse({"metrics": out.get("metrics") or {}})
    if kind == "SaveWeights" and out.get("export"):
        path = ids.tinker_path(out["path"]).replace("/sampler_weights/", "/external_weights/", 1)
        return JSONResponse(
            {"path": path, "size_bytes": out.get("size_bytes"), "type": "save_weights_external"}
        )
    if kind == "SaveWeights":
        path = ids.tinker_path(out["path"])
        run_id = out["path"].removeprefix("bt://loops:").split("/")[0]
        # Derived from the command: the future answers the same session on every retrieve, from
        # any API process, from the result feed or the futures table.
        nonce = derived_resource_id(result.command_id, "sampling_session", 6)
        sampling = ids.SamplingSession(run_id, out["path"], nonce).id
        return JSONResponse({"path": path, "sampling_session_id": sampling})
    if kind == "LoadState":
        return JSONResponse(
            {
                "path": ids.tinker_path(out["path"]),
                "model_id": ids.model_id_of(result.aggregate_id or ""),
                "type": "load_weights",
            }
        )
    if kind == "CreateRun":
        model_id = result.command_id.removeprefix("tinker:").removesuffix(":create_run")
        # No `type`: the same future answers create_model and load_weights (from a state).
        return JSONResponse({"model_id": model_id})
    return JSONResponse(out)


def _lookup(
    state: Any, engine: Any, settings: Settings, request_id: str, caller: Caller
) -> CommandResult | None:
    """The result of one of the caller's requests: the result feed first, then the futures
    table. Another workspace's result is a 404 (see _check_owner)."""
    fresh: CommandResult | None = state.results.get(request_id)
    if fresh is not None:
        _check_owner(fresh, caller)
        return fresh
    with engine.connect() as conn:
        return ReadModels(conn, settings.read_schema).command_result(
            request_id, workspace=caller.workspace_id
        )


@router.post("/retrieve_future")
async def retrieve_future(
    body: _Body, state: StateDep, engine: EngineDep, settings: SettingsDep, caller: CallerDep
) -> Response:
    request_id = str(body.model_dump().get("request_id"))
    deadline = time.monotonic() + LONG_POLL_S
    started = time.monotonic()
    next_table_check = started
    weights_only = request_id.endswith(WEIGHTS_ONLY)
    pending = request_id.removesuffix(WEIGHTS_ONLY) if weights_only else request_id
    await run_in_threadpool(_refuse_foreign, engine, settings, pending, caller)
    while True:
        now = time.monotonic()
        if weights_only:
            if now >= next_table_check:
                next_table_check = now + 0.02
                resolved = await run_in_threadpool(
                    _resolve_weights_only, state, engine, settings, request_id, caller
                )
                if resolved is not None:
                    return _tinker_response(resolved)
        else:
            result = state.results.get(request_id)
            if result is None and now >= next_table_check:
                result = await run_in_threadpool(
                    _lookup, state, engine, settings, request_id, caller
                )
                next_table_check = now + 0.02
            if result is not None:
                _check_owner(result, caller)
                resolved = await run_in_threadpool(_resolve, result, state, engine, settings)
                if resolved is not None:
                    return _tinker_response(resolved)
        if now >= deadline:
            break
        await asyncio.sleep(0.001 if now - started < 0.1 else 0.01)
    await run_in_threadpool(_refuse_foreign, engine, settings, pending, caller)
    if state.sent.recently_sent(pending, workspace=caller.workspace_id) or (
        weights_only
        and await run_in_threadpool(_lookup, state, engine, settings, pending, caller) is not None
    ):
        return JSONResponse(
            {"type": "try_again", "request_id": request_id, "queue_state": "active"}
        )
    # 410: the SDK resubmits the original request (same seq_id, so the same command id).
    raise ApiError(410, f"unknown request {request_id}, resubmit", field="request_id")


def _refuse_foreign(engine: Any, settings: Settings, request_id: str, caller: Caller) -> None:
    """404 for a request another workspace made (its result is in the futures table)."""
    with engine.connect() as conn:
        reads = ReadModels(conn, settings.read_schema)
        if reads.command_result_exists(request_id) and (
            reads.command_result(request_id, workspace=caller.workspace_id) is None
        ):
            raise ApiError(404, f"request {request_id} not found", field="request_id")


def _check_owner(result: CommandResult, caller: Caller) -> None:
    """Another workspace's future is unknown here: 404, the same answer as an id never seen
    by any workspace would get if it were not for the SDK's resubmission on 410."""
    if workspace_of(result) != caller.workspace_id:
        raise ApiError(404, f"request {result.command_id} not found", field="request_id")


def _resolve(
    result: CommandResult, state: Any, engine: Any, settings: Settings
) -> CommandResult | None:
    """A CreateRun counts as done once the run is in the read models (the next call reads it
    there); one that must drop the checkpoint's optimizer state waits for its LoadState too.
    A SaveWeights once its checkpoint is recorded."""
    if result.status != "accepted":
        return result
    if result.command_type == "SaveWeights":
        # A sampler asked for the checkpoint right after the save must find it.
        with engine.connect() as conn:
            reads = ReadModels(conn, settings.read_schema)
            settled = reads.save_settled(result, workspace=workspace_of(result))
        return result if settled else None
    if result.command_type != "CreateRun":
        return result
    model_id = result.command_id.removeprefix("tinker:").removesuffix(":create_run")
    with engine.connect() as conn:
        reads = ReadModels(conn, settings.read_schema)
        if reads.run(ids.run_id_of(model_id), workspace=workspace_of(result)) is None:
            return None
    return result


def _resolve_weights_only(
    state: Any, engine: Any, settings: Settings, load_id: str, caller: Caller
) -> CommandResult | None:
    """The future of a run created from a state checkpoint without its optimizer: the
    CreateRun, then a LoadState(optimizer=False) of the run's start checkpoint under the id
    `load_id`. Derived from the log and the read models alone, so it survives an API restart
    and agrees across API processes (a LoadState sent twice is one command: same id)."""
    create_id = load_id.removesuffix(WEIGHTS_ONLY)
    created = _lookup(state, engine, settings, create_id, caller)
    if created is None:
        return None
    if created.status != "accepted":
        return created
    loaded = _lookup(state, engine, settings, load_id, caller)
    if loaded is not None:
        return created if loaded.status == "accepted" else loaded
    model_id = create_id.removeprefix("tinker:").removesuffix(":create_run")
    with engine.connect() as conn:
        run = run_of(ReadModels(conn, settings.read_schema), ids.run_id_of(model_id), caller)
    if run is None or run["from_checkpoint"] is None:
        return None  # the run is not in the read models yet
    if not state.sent.recently_sent(load_id, workspace=caller.workspace_id):
        work = LoadState(checkpoint_uri=run["from_checkpoint"], optimizer=False)
        state.bus.send(
            envelope(
                request_id=load_id,
                command=work,
                aggregate_id=ids.run_id_of(model_id),
                caller=caller,
            ),
            to="trainer-requests",
        )
        state.sent.remember(load_id, workspace=caller.workspace_id)
    return None
