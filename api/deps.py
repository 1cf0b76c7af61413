"""Typed dependencies of the routes (FastAPI template style: `XDep = Annotated[X, Depends(...)]`).

Settings come through cached dependencies that `create_app` overrides with the settings it was
given, so tests and tools run an app against any stack without touching the environment.
"""

from __future__ import annotations

import threading
from typing import Annotated

from fastapi import Depends, Header, Path, Query, Request
from sqlalchemy import Engine

from api.config import ApiSettings
from api.queries import ReadModels
from api.result_feed import ResultFeed
from api.submit import SentRequests, Submitter
from commands.bus import CommandBus
from commands.loops import RESOURCE_ID
from events.limits import MAX_PAGE_OFFSET, RequestKey
from infra.s3 import ObjectStore
from infra.settings import Settings
from projections.db import get_engine
from projections.health import wait_until_caught_up


# The settings an app was made with (create_app(settings=...)), read from the app itself. Not
# through `app.dependency_overrides`: with any override set, FastAPI re-analyses every
# dependency's signature on every request (~0.2 ms each, ~4 ms a request here).
async def app_settings(request: Request) -> Settings:
    return request.app.state.loopstream.settings  # type: ignore[no-any-return]


async def app_api_settings(request: Request) -> ApiSettings:
    return request.app.state.loopstream.api_settings  # type: ignore[no-any-return]


SettingsDep = Annotated[Settings, Depends(app_settings)]
ApiSettingsDep = Annotated[ApiSettings, Depends(app_api_settings)]


class AppState:
    """Process-wide clients, made on first use (a Kafka producer is not free to create)."""

    def __init__(self, settings: Settings, api_settings: ApiSettings) -> None:
        self.settings = settings
        self.api_settings = api_settings
        self.sent = SentRequests(api_settings.request_retention_s)
        self.results = ResultFeed(settings)
        self._bus: CommandBus | None = None
        self._store: ObjectStore | None = None
        self._lock = threading.Lock()

    @property
    def bus(self) -> CommandBus:
        with self._lock:
            if self._bus is None:
                self._bus = CommandBus(self.settings)
            return self._bus

    @property
    def store(self) -> ObjectStore:
        with self._lock:
            if self._store is None:
                self._store = ObjectStore.from_settings(self.settings)
            return self._store

    def close(self) -> None:
        self.results.stop()
        if self._bus is not None:
            self._bus.producer.flush(5.0)


async def get_state(request: Request) -> AppState:  # async: no threadpool hop for an attribute
    return request.app.state.loopstream  # type: ignore[no-any-return]


StateDep = Annotated[AppState, Depends(get_state)]


# The dependencies below only build objects (no I/O): async, so FastAPI calls them on the event
# loop instead of sending each to its threadpool (a hop of ~0.1-1 ms per request each).
async def get_db_engine(settings: SettingsDep) -> Engine:
    return get_engine(settings)


EngineDep = Annotated[Engine, Depends(get_db_engine)]


async def get_read_models(
    settings: SettingsDep, api_settings: ApiSettingsDep, engine: EngineDep
) -> ReadModels:
    def catch_up() -> bool:
        return wait_until_caught_up(
            settings, engine, settings.read_schema, timeout_s=api_settings.read_your_writes_wait_s
        )

    # On the engine, not one connection held for the request: a long-poll (futures) would hold
    # it for up to a minute, and a few dozen of them would drain the pool for every request.
    return ReadModels(engine, settings.read_schema, catch_up=catch_up)


ReadDep = Annotated[ReadModels, Depends(get_read_models)]


async def get_submitter(state: StateDep, reads: ReadDep) -> Submitter:
    return Submitter(state.bus, state.sent, reads)


SubmitterDep = Annotated[Submitter, Depends(get_submitter)]


async def get_store(state: StateDep) -> ObjectStore:
    return state.store


StoreDep = Annotated[ObjectStore, Depends(get_store)]

# The idempotency key may come as a header (as Stripe's and Tinker's clients send it) or as a
# `request_id` query parameter; bodies may carry `request_id` too (see api/models.py).
IdempotencyHeader = Annotated[
    RequestKey | None, Header(alias="Idempotency-Key", description="idempotency key")
]
RequestIdQuery = Annotated[
    RequestKey | None, Query(alias="request_id", description="idempotency key")
]

# Path ids. Runs, samplers and checkpoints are named by the API (commands.loops.RESOURCE_ID);
# sessions and requests may come from other producers, so any storable key of up to 200 chars.
SessionIdPath = Annotated[RequestKey, Path(description="session id")]
RunIdPath = Annotated[str, Path(pattern=RESOURCE_ID, description="run id")]
SamplerIdPath = Annotated[str, Path(pattern=RESOURCE_ID, description="sampler id")]
CheckpointIdPath = Annotated[str, Path(pattern=RESOURCE_ID, description="checkpoint id")]
RequestIdPath = Annotated[RequestKey, Path(description="request id (idempotency key)")]
# Pagination: an offset past any real listing is refused before it reaches PostgreSQL.
OffsetQuery = Annotated[int, Query(ge=0, le=MAX_PAGE_OFFSET, description="rows to skip")]
