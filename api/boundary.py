"""The API's input boundary, as one ASGI middleware in front of every route.

What no route should have to think about is refused here, before routing, for every front door
(/v1/loops, the Tinker wire protocol, anything added later):
- a body over `api_max_body_bytes`: 413, from Content-Length up front, else while it is read
  (the body is never buffered past the limit);
- text PostgreSQL cannot store (NUL, a lone surrogate) in a path id, a query parameter or any
  string or key of a JSON body: 422 naming the parameter or the dotted field;
- a JSON body holding NaN, Infinity or -Infinity (Python's json accepts these extensions, and
  1e999 overflows to inf): 422 naming the field;
- an exception no route handled: a JSON 500 with a request id (logged with the traceback), sent
  as a complete answer so the keep-alive connection stays usable.

The request models (events/limits.py types) say the same for their fields and show it in the
OpenAPI; this is the safety net that also covers free-form bodies and unmodelled parameters.
"""

from __future__ import annotations

import json
import logging
import math
import re
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qsl

from api.errors import UNPROCESSABLE, error_content
from events.limits import json_problem, text_problem

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]


class RejectedInput(Exception):
    def __init__(self, status_code: int, detail: str, field: str | None) -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail
        self.field = field


class _NonFinite:
    """Stands in for a NaN/Infinity literal while parsing, so the walk can name its field."""


_NON_FINITE = _NonFinite()


def _parse_float(text: str) -> float | _NonFinite:
    value = float(text)
    return value if math.isfinite(value) else _NON_FINITE  # 1e999


def _find_non_finite(value: Any, path: str = "") -> str | None:
    if value is _NON_FINITE:
        return path
    items: Any = (
        value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list)
        else ()
    )  # fmt: skip
    for key, item in items:
        found = _find_non_finite(item, f"{path}.{key}" if path else str(key))
        if found is not None:
            return found
    return None


def check_json_body(body: bytes) -> None:
    """Raise `RejectedInput` (422) for a JSON body with a non-finite number, or a string or key
    PostgreSQL cannot store; malformed JSON is left to FastAPI's own json_invalid error."""
    if not body.strip():
        return
    try:
        document = json.loads(body, parse_constant=lambda _: _NON_FINITE, parse_float=_parse_float)
    except RecursionError as exc:
        raise RejectedInput(UNPROCESSABLE, "body: JSON nested too deeply", "body") from exc
    except json.JSONDecodeError:
        return  # FastAPI answers 422 json_invalid with the position
    except ValueError as exc:  # an integer past Python's 4300-digit limit, bad UTF-8
        raise RejectedInput(UNPROCESSABLE, f"body: {exc}", "body") from exc
    where = _find_non_finite(document)
    if where is not None:
        field = where or None
        raise RejectedInput(
            UNPROCESSABLE,
            f"{where or 'body'}: must be a finite number (NaN and Infinity are not JSON)",
            field,
        )
    found = json_problem(document)
    if found is not None:
        where, why = found
        raise RejectedInput(UNPROCESSABLE, f"{where or 'body'}: {why}", where or None)


def _is_json(scope: Scope) -> bool:
    # FastAPI parses a body as JSON when there is no content type or a JSON one (same rule).
    content_type = _header(scope, b"content-type")
    if content_type is None:
        return True
    kind = content_type.split(";")[0].strip().lower()
    return kind == "application/json" or (
        kind.startswith("application/") and kind.endswith("+json")
    )


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers") or ():
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None


def check_path_and_query(scope: Scope) -> None:
    """422 for a path parameter or query parameter PostgreSQL could not store."""
    path = scope.get("path", "")
    if text_problem(path) is not None:
        field, why = _path_parameter(scope), text_problem(path)
        raise RejectedInput(UNPROCESSABLE, f"{field or 'path'}: {why}", field or "path")
    query = bytes(scope.get("query_string") or b"").decode("latin-1")
    for name, value in parse_qsl(query, keep_blank_values=True, errors="surrogateescape"):
        for text in (name, value):
            problem = text_problem(text)
            if problem is not None:
                field = name if text_problem(name) is None else "query"
                raise RejectedInput(UNPROCESSABLE, f"{field}: {problem}", field)


def _path_parameter(scope: Scope) -> str | None:
    """The name of the path parameter that holds the bad text, from the route templates of the
    app's OpenAPI (`/v1/loops/sessions/{session_id}`); None when no template matches."""
    app = scope.get("app")
    openapi = getattr(app, "openapi", None)
    if openapi is None:
        return None
    for template in openapi().get("paths", {}):
        pattern = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]*)", re.escape(template))
        match = re.fullmatch(pattern, scope.get("path", ""))
        if match is not None:
            for name, value in match.groupdict().items():
                if text_problem(value) is not None:
                    return name
    return None


async def _respond(send: Send, status_code: int, content: dict[str, Any], **headers: str) -> None:
    body = json.dumps(content).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status_code, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class InputBoundary:
    """ASGI middleware: body size cap, storable text, finite numbers, JSON 500s."""

    def __init__(self, app: App, *, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            check_path_and_query(scope)
            body = await self._read_body(scope, receive)
            if _is_json(scope):
                check_json_body(body)
        except RejectedInput as exc:
            # A 413 leaves body bytes unread on the connection: close it after the answer.
            headers = {"connection": "close"} if exc.status_code == 413 else {}
            content = error_content(exc.detail, exc.field, exc.status_code)
            await _respond(send, exc.status_code, content, **headers)
            return

        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # later calls wait for the disconnect, as before

        try:
            await self.app(scope, replay, tracking_send)
        except Exception:
            request_id = uuid.uuid4().hex
            log.exception(
                "unhandled error in %s %s (request id %s)",
                scope.get("method"),
                scope.get("path"),
                request_id,
            )
            if started:
                raise  # half an answer went out: only closing the connection is honest
            content = {
                "detail": f"internal server error (request id {request_id})",
                "field": None,
                "request_id": request_id,
            }
            await _respond(send, 500, content, x_request_id=request_id)

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes:
        limit = self.max_body_bytes
        declared = _header(scope, b"content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > limit:
            raise _too_large(limit)
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away mid-body
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)


def _too_large(limit: int) -> RejectedInput:
    return RejectedInput(
        413,
        f"body: larger than the limit of {limit} bytes (LOOPSTREAM_API_MAX_BODY_BYTES)",
        "body",
    )
