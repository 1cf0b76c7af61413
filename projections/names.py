"""Names of a projection's things: topics it reads, its consumer group, its schemas.

A projection's name is also its live PostgreSQL schema and its key in `projection_positions`;
a replay builds `<name>__shadow`, and a swap briefly renames the live one `<name>__retired`.
"""

from __future__ import annotations

from infra.settings import Settings, checked_identifier
from projections.pipeline import ProjectionTopics

SHADOW_SUFFIX = "__shadow"
RETIRED_SUFFIX = "__retired"


def topics_for(settings: Settings) -> ProjectionTopics:
    return ProjectionTopics(
        events=settings.topic("events"), command_results=settings.topic("command-results")
    )


def group_id(settings: Settings, projection: str) -> str:
    return f"{settings.topic_prefix}.projection.{projection}"


def shadow_name(projection: str) -> str:
    return checked_identifier(f"{projection}{SHADOW_SUFFIX}")


def retired_name(projection: str) -> str:
    return checked_identifier(f"{projection}{RETIRED_SUFFIX}")
