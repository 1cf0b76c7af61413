"""The inference gateway app: authenticated, model-scoped routes to deployment replicas.

    python -m api.gateway            (or `loopstream services up`, which starts it)

Routes (seed 003's, under a local `/model/{model_id}` prefix since loopback has no subdomains;
a `Host: model-{model_id}.<anything>` header with the seed's bare paths works too):

    POST /model/{model_id}/deployment/{deployment_id}/predict
    POST /model/{model_id}/development/predict
    POST /model/{model_id}/deployment/{deployment_id}/async_predict  (async_requests.py)
    POST /model/{model_id}/development/async_predict
    GET  /async_request/{request_id}
    GET  /metrics                                   Prometheus, no key needed (loopback)

Keys are the workspace API keys of the Loops API (`Authorization: Api-Key <key>`, or `Bearer`
for OpenAI clients) with the `infer` scope; another workspace's model is a 404, as is a
deactivated or deleted deployment (seed 003).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, FastAPI, Request, status
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.types import ASGIApp, Receive, Scope, Send

from api.auth import InferCaller
from api.boundary import InputBoundary
from api.config import ApiSettings, get_api_settings, refuse_public_defaults
from api.deploy_queries import DeploymentReadDep, DeploymentReads
from api.deps import AppState
from api.errors import ApiError, install_error_handlers, not_found
from api.gateway.async_requests import AsyncWorker
from api.gateway.async_requests import router as async_router
from api.gateway.models import PredictInput, PredictOutput
from api.gateway.replicas import NoReplica, NotServing, ReplicaPool, Slot
from api.gateway.traffic import TrafficRecorder
from infra.settings import Settings, get_settings
from projections.db import get_engine

log = logging.getLogger("loopstream.gateway")

# A deployment's row is reused this long: how late a deactivation can take effect here.
DEPLOYMENT_CACHE_S = 0.5
_HOST = re.compile(r"^model-(?P<model_id>[a-z0-9]{1,64})\.", re.IGNORECASE)


@dataclass(frozen=True)
class Target:
    model_id: str
    deployment_id: str
    workspace_id: str


class GatewayState:
    def __init__(self, settings: Settings, api_settings: ApiSettings) -> None:
        self.settings = settings
        self.api_settings = api_settings
        self.pool = ReplicaPool(
            get_engine(settings), settings.read_schema, settings.replica_namespace
        )
        self.traffic = TrafficRecorder(
            settings,
            in_flight=self.pool.in_flight,
            queued=self.pool.queued,
            parked=lambda d: self.pool.queued(d) if not self.pool.slots.get(d) else 0,
        )
        self.pool.on_park = self.traffic.parked
        self._deployments: dict[tuple[str, str, str], tuple[float, Any]] = {}
        self.reads = DeploymentReads(get_engine(settings), settings.read_schema)

    async def still_serving(self, target: Target) -> bool:
        """Whether the target deployment is still active (read afresh, off the event loop)."""

        def read() -> bool:
            row = self.reads.deployment(
                target.model_id, target.deployment_id, workspace=target.workspace_id
            )
            return row is not None and row["status"] == "ACTIVE"

        try:
            return await asyncio.to_thread(read)
        except Exception:  # the database away for a moment: keep waiting, do not fail the call
            return True

    def cached_deployment(self, workspace: str, model_id: str, deployment_id: str | None) -> bool:
        """Whether `deployment_row` would answer from memory (no database round trip)."""
        cached = self._deployments.get((workspace, model_id, deployment_id or ""))
        return cached is not None and time.monotonic() - cached[0] < DEPLOYMENT_CACHE_S

    def deployment_row(
        self, reads: DeploymentReads, model_id: str, deployment_id: str | None, workspace: str
    ) -> Any:
        key = (workspace, model_id, deployment_id or "")
        cached = self._deployments.get(key)
        if cached is not None and time.monotonic() - cached[0] < DEPLOYMENT_CACHE_S:
            return cached[1]
        if deployment_id is None:
            row = reads.development_deployment(model_id, workspace=workspace)
        else:
            row = reads.deployment(model_id, deployment_id, workspace=workspace)
        if len(self._deployments) > 10_000:
            self._deployments.clear()
        self._deployments[key] = (time.monotonic(), row)
        return row


class HostRouting:
    """`Host: model-<id>.<domain>` + `/deployment/<d>/predict` -> `/model/<id>/deployment/...`:
    the seed's URLs once a DNS name points at the gateway."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not scope["path"].startswith(("/model/", "/metrics")):
            host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
            match = _HOST.match(host)
            if match and scope["path"].startswith(("/deployment/", "/development/",
                                                   "/production/")):  # fmt: skip
                path = f"/model/{match['model_id'].lower()}{scope['path']}"
                scope = {**scope, "path": path, "raw_path": path.encode()}
        await self.app(scope, receive, send)


def create_gateway_app(
    settings: Settings | None = None, api_settings: ApiSettings | None = None
) -> FastAPI:
    settings = settings or get_settings()
    api_settings = api_settings or get_api_settings()
    refuse_public_defaults(settings, api_settings)
    # The Loops API's state carries what authentication reads (settings, key hash secret).
    loops_state = AppState(settings, api_settings)
    gateway = GatewayState(settings, api_settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        from infra.ray_cluster import connect_ray

        await asyncio.to_thread(connect_ray, settings)
        await gateway.pool.start()
        gateway.traffic.start()
        await async_worker.start()
        yield
        await async_worker.stop()
        await gateway.pool.stop()
        gateway.traffic.stop()

    app = FastAPI(
        title="loopstream inference gateway",
        version="1",
        description="Predict on deployments of models; every route needs an API key with the "
        "`infer` scope.",
        lifespan=lifespan,
    )
    app.state.loopstream = loops_state
    app.state.gateway = gateway
    app.state.async_worker = async_worker = AsyncWorker(app, settings)
    install_error_handlers(app)
    app.add_middleware(InputBoundary, max_body_bytes=api_settings.api_max_body_bytes)
    app.add_middleware(HostRouting)
    app.include_router(router)
    app.include_router(async_router)
    from api.gateway.openai_routes import router as openai_router  # imports this module

    app.include_router(openai_router)

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        gateway.traffic.set_replica_states(gateway.pool.states)
        return Response(generate_latest(gateway.traffic.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


router = APIRouter(tags=["predict"])


def gateway_of(request: Request) -> GatewayState:
    return request.app.state.gateway  # type: ignore[no-any-return]


def resolve(
    request: Request,
    reads: DeploymentReads,
    caller_workspace: str,
    model_id: str,
    deployment_id: str | None,
) -> Target:
    """The deployment a request names, if the caller's workspace has it and it serves."""
    row = gateway_of(request).deployment_row(reads, model_id, deployment_id, caller_workspace)
    if row is None:
        what = f"deployment {deployment_id}" if deployment_id else "development deployment"
        raise not_found(f"{what} of model {model_id} not found",
                        field="deployment_id" if deployment_id else "model_id")  # fmt: skip
    if row["status"] != "ACTIVE":
        raise not_found(
            f"deployment {row['deployment_id']} of model {model_id} is deactivated: "
            "activate it to serve requests",
            field="deployment_id",
        )
    return Target(model_id, row["deployment_id"], row["workspace_id"])


async def call_replica(
    request: Request, target: Target, body: dict[str, Any], *, route: str, priority: str = "sync"
) -> dict[str, Any]:
    """Run one prediction on a replica of the target: park while there is none, retry once on
    another replica when the chosen one dies or drains under the call."""
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    from gpu_workers.engine.types import InvalidInputError
    from gpu_workers.replica import ReplicaUnavailable

    gateway = gateway_of(request)
    settings = gateway.settings
    gateway.traffic.begin(target.deployment_id, target.model_id, target.workspace_id)
    started = time.perf_counter()
    code = 200
    try:
        for attempt in (1, 2):
            try:
                slot: Slot = await gateway.pool.acquire(
                    target.deployment_id,
                    wait_s=settings.gateway_cold_start_wait_s,
                    priority=priority,  # type: ignore[arg-type]
                    still_serving=lambda: gateway.still_serving(target),
                )
            except NotServing:
                code = 404
                raise not_found(
                    f"deployment {target.deployment_id} of model {target.model_id} stopped "
                    "serving (deactivated or deleted) while the request waited",
                    field="deployment_id",
                ) from None
            except NoReplica:
                code = 503
                raise ApiError(
                    status.HTTP_503_SERVICE_UNAVAILABLE,
                    f"no replica of deployment {target.deployment_id} became ready within "
                    f"{settings.gateway_cold_start_wait_s:g} s; retry later",
                    field="deployment_id",
                ) from None
            dead = False
            try:
                answer: dict[str, Any] = await slot.handle.predict.remote(body)
                return answer
            except RayTaskError as exc:
                cause = exc.cause if hasattr(exc, "cause") else exc
                if isinstance(cause, InvalidInputError):
                    code = 400
                    raise ApiError(400, str(cause), field=cause.field) from None
                if isinstance(cause, ReplicaUnavailable):
                    # Draining (deactivated, scaled down): route around it, once.
                    dead = True
                    if attempt == 1:
                        continue
                    code = 503
                    raise ApiError(
                        status.HTTP_503_SERVICE_UNAVAILABLE,
                        f"replica {slot.replica_id} stopped taking requests: {cause}; retry later",
                    ) from None
                code = 500
                raise ApiError(500, f"replica {slot.replica_id} failed: {cause}") from None
            except (RayActorError, ray.exceptions.ActorDiedError) as exc:
                dead = True
                if attempt == 1:
                    log.warning("replica died under a call; retrying once",
                                extra={"replica_id": slot.replica_id})  # fmt: skip
                    continue
                code = 503
                raise ApiError(
                    status.HTTP_503_SERVICE_UNAVAILABLE,
                    f"replica {slot.replica_id} died during the request and the retry: {exc}"
                    "; retry later",
                ) from None
            finally:
                await gateway.pool.release(slot, dead=dead)
        raise AssertionError("unreachable")
    except ApiError as exc:
        code = exc.status_code
        raise
    except Exception:
        code = 500
        raise
    finally:
        gateway.traffic.finished(target.deployment_id, route=route, status=code,
                                 seconds=time.perf_counter() - started)  # fmt: skip


async def _predict(
    request: Request,
    reads: DeploymentReads,
    workspace: str,
    model_id: str,
    deployment_id: str | None,
    body: PredictInput,
) -> Response:
    gateway = gateway_of(request)
    if gateway.cached_deployment(workspace, model_id, deployment_id):
        target = resolve(request, reads, workspace, model_id, deployment_id)  # no I/O: inline
    else:
        target = await asyncio.to_thread(
            resolve, request, reads, workspace, model_id, deployment_id
        )
    answer = await call_replica(request, target, body.for_replica(), route="predict")
    fields = {k: v for k, v in answer.items() if k in PredictOutput.model_fields}
    output = PredictOutput(model_id=model_id, deployment_id=target.deployment_id, **fields)
    # Serialized once, here: returned as a model, FastAPI would validate and serialize it again.
    return Response(output.model_dump_json(), media_type="application/json")


@router.post("/model/{model_id}/deployment/{deployment_id}/predict", response_model=PredictOutput)
async def predict_deployment(
    request: Request,
    model_id: str,
    deployment_id: str,
    body: PredictInput,
    caller: InferCaller,
    reads: DeploymentReadDep,
) -> Response:
    """Predict on one deployment of the model (published or development)."""
    return await _predict(request, reads, caller.workspace_id, model_id, deployment_id, body)


@router.post("/model/{model_id}/development/predict", response_model=PredictOutput)
async def predict_development(
    request: Request, model_id: str, body: PredictInput, caller: InferCaller,
    reads: DeploymentReadDep,
) -> Response:  # fmt: skip
    """Predict on the model's development deployment."""
    return await _predict(request, reads, caller.workspace_id, model_id, None, body)


@router.post("/model/{model_id}/production/predict")
async def predict_production(model_id: str, caller: InferCaller) -> None:
    """Environments (and so production) are not built yet: a clear 404, not a guess."""
    raise not_found(
        f"model {model_id} has no production environment yet (environments and promotion are "
        "not built): call /model/{model_id}/deployment/{deployment_id}/predict",
        field="model_id",
    )


def serve() -> None:
    import uvicorn

    from infra.logs import configure_logging

    configure_logging()
    settings = get_settings()
    log.info("gateway listening",
             extra={"url": f"http://{settings.gateway_host}:{settings.gateway_port}"})  # fmt: skip
    uvicorn.run(
        create_gateway_app(settings),
        host=settings.gateway_host,
        port=settings.gateway_port,
        log_level="warning",
    )
