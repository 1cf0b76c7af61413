"""Access on the real stack: /v1/api_keys (admin), the 401s and 403s of authentication,
revocation through the projection, the CLI's keys commands, and the processor refusing a
command that names a workspace that does not exist."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.bootstrap import issue_key, key_row_authenticates
from commands.bus import CommandBus
from infra.settings import Settings
from tests.integration.kafka_helpers import command, wait_for_results


@pytest.fixture(scope="module")
def client(services: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(services)) as client:
        yield client


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Api-Key {key}"}


def wait_until_authenticates(settings: Settings, key: str, *, expected: bool = True) -> None:
    deadline = time.monotonic() + 30
    while key_row_authenticates(settings, key) != expected:
        assert time.monotonic() < deadline, "the projection never caught up"
        time.sleep(0.05)


def test_an_admin_route_refuses_no_key_a_malformed_key_and_an_unknown_key(
    client: TestClient, api_key: str
) -> None:
    cases = {
        "no key": ({}, "no API key"),
        "malformed": ({"Authorization": "Api-Key not-a-key"}, "malformed API key"),
        "unknown scheme": ({"Authorization": "Basic dXNlcjpwYXNz"}, "malformed API key"),
        "unknown": (auth("tml-" + "0" * 16 + "_" + "x" * 43), "unknown or revoked API key"),
        "wrong secret": (auth(api_key.split("_")[0] + "_" + "y" * 43), "unknown or revoked"),
    }
    for name, (headers, message) in cases.items():
        answer = client.get("/v1/api_keys", headers=headers)
        assert answer.status_code == 401, name
        assert message in answer.json()["detail"] and answer.json()["field"] == "authorization"
    assert client.get("/v1/api_keys", headers=auth(api_key)).status_code == 200
    assert client.get("/v1/api_keys", headers={"X-API-Key": api_key}).status_code == 200
    assert client.get("/v1/api_keys", headers={"Authorization": f"Bearer {api_key}"}).is_success


def test_a_created_key_is_shown_once_listed_without_its_secret_and_revoked_for_good(
    client: TestClient, services: Settings, api_key: str
) -> None:
    created = client.post(
        "/v1/api_keys", json={"name": "ci", "scopes": ["train"]}, headers=auth(api_key)
    )
    assert created.status_code == 202, created.text
    issued = created.json()
    key, key_id = issued["key"], issued["key_id"]
    assert key.startswith(f"tml-{key_id}_") and issued["scopes"] == ["train"]
    wait_until_authenticates(services, key)

    listed = client.get("/v1/api_keys", headers=auth(api_key)).json()["data"]
    (row,) = [r for r in listed if r["key_id"] == key_id]
    assert row["prefix"] == f"tml-{key_id}" and row["revoked_at"] is None
    assert key.split("_", 1)[1] not in created.request.content.decode() + str(listed)
    assert "key_hash" not in row

    # A train-only key cannot manage keys: 403 naming the scope.
    forbidden = client.get("/v1/api_keys", headers=auth(key))
    assert forbidden.status_code == 403 and "`admin`" in forbidden.json()["detail"]

    revoked = client.delete(f"/v1/api_keys/{key_id}", headers=auth(api_key))
    assert revoked.status_code == 202, revoked.text
    started = time.monotonic()
    # The contract: a revocation takes effect within a second (its projection's lag plus at most
    # `api_key_cache_s` during which the API reuses a key's row), after which every request with
    # the key is refused.
    wait_until_authenticates(services, key, expected=False)
    while (answer := client.get("/v1/api_keys", headers=auth(key))).status_code != 401:
        assert time.monotonic() - started < 1.0, "a revoked key still worked after a second"
        time.sleep(0.02)
    print(f"revocation took effect after {time.monotonic() - started:.3f} s")
    assert "revoked" in answer.json()["detail"]
    again = client.delete(f"/v1/api_keys/{key_id}", headers=auth(api_key))
    assert again.status_code == 409


def test_a_key_of_another_workspace_is_not_found_for_revocation(
    client: TestClient, services: Settings, api_key: str
) -> None:
    workspace = f"ws-{uuid.uuid4().hex[:10]}"
    created = command("CreateWorkspace", f"workspace:{workspace}", {"name": "other"})
    CommandBus(services).send(created, to="commands")
    assert wait_for_results(services, [created.command_id])[created.command_id].status == (
        "accepted"
    )
    other_key = issue_key(services, workspace_id=workspace, scopes=("admin",))
    other_id = other_key.split("_")[0].removeprefix("tml-")
    assert client.delete(f"/v1/api_keys/{other_id}", headers=auth(api_key)).status_code == 404
    mine = client.get("/v1/api_keys", headers=auth(other_key)).json()["data"]
    assert [r["key_id"] for r in mine] == [other_id]


def test_a_command_naming_a_workspace_that_does_not_exist_is_rejected(
    services: Settings,
) -> None:
    ghost = f"ghost-{uuid.uuid4().hex[:10]}"
    sent = command(
        "CreateSession", f"s-{uuid.uuid4().hex[:8]}", {"base_model": "tiny"}, workspace_id=ghost
    )
    CommandBus(services).send(sent, to="commands")
    result = wait_for_results(services, [sent.command_id])[sent.command_id]
    assert result.status == "rejected" and result.field == "workspace_id"
    assert result.reason == f"workspace {ghost} does not exist"


def test_keys_create_list_and_revoke_through_the_cli(services: Settings) -> None:
    def cli(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "api.cli", "keys", *args],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    key = cli("create", "--scope", "infer", "--name", "cli-test").strip().splitlines()[-1]
    key_id = key.split("_")[0].removeprefix("tml-")
    assert key_row_authenticates(services, key)
    assert key_id[:8] in cli("list")
    cli("revoke", key_id, "--reason", "test")
    wait_until_authenticates(services, key, expected=False)
