"""The Loops REST API v1: commands in (through Kafka), queries out (from the read models).

`create_app(settings)` builds the app; `python -m api.app` (or `loopstream api`) serves it with
uvicorn on `ApiSettings.api_host:api_port`. OpenAPI is at /docs and /openapi.json.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from api.config import ApiSettings, get_api_settings
from api.deps import AppState
from api.errors import install_error_handlers
from api.routes import checkpoints, futures, runs, sampling, sessions, training, weight_sync
from api.tinker import rest as tinker_rest
from api.tinker import routes as tinker_routes
from infra.settings import Settings, get_settings


def create_app(
    settings: Settings | None = None, api_settings: ApiSettings | None = None
) -> FastAPI:
    settings = settings or get_settings()
    api_settings = api_settings or get_api_settings()
    state = AppState(settings, api_settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.results.start()
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
    app.dependency_overrides[get_settings] = lambda: settings
    app.dependency_overrides[get_api_settings] = lambda: api_settings
    install_error_handlers(app)
    for module in (sessions, runs, training, sampling, futures, checkpoints):
        app.include_router(module.router)
    app.include_router(weight_sync.runs_router)
    app.include_router(weight_sync.samplers_router)
    app.include_router(tinker_routes.router)  # the Tinker wire protocol over the same commands
    app.include_router(tinker_rest.router)  # and the Tinker RestClient's reads and deletes

    @app.get("/healthz", tags=["health"])
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


def serve(settings: ApiSettings | None = None) -> None:
    import uvicorn

    from infra.logs import configure_logging

    configure_logging()
    api_settings = settings or get_api_settings()
    uvicorn.run(
        create_app(api_settings=api_settings),
        host=api_settings.api_host,
        port=api_settings.api_port,
        log_level="warning",
    )


if __name__ == "__main__":
    serve()
