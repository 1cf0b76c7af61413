"""Sampling on a sampler: a work request for the sampler worker and a future."""

from __future__ import annotations

from fastapi import APIRouter, status

from api.auth import InferCaller
from api.deps import IdempotencyHeader, ReadDep, RequestIdQuery, SamplerIdPath, SubmitterDep
from api.errors import conflict, error_responses, not_found, unprocessable
from api.models import RequestAccepted, SampleCreate
from api.routes._common import envelope
from api.submit import resolve_request_id
from commands.work import Sample

router = APIRouter(
    prefix="/v1/loops/samplers", tags=["sampling"], responses=error_responses(404, 409)
)


@router.post("/{sampler_id}/sample", status_code=status.HTTP_202_ACCEPTED)
def sample(
    sampler_id: SamplerIdPath,
    body: SampleCreate,
    caller: InferCaller,
    reads: ReadDep,
    submitter: SubmitterDep,
    idempotency_key: IdempotencyHeader = None,
    request_id: RequestIdQuery = None,
) -> RequestAccepted:
    """Generate `num_samples` completions. `checkpoint_uri` pins the weights; without it the
    sampler uses the latest weights it has. `affinity_key` groups rollouts (sent as the
    request's correlation id)."""
    ids = resolve_request_id(
        header=idempotency_key,
        query=request_id,
        body=body.request_id,
        workspace=caller.workspace_id,
    )
    if not submitter.already_submitted(ids.command_id):
        sampler = reads.sampler(sampler_id, workspace=caller.workspace_id)
        if sampler is None:
            raise not_found(f"sampler {sampler_id} not found", field="sampler_id")
        if sampler["status"] != "active":
            raise conflict(
                f"sampler {sampler_id} is stopped: session ended ({sampler['stop_reason']})",
                field="sampler_id",
            )
        # A pinned checkpoint must be one of this workspace's (the sampler worker would load any
        # path it is given).
        if (
            body.checkpoint_uri is not None
            and reads.run(
                body.checkpoint_uri.removeprefix("bt://loops:").split("/")[0],
                workspace=caller.workspace_id,
            )
            is None
        ):
            raise not_found(f"checkpoint {body.checkpoint_uri} not found", field="checkpoint_uri")
        max_seq_len = sampler["max_seq_len"]
        if body.prompt_tokens is not None and max_seq_len and len(body.prompt_tokens) > max_seq_len:
            raise unprocessable(
                f"prompt_tokens: {len(body.prompt_tokens)} tokens, more than the run's "
                f"max_seq_len {max_seq_len}",
                field="prompt_tokens",
            )
    request = Sample.model_validate(body.model_dump(exclude={"affinity_key", "request_id"}))
    submitter.submit(
        envelope(
            request_id=ids.command_id,
            command=request,
            aggregate_id=sampler_id,
            correlation_id=body.affinity_key,
            caller=caller,
        ),
        to="sampler-requests",
    )
    return RequestAccepted(request_id=ids.request_id)
