"""The Loops REST API v1: commands in (through Kafka), queries out (from the read models).

`create_app(settings)` builds the app; `python -m api.app` (or `loopstream api`) serves it with
uvicorn on `ApiSettings.api_host:api_port`. OpenAPI is at /docs and /openapi.json.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from api.boundary import InputBoundary
from api.config import ApiSettings, get_api_settings, refuse_public_defaults
from api.deps import AppState
from api.errors import ErrorBody, ValidationErrorBody, install_error_handlers
from api.routes import (
    api_keys,
    checkpoints,
    futures,
    runs,
    sampling,
    sessions,
    training,
    weight_sync,
)
from api.routes import deployments as deployments_route
from api.routes import health as health_route
from api.routes import secrets as secrets_route
from api.tinker import rest as tinker_rest
from api.tinker import routes as tinker_routes
from api.tinker.hf_cache import publish_own_tokenizers
from infra.settings import Settings, get_settings

log = logging.getLogger("loopstream.api")


def create_app(
    settings: Settings | None = None, api_settings: ApiSettings | None = None
) -> FastAPI:
    settings = settings or get_settings()
    api_settings = api_settings or get_api_settings()
    refuse_public_defaults(settings, api_settings)
    state = AppState(settings, api_settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.results.start()
        _publish_tokenizers(settings)
        yield
        state.close()  # flush anything the producer still holds

    app = FastAPI(
        title="loopstream Loops API",
        version="1",
        description="Sessions, runs (trainers), samplers, training and sampling futures and "
        "checkpoints of RL post-training; every change is an event on Kafka.",
        lifespan=lifespan,
    )
    app.state.loopstream = state
    install_error_handlers(app)
    app.add_middleware(InputBoundary, max_body_bytes=api_settings.api_max_body_bytes)
    for module in (sessions, runs, training, sampling, futures, checkpoints):
        app.include_router(module.router)
    app.include_router(weight_sync.runs_router)
    app.include_router(weight_sync.samplers_router)
    app.include_router(tinker_routes.router)  # the Tinker wire protocol over the same commands
    app.include_router(tinker_rest.router)  # and the Tinker RestClient's reads and deletes
    app.include_router(health_route.router)  # GET /health: projection failures and lag
    app.include_router(api_keys.router)  # /v1/api_keys: admin keys of the caller's workspace
    app.include_router(secrets_route.router)  # /v1/secrets: admin, values never shown again
    app.include_router(deployments_route.router)  # /v1/models: models and their deployments

    @app.get("/healthz", tags=["health"])
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _publish_tokenizers(settings: Settings) -> None:
    """So that the SDK's SamplingClient.get_tokenizer() finds loopstream's own models' tokenizers
    by name, offline, on this machine (api/tinker/hf_cache.py). A cache that cannot be written
    costs that call only, not the API."""
    try:
        publish_own_tokenizers(settings)
    except Exception:  # a read-only home, no torch to make the tiny model with, ...
        log.warning("tokenizers not written to the Hugging Face cache", exc_info=True)


# The error answers of the Tinker wire routes (api/tinker/routes.py raises them).
_TINKER_ERRORS = {
    "400": "bad request",
    "401": "missing or invalid API key",
    "404": "not found",
    "410": "unknown request, resubmit",
    "503": "not applied in time; retry",
}


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's OpenAPI with the error bodies this API really sends: every 422 is
    `ValidationErrorBody` (not FastAPI's HTTPValidationError), and every other error an
    `ErrorBody`. The Tinker routes' own errors (api/tinker/routes.py) are declared here."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    schema = get_openapi(
        title=app.title, version=app.version, description=app.description, routes=app.routes
    )
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for model in (ErrorBody, ValidationErrorBody):
        components[model.__name__] = model.model_json_schema(
            ref_template="#/components/schemas/{model}"
        )
    components.pop("HTTPValidationError", None)
    components.pop("ValidationError", None)

    def error(description: str, model: type = ErrorBody) -> dict[str, Any]:
        ref = {"$ref": f"#/components/schemas/{model.__name__}"}
        return {"description": description, "content": {"application/json": {"schema": ref}}}

    for path, operations in schema.get("paths", {}).items():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            # Every route: the boundary refuses bad text or numbers in path, query or body.
            responses["422"] = error("a value is refused (names the field)", ValidationErrorBody)
            if "requestBody" in operation:
                responses["413"] = error("request body larger than the configured limit")
            if path.startswith("/api/v1/"):
                for code, description in _TINKER_ERRORS.items():
                    responses.setdefault(code, error(description))
            for code, response in responses.items():
                if code.startswith(("4", "5")) and "content" not in response:
                    response["content"] = error(response.get("description", ""))["content"]
    app.openapi_schema = schema
    return schema


def serve(
    settings: ApiSettings | None = None, *, announce: Callable[[str], None] | None = None
) -> None:
    """Run the API until stopped; `announce` is told once it listens (uvicorn's own line is
    below the `warning` level it logs at)."""
    import uvicorn

    from infra.logs import configure_logging

    configure_logging()
    api_settings = settings or get_api_settings()
    url = f"http://{api_settings.api_host}:{api_settings.api_port}"

    class Server(uvicorn.Server):
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets=sockets)
            if self.started:
                # Said in the service's log too, so `loopstream logs api` shows when it came up.
                line = f"listening on {url} (OpenAPI at {url}/docs)"
                log.info(line)
                if announce is not None:
                    announce(line)

    config = uvicorn.Config(
        create_app(api_settings=api_settings),
        host=api_settings.api_host,
        port=api_settings.api_port,
        log_level="warning",
    )
    Server(config).run()


if __name__ == "__main__":
    serve()
