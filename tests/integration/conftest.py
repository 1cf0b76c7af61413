"""Integration tests run against the real local stack: Kafka, PostgreSQL and S3.

`make test` starts the stack before pytest and stops it after. Run alone, these tests need
`loopstream stack up` first; they fail (never skip) when the stack is not there, so a green run
always means the real services were exercised.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from infra.settings import Settings, get_settings
from infra.stack import LocalStack


@pytest.fixture(scope="session")
def settings() -> Settings:
    settings = get_settings()
    down = [s.name for s in LocalStack(settings).status() if not s.ready]
    if down:
        pytest.fail(
            f"local stack not ready ({', '.join(down)}): run `loopstream stack up` "
            "(or `make test`, which starts and stops it)",
            pytrace=False,
        )
    return settings


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/integration" in str(item.path):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def services(settings: Settings) -> Iterator[Settings]:
    """loopstream's own processes (processor, projections, workers, API) for end-to-end tests.

    Started here when not running, and then stopped at the end; left alone when they were.
    """
    from api.bootstrap import ensure_default_key
    from infra.services import services_down, services_status, services_up

    started_here = not all(services_status(settings).values())
    services_up(settings)
    ensure_default_key(settings)
    yield settings
    if started_here:
        services_down(settings)


@pytest.fixture(scope="session")
def api_key(services: Settings) -> str:
    """The default workspace's admin key (issued by the `services` fixture)."""
    from api.bootstrap import ensure_default_key

    return ensure_default_key(services)


@pytest.fixture
def loop(services: Settings) -> tuple[Any, str, str, str]:
    from api.kafka_driver import new_loop

    return new_loop(services)
