"""Hostile input on /v1/models, through an in-process API against the real stack: what the API
can see at once is a 400 naming the field, never a 202 for a command bound to be refused."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.bootstrap import issue_key
from events.envelope import DEFAULT_WORKSPACE
from infra.settings import Settings

BASE = {"base_model": "loopstream/tiny-llama"}


@pytest.fixture(scope="module")
def app(settings: Settings, services: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as client:
        yield client


@pytest.fixture(scope="module")
def headers(settings: Settings) -> dict[str, str]:
    key = issue_key(settings, workspace_id=DEFAULT_WORKSPACE, scopes=("admin",), name="hostile")
    return {"Authorization": f"Api-Key {key}"}


def test_min_replica_above_max_replica_is_a_400_naming_the_field(
    app: TestClient, headers: dict[str, str]
) -> None:
    body = {**BASE, "deployment": {"min_replica": 5, "max_replica": 2}}
    answer = app.post("/v1/models", json=body, headers=headers)
    assert answer.status_code == 400, answer.text
    assert answer.json()["field"] == "deployment.min_replica"
    assert "max_replica" in answer.json()["detail"]

    model = app.post("/v1/models", json=BASE, headers=headers)
    assert model.status_code == 202, model.text
    model_id = model.json()["model_id"]
    # The model is created asynchronously: wait until its route finds it.
    for _ in range(100):
        if app.get(f"/v1/models/{model_id}", headers=headers).status_code == 200:
            break
        time.sleep(0.1)
    answer = app.post(
        f"/v1/models/{model_id}/deployments",
        json={"min_replica": 3, "max_replica": 1},
        headers=headers,
    )
    assert answer.status_code == 400, answer.text
    assert answer.json()["field"] == "min_replica"
    # Only the default max (1) given: min 2 is above it.
    answer = app.post(f"/v1/models/{model_id}/deployments", json={"min_replica": 2},
                      headers=headers)  # fmt: skip
    assert answer.status_code == 400, answer.text
    assert answer.json()["field"] == "min_replica"


def _created(app: TestClient, headers: dict[str, str], path: str, body: dict) -> str:
    answer = app.post(path, json=body, headers=headers)
    assert answer.status_code == 202, answer.text
    ids = answer.json()
    deployment = f"/v1/models/{ids['model_id']}/deployments/{ids['deployment_id']}"
    for _ in range(100):
        if app.get(deployment, headers=headers).status_code == 200:
            return deployment
        time.sleep(0.1)
    raise AssertionError(f"{deployment} never appeared")


def test_a_resource_change_the_aggregate_would_refuse_is_a_400_not_a_202_for_a_phantom_copy(
    app: TestClient, headers: dict[str, str]
) -> None:
    # A development deployment is overwritten, never copied: the 202 named a new deployment
    # that would never exist.
    dev = _created(app, headers, "/v1/models", {**BASE, "deployment": {"development": True}})
    answer = app.patch(f"{dev}/resources", json={"resources": {"accelerator": "T4"}},
                       headers=headers)  # fmt: skip
    assert answer.status_code == 400, answer.text
    assert answer.json()["field"] == "deployment_id"
    # The instance type it already runs on (CPU:1x2, the defaults) is no change.
    published = _created(app, headers, "/v1/models", {**BASE, "deployment": {}})
    answer = app.patch(f"{published}/resources", json={"resources": {"cpu": "1"}},
                       headers=headers)  # fmt: skip
    assert answer.status_code == 400, answer.text
    assert answer.json()["field"] == "resources"
    answer = app.patch(f"{published}/resources", json={"resources": {"accelerator": "T4"}},
                       headers=headers)  # fmt: skip
    assert answer.status_code == 202, answer.text
