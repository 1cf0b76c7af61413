"""Training calls on a run: each one is a work request for the trainer worker and a future.

Checks made here are the ones the read models can answer at once (the run exists and is active,
sequences fit the run's max_seq_len); everything else is the worker's to judge, and its verdict
arrives in the future.
"""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, status
from pydantic import BaseModel, ValidationError

from api.auth import Caller, TrainCaller
from api.deps import IdempotencyHeader, ReadDep, RequestIdQuery, RunIdPath, SubmitterDep
from api.errors import error_responses, not_found, unprocessable
from api.models import (
    ComputeLogprobsCreate,
    ForwardBackwardCreate,
    ForwardCreate,
    LoadStateCreate,
    OptimStepCreate,
    RequestAccepted,
    SaveWeightsCreate,
)
from api.queries import ReadModels
from api.recorded import RecordError, table_lookup, with_recorded_logprobs
from api.routes._common import active_run, envelope, source_run
from api.submit import Submitter, command_id_for, resolve_request_id
from commands.handling import first_validation_error
from commands.work import (
    ComputeLogprobs,
    Forward,
    ForwardBackward,
    LoadState,
    OptimStep,
    SaveWeights,
    WorkRequest,
)

router = APIRouter(prefix="/v1/loops/runs", tags=["training"], responses=error_responses(404, 409))

SAMPLER_ONLY = frozenset({"checkpoint_type", "compression_format", "hotload"})
STATE_ONLY = frozenset({"loader_state"})


def _check_lengths(sequences: list[list[int]], *, max_seq_len: int, field: str) -> None:
    for i, tokens in enumerate(sequences):
        if len(tokens) > max_seq_len:
            raise unprocessable(
                f"{field.format(i=i)}: {len(tokens)} tokens, more than the run's "
                f"max_seq_len {max_seq_len}",
                field=field.format(i=i),
            )


def _recorded(request: ForwardBackward, reads: ReadModels, caller: Caller) -> ForwardBackward:
    """The sampler's recorded logprobs in a stable_reinforce request (api/recorded.py)."""
    ws = caller.workspace_id
    try:
        return with_recorded_logprobs(
            request, table_lookup(reads, ws, lambda key: command_id_for(ws, key))
        )
    except RecordError as exc:
        raise unprocessable(str(exc), field=exc.field) from exc


def _submit(
    *,
    run_id: str,
    request: WorkRequest,
    body: BaseModel,
    caller: Caller,
    reads: ReadModels,
    submitter: Submitter,
    header_key: str | None,
    query_key: str | None,
    sequences: list[list[int]] | None = None,
    sequences_field: str = "",
) -> RequestAccepted:
    ids = resolve_request_id(
        header=header_key,
        query=query_key,
        body=getattr(body, "request_id", None),
        workspace=caller.workspace_id,
    )
    if not submitter.already_submitted(ids.command_id):
        run = active_run(reads, run_id, caller)
        if sequences is not None:
            _check_lengths(sequences, max_seq_len=run["max_seq_len"], field=sequences_field)
    submitter.submit(
        envelope(request_id=ids.command_id, command=request, aggregate_id=run_id, caller=caller),
        to="trainer-requests",
    )
    return RequestAccepted(request_id=ids.request_id)


@router.post("/{run_id}/forward_backward", status_code=status.HTTP_202_ACCEPTED)
def forward_backward(
    run_id: RunIdPath,
    body: ForwardBackwardCreate,
    caller: TrainCaller,
    reads: ReadDep,
    submitter: SubmitterDep,
    idempotency_key: IdempotencyHeader = None,
    request_id: RequestIdQuery = None,
) -> RequestAccepted:
    """Forward and backward pass on a batch; gradients accumulate until optim_step.
    `loss_fn_config` sets the loss's parameters (ppo/cispo/gspo clip thresholds, dro beta,
    stable_reinforce kl_coeff). stable_reinforce trains on what the sampler recorded: each datum
    names its sampled sequence (`<sample request id>:<index>`) in `loss_fn_input_spans`."""
    request = _recorded(ForwardBackward.model_validate(body.model_dump(exclude={"request_id"})),
                        reads, caller)  # fmt: skip
    return _submit(
        run_id=run_id, request=request, body=body, caller=caller, reads=reads,
        submitter=submitter,
        header_key=idempotency_key, query_key=request_id,
        sequences=[d.model_input for d in body.data], sequences_field="data.{i}.model_input",
    )  # fmt: skip


@router.post("/{run_id}/forward", status_code=status.HTTP_202_ACCEPTED)
def forward(
    run_id: RunIdPath,
    body: ForwardCreate,
    caller: TrainCaller,
    reads: ReadDep,
    submitter: SubmitterDep,
    idempotency_key: IdempotencyHeader = None,
    request_id: RequestIdQuery = None,
) -> RequestAccepted:
    """The loss and per-token logprobs of a batch, gradients untouched (evaluation)."""
    request = _recorded(Forward.model_validate(body.model_dump(exclude={"request_id"})),
                        reads, caller)  # fmt: skip
    return _submit(
        run_id=run_id, request=request, body=body, caller=caller, reads=reads,
        submitter=submitter,
        header_key=idempotency_key, query_key=request_id,
        sequences=[d.model_input for d in body.data], sequences_field="data.{i}.model_input",
    )  # fmt: skip


@router.post("/{run_id}/load_state", status_code=status.HTTP_202_ACCEPTED)
def load_state(
    run_id: RunIdPath,
    body: LoadStateCreate,
    caller: TrainCaller,
    reads: ReadDep,
    submitter: SubmitterDep,
    idempotency_key: IdempotencyHeader = None,
    request_id: RequestIdQuery = None,
) -> RequestAccepted:
    """Load a full-state (`weights`) checkpoint into the run: weights, and with `optimizer` the
    AdamW moments, step and RNG. The result hands back the `loader_state` saved with it.
    The checkpoint is the caller's workspace's, or published by another."""
    request = LoadState.model_validate(body.model_dump(exclude={"request_id"}))
    if source_run(reads, request.checkpoint_uri, caller) is None:
        raise not_found(f"checkpoint {request.checkpoint_uri} not found", field="checkpoint_uri")
    return _submit(
        run_id=run_id, request=request, body=body, caller=caller, reads=reads,
        submitter=submitter,
        header_key=idempotency_key, query_key=request_id,
    )  # fmt: skip


@router.post("/{run_id}/optim_step", status_code=status.HTTP_202_ACCEPTED)
def optim_step(
    run_id: RunIdPath,
    body: OptimStepCreate,
    caller: TrainCaller,
    reads: ReadDep,
    submitter: SubmitterDep,
    idempotency_key: IdempotencyHeader = None,
    request_id: RequestIdQuery = None,
) -> RequestAccepted:
    """One AdamW step with this call's hyper-parameters (Tinker's AdamParams defaults)."""
    return _submit(
        run_id=run_id, request=OptimStep(adam_params=body.adam_params), body=body,
        caller=caller, reads=reads, submitter=submitter, header_key=idempotency_key,
        query_key=request_id,
    )  # fmt: skip


@router.post("/{run_id}/compute_logprobs", status_code=status.HTTP_202_ACCEPTED)
def compute_logprobs(
    run_id: RunIdPath,
    body: ComputeLogprobsCreate,
    caller: TrainCaller,
    reads: ReadDep,
    submitter: SubmitterDep,
    idempotency_key: IdempotencyHeader = None,
    request_id: RequestIdQuery = None,
) -> RequestAccepted:
    """Per-token logprobs of each sequence under the run's current weights."""
    return _submit(
        run_id=run_id, request=ComputeLogprobs(sequences=body.sequences), body=body,
        caller=caller, reads=reads, submitter=submitter, header_key=idempotency_key,
        query_key=request_id, sequences=body.sequences, sequences_field="sequences.{i}",
    )  # fmt: skip


def _save(
    kind: Literal["weights", "sampler_weights"],
    run_id: RunIdPath,
    body: SaveWeightsCreate,
    caller: Caller,
    reads: ReadModels,
    submitter: Submitter,
    idempotency_key: str | None,
    request_id: str | None,
) -> RequestAccepted:
    # What the caller sent: a field of the other kind of save is a mistake worth naming.
    other_kind = SAMPLER_ONLY if kind == "weights" else STATE_ONLY
    for name in sorted(body.model_fields_set & other_kind):
        where = "save_weights_for_sampler" if kind == "weights" else "save_weights"
        raise unprocessable(f"{name}: only {where} takes it", field=name)
    fields = body.model_dump(exclude={"request_id"}, exclude_unset=True)
    try:
        request = SaveWeights(kind=kind, **fields)
    except ValidationError as exc:
        # A field of the other kind of save (loader_state on a sampler save, ...).
        reason, field = first_validation_error(exc, prefix="")
        raise unprocessable(reason, field=field) from exc
    return _submit(
        run_id=run_id, request=request, body=body, caller=caller, reads=reads,
        submitter=submitter,
        header_key=idempotency_key, query_key=request_id,
    )  # fmt: skip


@router.post("/{run_id}/save_weights", status_code=status.HTTP_202_ACCEPTED)
def save_weights(
    run_id: RunIdPath,
    body: SaveWeightsCreate,
    caller: TrainCaller,
    reads: ReadDep,
    submitter: SubmitterDep,
    idempotency_key: IdempotencyHeader = None,
    request_id: RequestIdQuery = None,
) -> RequestAccepted:
    """Save the full training state (resumable): bt://loops:<run_id>/weights/<name>."""
    return _save("weights", run_id, body, caller, reads, submitter, idempotency_key, request_id)


@router.post("/{run_id}/save_weights_for_sampler", status_code=status.HTTP_202_ACCEPTED)
def save_weights_for_sampler(
    run_id: RunIdPath,
    body: SaveWeightsCreate,
    caller: TrainCaller,
    reads: ReadDep,
    submitter: SubmitterDep,
    idempotency_key: IdempotencyHeader = None,
    request_id: RequestIdQuery = None,
) -> RequestAccepted:
    """Save sampler weights (bt://loops:<run_id>/sampler_weights/<name>) as a full `base` or a
    `delta` against the last one; the run's sampler loads them without a restart (the sync is
    numbered: GET /v1/loops/samplers/{sampler_id}/syncs), unless `hotload` is null."""
    return _save(
        "sampler_weights", run_id, body, caller, reads, submitter, idempotency_key, request_id
    )
