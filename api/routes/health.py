"""`GET /health`: open and cheap, for load balancers and operators.

200 always (it answers, so the API is up); `status` says whether the read models can be trusted:
"degraded" when the projection has recorded records of the log it could not apply (see
`loopstream projections status` for which), or when PostgreSQL did not answer.
"""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel, Field

from api.deps import EngineDep, SettingsDep
from projections.health import projection_health

router = APIRouter(tags=["health"])


class HealthPublic(BaseModel):
    status: Literal["ok", "degraded"]
    projection: str = Field(description="the read models' projection (= PostgreSQL schema)")
    projection_failures: int | None = Field(
        description="log records the projection could not apply; null: PostgreSQL did not answer"
    )
    lag: int | None = Field(
        description="records the projection is behind its topics, about; null: unknown"
    )


@router.get("/health", response_model=HealthPublic)
def health(settings: SettingsDep, engine: EngineDep) -> HealthPublic:
    # A plain `def`: FastAPI runs it on its thread pool, the queries block.
    report = projection_health(settings, engine, settings.read_schema)
    return HealthPublic(
        status=report.status,
        projection=report.projection,
        projection_failures=report.failures,
        lag=report.lag,
    )
