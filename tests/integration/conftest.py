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

    Started here when none was running, and then stopped at the end; left running when any
    was (a missing one is started: someone restarting one service must not lose the rest).
    """
    from api.bootstrap import ensure_default_key
    from infra.services import services_down, services_status, services_up

    started_here = not any(services_status(settings).values())
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


@pytest.fixture(scope="module")
def service_client(services: Settings, api_key: str) -> Iterator[Any]:
    """The official tinker SDK's ServiceClient on the services' Tinker door (one per module)."""
    import tinker

    from api.config import get_api_settings

    api = get_api_settings()
    client = tinker.ServiceClient(base_url=f"http://{api.api_host}:{api.api_port}", api_key=api_key)
    yield client
    client.close("success").result()


@pytest.fixture(scope="module")
def training_client(service_client: Any) -> Any:
    """A full-parameter training client on the tiny model (one per module)."""
    return service_client.create_lora_training_client(
        base_model="loopstream/tiny-llama", rank=0
    ).result()


@pytest.fixture(scope="session")
def served_model(services: Settings) -> Iterator[dict[str, Any]]:
    """One deployment of the tiny base model with one replica, shared by the gateway's test
    files (OpenAI routes, async, hostile input) of a pytest process: every replica is a process
    that imports torch (~10 s of CPU here). Tests that change a deployment's state (deactivate,
    kill its replica) make their own. Deleted at the end, so its replica stops."""
    import uuid

    from api.client import ServiceClient
    from api.deploy_client import DeploymentsClient

    with ServiceClient() as service:
        deployments = DeploymentsClient(service)
        model = deployments.create_model(
            base_model="loopstream/tiny-llama",
            name=f"served-{uuid.uuid4().hex[:8]}",
            deployment={"min_replica": 1, "max_replica": 1},
        ).result(60)
        try:
            yield model
        finally:
            deployments.delete(model["model_id"], model["deployment_id"]).result(60)
