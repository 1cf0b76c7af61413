"""One error shape for every 4xx and 5xx: `{"detail": "<message naming the field>", "field": ...}`.

FastAPI's own 422 body is a list of pydantic errors; clients of the Loops API (and the SDK) get
one message instead, the first error, with the dotted path of the field it is about, and every
message in `errors`. `ErrorBody` / `ValidationErrorBody` declare these shapes in the OpenAPI.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import sqlalchemy.exc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette import status

# Where a value came from is not part of the field's name ("body.data.0" -> "data.0").
_LOCATIONS = {"body", "query", "path", "header", "cookie"}
# A model-level rule names its field first ("data.0.loss_fn_inputs.weights is required by ...").
_LEADING_FIELD = re.compile(r"^([A-Za-z]\w*(?:\.\w+)*)\b")


UNPROCESSABLE = 422  # starlette renamed the constant (ENTITY -> CONTENT); the number is stable


class ErrorBody(BaseModel):
    """What every error answer holds (4xx, and a 500 with the id of the failed request)."""

    detail: str = Field(description="what is wrong, naming the field first when there is one")
    field: str | None = Field(default=None, description="dotted path of the field, if any")
    errors: list[str] | None = Field(default=None, description="422: every problem found")
    request_id: str | None = Field(default=None, description="500: the id logged with it")


class ValidationErrorBody(BaseModel):
    """A 422: the request was well-formed HTTP but a value is refused."""

    detail: str = Field(description="the first problem, naming its field")
    field: str | None = Field(description="dotted path of that field, or null (the whole body)")
    errors: list[str] = Field(description="every problem found, first one first")


def error_content(detail: str, field: str | None, status_code: int) -> dict[str, Any]:
    """The JSON body of an error answer; a 422 always carries `errors`."""
    body: dict[str, Any] = {"detail": detail, "field": field}
    if status_code == UNPROCESSABLE:
        body["errors"] = [detail]
    return body


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for a route: the error codes it answers, with their body shape."""
    described = {
        400: "bad request (a malformed value or token)",
        401: "missing or invalid API key",
        403: "the API key lacks a scope this route needs",
        404: "not found",
        409: "conflict with the resource's state",
        410: "gone (deleted, or unknown request: resubmit)",
        413: "request body larger than the configured limit",
        503: "not applied in time; retry",
    }
    return {code: {"model": ErrorBody, "description": described[code]} for code in codes}


class ApiError(Exception):
    def __init__(self, status_code: int, detail: str, *, field: str | None = None) -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail
        self.field = field


def not_found(detail: str, *, field: str | None = None) -> ApiError:
    return ApiError(status.HTTP_404_NOT_FOUND, detail, field=field)


def conflict(detail: str, *, field: str | None = None) -> ApiError:
    return ApiError(status.HTTP_409_CONFLICT, detail, field=field)


def unprocessable(detail: str, *, field: str | None = None) -> ApiError:
    return ApiError(UNPROCESSABLE, detail, field=field)


def field_path(loc: Sequence[Any]) -> str:
    parts = list(loc)
    if parts and parts[0] in _LOCATIONS:
        parts = parts[1:]
    return ".".join(str(p) for p in parts)


def validation_message(error: dict[str, Any]) -> tuple[str, str | None]:
    """(message naming the field, dotted field) of one pydantic error."""
    field = field_path(error.get("loc", ())) or None
    msg = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
    if error.get("type") == "extra_forbidden":
        return f"unknown field {field}", field
    if error.get("type") == "missing":
        if field is None:  # the body itself (loc is just ("body",))
            return "body: a JSON request body is required", "body"
        return f"{field}: field required", field
    if field is None:
        # Model-level rules already name their field in the message; take it from there when
        # the first word looks like a field path (dotted or snake_case), not a plain word.
        match = _LEADING_FIELD.match(msg)
        if match and ("." in match[1] or "_" in match[1]):
            return msg, match[1]
        return msg, None
    return f"{field}: {msg}", field


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(error_content(exc.detail, exc.field, exc.status_code), exc.status_code)

    @app.exception_handler(sqlalchemy.exc.OperationalError)
    async def _database_away(
        request: Request, exc: sqlalchemy.exc.OperationalError
    ) -> JSONResponse:
        # PostgreSQL restarting or unreachable: loopstream's failure, and a retry may pass.
        detail = "the read models' database is unavailable; retry shortly"
        return JSONResponse(error_content(detail, None, 503), 503, headers={"Retry-After": "1"})

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        detail, field = validation_message(errors[0]) if errors else ("invalid request", None)
        # All errors are kept (JSON-safe) for clients that want them; `detail` is the first.
        return JSONResponse(
            {
                "detail": detail,
                "field": field,
                "errors": [validation_message(e)[0] for e in errors],
            },
            UNPROCESSABLE,
        )
