"""Secrets through the real stack: REST create/list/update/delete, then the plaintext is looked
for everywhere it could leak (every Kafka topic of the prefix, every read-model table, the API's
answers, the service logs): it is nowhere, and after a delete the value is unrecoverable."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any

import httpx
import psycopg
import pytest
from confluent_kafka.admin import AdminClient

from api.bootstrap import ensure_default_key, issue_key
from api.config import get_api_settings
from commands.envelope import DEFAULT_WORKSPACE
from infra.secret_store import SecretNotFound, resolve_secret, schema_of
from infra.settings import Settings
from tests.integration.kafka_helpers import read_topic


@pytest.fixture(scope="module")
def admin(services: Settings) -> Iterator[httpx.Client]:
    key = ensure_default_key(services)
    with httpx.Client(
        base_url=get_api_settings().base_url,
        headers={"Authorization": f"Api-Key {key}"},
        timeout=60,
    ) as client:
        yield client


def _topics_of_prefix(settings: Settings) -> list[str]:
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap_servers})
    prefix = f"{settings.topic_prefix}."
    names = admin.list_topics(timeout=10).topics
    return sorted(name.removeprefix(prefix) for name in names if name.startswith(prefix))


def _kafka_holds(settings: Settings, needle: bytes) -> list[str]:
    found = []
    for topic in _topics_of_prefix(settings):
        for partition, key, value, headers in read_topic(settings, topic):
            blobs = [key or b"", value or b""] + [v or b"" for _, v in headers]
            if any(needle in blob for blob in blobs):
                found.append(f"{topic}[{partition}]")
    return found


def _read_models_hold(settings: Settings, needle: str) -> list[str]:
    """Every table of the read schema, each row as text (what a pg_dump of it would hold)."""
    found = []
    with psycopg.connect(settings.pg_conninfo) as conn:
        tables = conn.execute(
            "select tablename from pg_tables where schemaname = %s", (settings.read_schema,)
        ).fetchall()
        for (table,) in tables:
            hits = conn.execute(
                f"select count(*) from {settings.read_schema}.{table} t "
                "where strpos(t::text, %s) > 0",
                (needle,),
            ).fetchone()
            if hits and hits[0]:
                found.append(table)
    return found


def _stored_rows(settings: Settings, name: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(settings.pg_conninfo) as conn:
        return conn.execute(
            f"select version, sealed from {schema_of(settings)}.secret_values "
            "where workspace_id = %s and name = %s",
            (DEFAULT_WORKSPACE, name),
        ).fetchall()


def _logs_hold(settings: Settings, needle: bytes) -> list[str]:
    return [
        log.name
        for log in sorted((settings.data_dir / "logs").glob("*.log"))
        if needle in log.read_bytes()
    ]


def test_a_secret_value_is_nowhere_but_its_ciphertext_and_delete_destroys_it(
    services: Settings, admin: httpx.Client
) -> None:
    name = f"hf_token_{secrets.token_hex(4)}"
    first, second = f"hf_{secrets.token_urlsafe(24)}", f"hf_{secrets.token_urlsafe(24)}"
    answers: list[str] = []

    created = admin.post("/v1/secrets", json={"name": name, "value": first})
    answers.append(created.text)
    assert created.status_code == 201, created.text
    assert created.json()["version"] == 1
    assert resolve_secret(services, DEFAULT_WORKSPACE, name) == first

    again = admin.post("/v1/secrets", json={"name": name, "value": "another"})
    answers.append(again.text)
    assert again.status_code == 409 and again.json()["field"] == "name"

    updated = admin.put(f"/v1/secrets/{name}", json={"value": second})
    answers.append(updated.text)
    assert updated.status_code == 200, updated.text
    assert updated.json()["version"] == 2
    assert resolve_secret(services, DEFAULT_WORKSPACE, name) == second
    assert [row[0] for row in _stored_rows(services, name)] == [2]  # the old value is gone

    listing = admin.get("/v1/secrets")
    answers.append(listing.text)
    listed = {s["name"]: s for s in listing.json()["secrets"]}
    assert set(listed[name]) == {"name", "version", "created_at", "updated_at"}
    assert listed[name]["version"] == 2
    one = admin.get(f"/v1/secrets/{name}")
    answers.append(one.text)
    assert one.json()["version"] == 2

    # The log knows the secret (name, versions, digests) but never its value.
    events = [
        value
        for _, _, value, _ in read_topic(services, "events")
        if value and name.encode() in value
    ]
    assert any(b"SecretCreated" in e for e in events)
    assert any(b"SecretUpdated" in e for e in events)

    deleted = admin.delete(f"/v1/secrets/{name}")
    answers.append(deleted.text)
    assert deleted.status_code == 200, deleted.text
    assert deleted.json() == {"name": name, "deleted": True, "version": 2}
    assert _stored_rows(services, name) == []  # no ciphertext row remains
    with pytest.raises(SecretNotFound):
        resolve_secret(services, DEFAULT_WORKSPACE, name)
    gone = admin.get(f"/v1/secrets/{name}")
    answers.append(gone.text)
    assert gone.status_code == 404
    assert admin.delete(f"/v1/secrets/{name}").status_code == 404

    for value in (first, second):
        assert not any(value in answer for answer in answers)
        assert _kafka_holds(services, value.encode()) == []
        assert _read_models_hold(services, value) == []
        assert _logs_hold(services, value.encode()) == []


def test_a_secret_is_refused_without_a_key_and_answers_no_value(
    services: Settings, admin: httpx.Client
) -> None:
    anonymous = httpx.post(
        f"{get_api_settings().base_url}/v1/secrets", json={"name": "x_token", "value": "v"}
    )
    assert anonymous.status_code == 401
    long_value = "s" * (64 * 1024 + 1)
    refused = admin.post("/v1/secrets", json={"name": "x_token", "value": long_value})
    assert refused.status_code == 422 and refused.json()["field"] == "value"
    assert long_value not in refused.text


def test_a_key_without_the_admin_scope_cannot_touch_secrets(services: Settings) -> None:
    train_key = issue_key(services, workspace_id=DEFAULT_WORKSPACE, scopes=("train",), name="t")
    with httpx.Client(
        base_url=get_api_settings().base_url,
        headers={"Authorization": f"Api-Key {train_key}"},
        timeout=60,
    ) as trainer:
        for answer in (
            trainer.post("/v1/secrets", json={"name": "x_token", "value": "v"}),
            trainer.get("/v1/secrets"),
            trainer.delete("/v1/secrets/x_token"),
        ):
            assert answer.status_code == 403, answer.text
            assert "admin" in answer.json()["detail"]
