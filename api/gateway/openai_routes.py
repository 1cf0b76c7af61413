"""OpenAI-compatible chat completions and completions on deployments (seeds 001 and 003: "any
code written for the OpenAI SDK works without modification").

    POST /v1/chat/completions          `model`: "<model_id>/<deployment_id>", or "<model_id>"
    POST /v1/completions               alone for the model's development deployment
    POST /model/{model_id}/deployment/{deployment_id}/v1/chat/completions
    POST /model/{model_id}/deployment/{deployment_id}/v1/completions
    POST /model/{model_id}/development/v1/chat/completions
    POST /model/{model_id}/development/v1/completions

The last four are Baseten's shape (the deployment is in the path; `model` in the body is
ignored there). Same keys, scope (`infer`) and tenancy as predict: another workspace's model
and a deactivated deployment are 404s. Errors on these routes have OpenAI's shape,
`{"error": {"message", "type", "param", "code"}}`, and a refused value is a 400 naming it
(OpenAI's SDKs raise BadRequestError), never the Loops API's 422. A parameter that would change
what is generated and that loopstream does not serve (tools, JSON response formats, logit bias,
penalties, top logprobs) is refused, not ignored. docs/openai.md is the user's page.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextlib import contextmanager
from itertools import accumulate
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute

from api.auth import InferCaller
from api.deploy_queries import DeploymentReadDep
from api.errors import ApiError, validation_message
from api.gateway.app import call_replica, resolve
from api.gateway.openai_models import (
    DEFAULT_CHAT_MAX_TOKENS,
    DEFAULT_COMPLETION_MAX_TOKENS,
    ChatCompletionRequest,
    CompletionRequest,
    SamplingRequest,
    render_chat,
)
from events.limits import MAX_PROMPT_LENGTH

# --- errors in OpenAI's shape ------------------------------------------------------------------


_CODES = {
    400: "invalid_value",
    401: "invalid_api_key",
    403: "insufficient_scope",
    404: "model_not_found",
}


def openai_error(
    status_code: int, message: str, *, param: str | None, code: str | None = None
) -> JSONResponse:
    kind = {401: "authentication_error", 403: "permission_error"}.get(
        status_code, "invalid_request_error" if status_code < 500 else "server_error"
    )
    body = {
        "message": message,
        "type": kind,
        "param": param,
        "code": code or _CODES.get(status_code),
    }
    return JSONResponse({"error": body}, status_code)


class OpenAIRoute(APIRoute):
    """Answers this router's errors in OpenAI's shape, and a refused value as a 400 (OpenAI's
    status for it) instead of the Loops API's 422. The app's own handlers stay as they are for
    every other route."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as exc:
                errors = list(exc.errors())
                first = errors[0] if errors else {}
                message, param = validation_message(first) if first else ("invalid request", None)
                code = {
                    "unsupported_parameter": "unsupported_parameter",
                    "extra_forbidden": "unknown_parameter",
                }.get(first.get("type", ""), "invalid_value")
                return openai_error(400, message, param=param, code=code)
            except ApiError as exc:
                status_code = 400 if exc.status_code == 422 else exc.status_code
                return openai_error(status_code, exc.detail, param=exc.field)

        return route


router = APIRouter(tags=["openai"], route_class=OpenAIRoute)


# --- answers -----------------------------------------------------------------------------------


def fingerprint(answer: dict[str, Any]) -> str:
    """The loopstream extension `system_fingerprint`: the first 16 hex characters of the digest
    of the weights that answered, so a client can tell which weights it talked to."""
    return str(answer["weights"]["digest"]).rpartition(":")[2][:16]


def token_texts(choice: dict[str, Any]) -> list[str]:
    """(N,) each generated token's share of the text (the replica's `pieces`), or `token_id:<id>`
    (vLLM's spelling) from a replica that does not answer them."""
    pieces = choice.get("pieces")
    if pieces and len(pieces) == len(choice["tokens"]):
        return [str(p) for p in pieces]
    return [f"token_id:{t}" for t in choice["tokens"]]


def text_deltas(choice: dict[str, Any]) -> list[str]:
    """(N,) the answer's text split at token boundaries: the pieces, cut where the replica cut
    the text (before a stop string), so they concatenate to exactly `text`. One delta holding
    the whole text when the pieces do not spell it (a replica without them)."""
    text: str = choice["text"]
    pieces = choice.get("pieces")
    if not pieces or not "".join(pieces).startswith(text):
        return [text]
    deltas, left = [], len(text)
    for piece in pieces:
        deltas.append(piece[:left])
        left -= len(deltas[-1])
    return deltas


def chat_logprobs(choice: dict[str, Any]) -> dict[str, Any] | None:
    if choice.get("logprobs") is None:
        return None
    content = [
        {"token": t, "logprob": lp, "bytes": list(t.encode()), "top_logprobs": []}
        for t, lp in zip(token_texts(choice), choice["logprobs"], strict=True)
    ]
    return {"content": content, "refusal": None}


def completion_logprobs(choice: dict[str, Any]) -> dict[str, Any] | None:
    """OpenAI's legacy shape; `text_offset` counts from the start of the completion."""
    if choice.get("logprobs") is None:
        return None
    texts = token_texts(choice)
    offsets = [0, *accumulate(len(t) for t in texts)][: len(texts)]
    return {
        "tokens": texts,
        "token_logprobs": choice["logprobs"],
        "top_logprobs": None,
        "text_offset": offsets,
    }


def token_slice(logprobs: dict[str, Any] | None, t: int) -> dict[str, Any] | None:
    """Token t's part of a choice's logprobs (every list cut to [t, t + 1))."""
    if logprobs is None:
        return None
    return {k: v[t : t + 1] if isinstance(v, list) else v for k, v in logprobs.items()}


def usage(answer: dict[str, Any]) -> dict[str, int]:
    prompt, completion = int(answer["prompt_tokens"]), int(answer["completion_tokens"])
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


async def chat_chunks(
    answer: dict[str, Any], head: dict[str, Any], *, include_usage: bool
) -> AsyncIterator[bytes]:
    """The answer as chat.completion.chunk events: a role chunk, then one chunk per generated
    token and choice (its text delta and, when asked, its logprob), a finish chunk per choice,
    the usage chunk when asked, and `[DONE]`.

    Chunked after generation, not token by token from the engine: a replica's `predict` runs
    the whole sampling in one Ray call and answers when it is done (the engines sample a batch
    to the end; there is no token callback across Ray). A client gets OpenAI's stream and can
    consume it unchanged, but the first chunk comes when the last token is generated.
    """
    extra = {"usage": None} if include_usage else {}
    for choice in answer["choices"]:
        i = choice["index"]
        yield sse(
            {
                **head,
                **extra,
                "choices": [
                    {
                        "index": i,
                        "logprobs": None,
                        "delta": {"role": "assistant", "content": ""},
                        "finish_reason": None,
                    }
                ],
            }
        )
        deltas = text_deltas(choice)
        per_token = len(deltas) == len(choice["tokens"])  # else one delta holds the whole text
        logprobs = chat_logprobs(choice)
        for t, delta in enumerate(deltas):
            yield sse(
                {
                    **head,
                    **extra,
                    "choices": [
                        {
                            "index": i,
                            "delta": {"content": delta},
                            "logprobs": token_slice(logprobs, t) if per_token else logprobs,
                            "finish_reason": None,
                        }
                    ],
                }
            )
        yield sse(
            {
                **head,
                **extra,
                "choices": [
                    {
                        "index": i,
                        "delta": {},
                        "logprobs": None,
                        "finish_reason": choice["finish_reason"],
                    }
                ],
            }
        )
    if include_usage:
        yield sse({**head, "choices": [], "usage": usage(answer)})
    yield sse("[DONE]")


async def completion_chunks(
    answer: dict[str, Any], head: dict[str, Any], *, include_usage: bool
) -> AsyncIterator[bytes]:
    """The answer as text_completion chunks, one per generated token and choice; chunked after
    generation like `chat_chunks` (see there why)."""
    extra = {"usage": None} if include_usage else {}
    for choice in answer["choices"]:
        i = choice["index"]
        deltas = text_deltas(choice)
        per_token = len(deltas) == len(choice["tokens"])  # else one delta holds the whole text
        logprobs = completion_logprobs(choice)
        for t, delta in enumerate(deltas):
            yield sse(
                {
                    **head,
                    **extra,
                    "choices": [
                        {
                            "index": i,
                            "text": delta,
                            "logprobs": token_slice(logprobs, t) if per_token else logprobs,
                            "finish_reason": None,
                        }
                    ],
                }
            )
        yield sse(
            {
                **head,
                **extra,
                "choices": [
                    {
                        "index": i,
                        "text": "",
                        "logprobs": None,
                        "finish_reason": choice["finish_reason"],
                    }
                ],
            }
        )
    if include_usage:
        yield sse({**head, "choices": [], "usage": usage(answer)})
    yield sse("[DONE]")


# --- routes ------------------------------------------------------------------------------------


def model_of(body: SamplingRequest) -> tuple[str, str | None]:
    """(model_id, deployment_id or None for the development deployment) of a `model` field."""
    if body.model is None:
        raise ApiError(
            400,
            'model: required, as "<model_id>/<deployment_id>" or '
            '"<model_id>" (its development deployment)',
            field="model",
        )
    model_id, slash, deployment_id = body.model.partition("/")
    if not model_id or (slash and not deployment_id) or "/" in deployment_id:
        raise ApiError(
            400,
            f'model: {body.model!r} is neither "<model_id>/<deployment_id>" nor "<model_id>"',
            field="model",
        )
    return model_id, deployment_id or None


@contextmanager
def named_by_model() -> Iterator[None]:
    """On the /v1 routes the deployment comes from `model`: a 404 names that field."""
    try:
        yield
    except ApiError as exc:
        if exc.status_code == 404:
            exc.field = "model"
        raise


async def _generate(
    request: Request,
    reads: DeploymentReadDep,
    workspace: str,
    where: tuple[str, str | None],
    replica_body: dict[str, Any],
    *,
    route: str,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the replica's answer, the fields every response and chunk starts with)."""
    model_id, deployment_id = where
    target = await asyncio.to_thread(resolve, request, reads, workspace, model_id, deployment_id)
    answer = await call_replica(request, target, replica_body, route=route)
    head = {
        "id": ("chatcmpl-" if route == "chat_completions" else "cmpl-") + uuid.uuid4().hex,
        "object": "chat.completion" if route == "chat_completions" else "text_completion",
        "created": int(time.time()),
        "model": f"{model_id}/{target.deployment_id}",
        "system_fingerprint": fingerprint(answer),
    }
    return answer, head


def _stream(chunks: AsyncIterator[bytes]) -> StreamingResponse:
    return StreamingResponse(
        chunks, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )


async def _chat(
    request: Request,
    reads: DeploymentReadDep,
    workspace: str,
    where: tuple[str, str | None],
    body: ChatCompletionRequest,
) -> Response:
    prompt = render_chat(body.messages)
    if len(prompt) > MAX_PROMPT_LENGTH:
        raise ApiError(
            400,
            f"messages: the rendered chat is longer than {MAX_PROMPT_LENGTH} characters",
            field="messages",
        )
    limit = body.max_completion_tokens or body.max_tokens or DEFAULT_CHAT_MAX_TOKENS
    replica_body = {
        **body.sampling(max_tokens=limit),
        "prompt": prompt,
        "prompt_tokens": None,
        "logprobs": bool(body.logprobs),
    }
    answer, head = await _generate(
        request, reads, workspace, where, replica_body, route="chat_completions"
    )
    if body.stream:
        chunk_head = {**head, "object": "chat.completion.chunk"}
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return _stream(chat_chunks(answer, chunk_head, include_usage=include_usage))
    choices = [
        {
            "index": c["index"],
            "message": {"role": "assistant", "content": c["text"], "refusal": None},
            "logprobs": chat_logprobs(c),
            "finish_reason": c["finish_reason"],
        }
        for c in answer["choices"]
    ]
    return JSONResponse({**head, "choices": choices, "usage": usage(answer)})


async def _complete(
    request: Request,
    reads: DeploymentReadDep,
    workspace: str,
    where: tuple[str, str | None],
    body: CompletionRequest,
) -> Response:
    text = body.prompt if isinstance(body.prompt, str) else None
    replica_body = {
        **body.sampling(max_tokens=body.max_tokens or DEFAULT_COMPLETION_MAX_TOKENS),
        "prompt": text,
        "prompt_tokens": None if text is not None else body.prompt,
        "logprobs": body.logprobs is not None,
    }
    answer, head = await _generate(
        request, reads, workspace, where, replica_body, route="completions"
    )
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return _stream(completion_chunks(answer, head, include_usage=include_usage))
    choices = [
        {
            "index": c["index"],
            "text": c["text"],
            "logprobs": completion_logprobs(c),
            "finish_reason": c["finish_reason"],
        }
        for c in answer["choices"]
    ]
    return JSONResponse({**head, "choices": choices, "usage": usage(answer)})


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(
    request: Request, body: ChatCompletionRequest, caller: InferCaller, reads: DeploymentReadDep
) -> Response:
    """OpenAI chat completions; `model` names the deployment (see the module's docstring)."""
    with named_by_model():
        return await _chat(request, reads, caller.workspace_id, model_of(body), body)


@router.post("/v1/completions", response_model=None)
async def completions(
    request: Request, body: CompletionRequest, caller: InferCaller, reads: DeploymentReadDep
) -> Response:
    """OpenAI (legacy) completions; `model` names the deployment."""
    with named_by_model():
        return await _complete(request, reads, caller.workspace_id, model_of(body), body)


@router.post(
    "/model/{model_id}/deployment/{deployment_id}/v1/chat/completions", response_model=None
)
async def deployment_chat_completions(
    request: Request,
    model_id: str,
    deployment_id: str,
    body: ChatCompletionRequest,
    caller: InferCaller,
    reads: DeploymentReadDep,
) -> Response:
    """Chat completions on one deployment; `model` in the body is ignored."""
    return await _chat(request, reads, caller.workspace_id, (model_id, deployment_id), body)


@router.post("/model/{model_id}/deployment/{deployment_id}/v1/completions", response_model=None)
async def deployment_completions(
    request: Request,
    model_id: str,
    deployment_id: str,
    body: CompletionRequest,
    caller: InferCaller,
    reads: DeploymentReadDep,
) -> Response:
    """Completions on one deployment; `model` in the body is ignored."""
    return await _complete(request, reads, caller.workspace_id, (model_id, deployment_id), body)


@router.post("/model/{model_id}/development/v1/chat/completions", response_model=None)
async def development_chat_completions(
    request: Request,
    model_id: str,
    body: ChatCompletionRequest,
    caller: InferCaller,
    reads: DeploymentReadDep,
) -> Response:
    """Chat completions on the model's development deployment; `model` is ignored."""
    return await _chat(request, reads, caller.workspace_id, (model_id, None), body)


@router.post("/model/{model_id}/development/v1/completions", response_model=None)
async def development_completions(
    request: Request,
    model_id: str,
    body: CompletionRequest,
    caller: InferCaller,
    reads: DeploymentReadDep,
) -> Response:
    """Completions on the model's development deployment; `model` is ignored."""
    return await _complete(request, reads, caller.workspace_id, (model_id, None), body)
