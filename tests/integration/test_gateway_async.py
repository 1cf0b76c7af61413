"""Async predict through the running gateway (seed 003; Baseten's async API): submit, status,
signed webhooks to a receiver in this test, retries, sync priority, refusals.

One deployment (min_replica 1, max_replica 1) for the module: a replica is a process that
imports torch (~10 s of CPU here), so the tests share it and run in order.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import psycopg
import pytest

from api.bootstrap import issue_key
from api.client import ServiceClient
from api.config import get_api_settings
from api.deploy_client import DeploymentsClient
from api.gateway.webhooks import SIGNATURE_HEADER, verify_signature
from events.async_requests import SIGNING_SECRET_NAME
from events.audit import history
from infra.settings import Settings
from tests.integration.kafka_helpers import create_workspace

WAIT_S = 180.0
SIGNING_KEY = f"whsec-test-{time.time_ns()}"
Json = dict[str, Any]


class Receiver:
    """A webhook receiver on a free loopback port: `/ok` answers 200; `/flaky` answers 500 to the
    first two deliveries of each request id, then 200."""

    def __init__(self) -> None:
        self.received: list[tuple[str, Json, bool]] = []  # path, body, signature valid
        self.tries: dict[str, int] = {}
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers["Content-Length"]))
                body = json.loads(raw)
                valid = verify_signature(SIGNING_KEY, raw, self.headers[SIGNATURE_HEADER] or "")
                with receiver.lock:
                    tries = receiver.tries[body["request_id"]] = (
                        receiver.tries.get(body["request_id"], 0) + 1
                    )
                    ok = self.path == "/ok" or tries > 2
                    if ok:
                        receiver.received.append((self.path, body, valid))
                self.send_response(200 if ok else 500)
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def delivered(self, request_id: str, timeout_s: float = WAIT_S) -> tuple[str, Json, bool]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self.lock:
                for hit in self.received:
                    if hit[1]["request_id"] == request_id:
                        return hit
            time.sleep(0.1)
        raise AssertionError(f"no webhook for {request_id} within {timeout_s} s")


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    receiver = Receiver()
    yield receiver
    receiver.server.shutdown()


@pytest.fixture(scope="module")
def signing_key(services: Settings, api_key: str) -> str:
    """The default workspace's webhook signing secret, set to a value this test knows."""
    with httpx.Client(
        base_url=get_api_settings().base_url,
        timeout=60,
        headers={"Authorization": f"Api-Key {api_key}"},
    ) as admin:
        created = admin.post(
            "/v1/secrets", json={"name": SIGNING_SECRET_NAME, "value": SIGNING_KEY}
        )
        if created.status_code == 409:
            updated = admin.put(f"/v1/secrets/{SIGNING_SECRET_NAME}", json={"value": SIGNING_KEY})
            assert updated.status_code == 200, updated.text
        else:
            assert created.status_code == 201, created.text
    return SIGNING_KEY


@pytest.fixture(scope="module")
def gateway(services: Settings, api_key: str) -> Iterator[httpx.Client]:
    url = f"http://{services.gateway_host}:{services.gateway_port}"
    with httpx.Client(
        base_url=url, headers={"Authorization": f"Api-Key {api_key}"}, timeout=WAIT_S
    ) as client:
        yield client


@pytest.fixture(scope="module")
def deployed(served_model: Json) -> Json:
    return served_model


def submit(gateway: httpx.Client, model: Json, body: Json) -> httpx.Response:
    path = f"/model/{model['model_id']}/deployment/{model['deployment_id']}/async_predict"
    return gateway.post(path, json=body)


def status_of(gateway: httpx.Client, request_id: str, *, done: bool = True) -> Json:
    """The request's status; with `done`, once it has a final one and its webhook is settled."""
    deadline = time.monotonic() + WAIT_S
    while True:
        answer = gateway.get(f"/async_request/{request_id}")
        if answer.status_code == 200:
            body: Json = answer.json()
            final = body["status"] not in ("QUEUED", "IN_PROGRESS")
            if not done or (final and body["webhook_status"] != "PENDING"):
                return body
        assert time.monotonic() < deadline, f"{request_id}: {answer.status_code} {answer.text}"
        time.sleep(0.2)


PROMPT = {"prompt": "hello async", "max_tokens": 8, "temperature": 0}


def test_an_async_request_answers_an_id_at_once_and_its_signed_webhook_brings_the_output(
    gateway: httpx.Client, deployed: Json, receiver: Receiver, signing_key: str
) -> None:
    accepted = submit(
        gateway, deployed, {"model_input": PROMPT, "webhook_endpoint": f"{receiver.url}/ok"}
    )
    assert accepted.status_code == 201, accepted.text
    request_id = accepted.json()["request_id"]

    _, body, valid = receiver.delivered(request_id)
    assert valid, "the X-BASETEN-SIGNATURE header is HMAC-SHA256 of the body under the secret"
    assert body["type"] == "async_request_completed" and body["errors"] == []
    assert body["model_id"] == deployed["model_id"]
    assert body["deployment_id"] == deployed["deployment_id"]
    assert body["data"]["choices"][0]["tokens"]

    status = status_of(gateway, request_id)
    assert status["status"] == "SUCCEEDED" and status["webhook_status"] == "SUCCEEDED"
    assert status["output"] == body["data"]
    by_model = gateway.get(f"/model/{deployed['model_id']}/async_request/{request_id}")
    assert by_model.status_code == 200 and by_model.json()["status"] == "SUCCEEDED"


def test_a_webhook_that_fails_twice_is_delivered_on_the_third_attempt(
    services: Settings,
    gateway: httpx.Client,
    deployed: Json,
    receiver: Receiver,
    signing_key: str,
) -> None:
    accepted = submit(
        gateway, deployed, {"model_input": PROMPT, "webhook_endpoint": f"{receiver.url}/flaky"}
    )
    request_id = accepted.json()["request_id"]
    _, body, valid = receiver.delivered(request_id)
    assert valid and body["data"]["choices"]
    assert receiver.tries[request_id] == 3

    status = status_of(gateway, request_id)
    assert status["status"] == "SUCCEEDED"
    assert status["webhook_status"] == "SUCCEEDED" and status["webhook_attempts"] == 3
    # Every state change is an event of the request, numbered gap-free from 1.
    events = history(services, request_id)
    assert [e.type for e in events] == [
        "AsyncRequestQueued",
        "AsyncRequestStarted",
        "AsyncRequestSucceeded",
        "AsyncWebhookAttemptFailed",
        "AsyncWebhookAttemptFailed",
        "AsyncWebhookDelivered",
    ]
    assert [e.sequence for e in events] == list(range(1, 7))
    assert all(signing_key.encode() not in e.model_dump_json().encode() for e in events)


def test_sync_requests_overtake_queued_async_ones(
    services: Settings, gateway: httpx.Client, deployed: Json
) -> None:
    # The replica serves one request at a time; six slow async requests queue behind it.
    slow = {"prompt": "a long story", "max_tokens": 48, "temperature": 0}
    ids = [submit(gateway, deployed, {"model_input": slow}).json()["request_id"] for _ in range(6)]
    status_of(gateway, ids[-1], done=False)  # all six are in the worker's queue
    answer = gateway.post(
        f"/model/{deployed['model_id']}/deployment/{deployed['deployment_id']}/predict",
        json={"prompt": "me first", "max_tokens": 4},
    )
    sync_done = time.time()
    assert answer.status_code == 200, answer.text
    for request_id in ids:
        assert status_of(gateway, request_id)["status"] == "SUCCEEDED"
    with psycopg.connect(services.pg_conninfo) as conn:
        completed = [
            row[0].timestamp()
            for row in conn.execute(
                f"select completed_at from {services.read_schema}.async_requests "
                "where request_id = any(%s)",
                (ids,),
            )
        ]
    # Without priority the sync call would wait behind all six; with it, behind the one (or
    # two) already holding the slot when it arrived, so most finish after it.
    assert sum(t > sync_done for t in completed) >= 3, (completed, sync_done)


def test_bad_webhook_urls_are_refused_naming_the_field(
    gateway: httpx.Client, deployed: Json, signing_key: str
) -> None:
    for url in ("ftp://example.com/hook", "https://", "not a url", "http:///path"):
        refused = submit(gateway, deployed, {"model_input": PROMPT, "webhook_endpoint": url})
        assert refused.status_code == 400, (url, refused.text)
        assert refused.json()["field"] == "webhook_endpoint"
    for body in ({"priority": 3}, {"max_time_in_queue_seconds": 5}, {"extra": 1}):
        refused = submit(gateway, deployed, {"model_input": PROMPT, **body})
        assert refused.status_code in (400, 422), refused.text
        assert refused.json()["field"] == next(iter(body))


def test_another_workspace_cannot_see_a_request_nor_use_a_webhook_without_a_signing_secret(
    services: Settings, gateway: httpx.Client, deployed: Json, receiver: Receiver
) -> None:
    workspace = create_workspace(services, "async", "async test")
    key = issue_key(services, workspace_id=workspace, scopes=("admin",), name="async test")
    own = submit(gateway, deployed, {"model_input": PROMPT}).json()["request_id"]
    status_of(gateway, own, done=False)
    url = f"http://{services.gateway_host}:{services.gateway_port}"
    with httpx.Client(
        base_url=url, headers={"Authorization": f"Api-Key {key}"}, timeout=WAIT_S
    ) as other:
        assert other.get(f"/async_request/{own}").status_code == 404
        assert submit(other, deployed, {"model_input": PROMPT}).status_code == 404
        with ServiceClient(api_key=key) as service:
            deploys = DeploymentsClient(service)
            model = deploys.create_model(
                base_model="loopstream/tiny-llama",
                name="async-no-secret",
                deployment={"min_replica": 0, "max_replica": 1},
            ).result(60)
            target = {
                "model_id": model["model_id"],
                "deployment_id": model["deployment_id"],
            }
            try:
                refused = submit(
                    other, target, {"model_input": PROMPT, "webhook_endpoint": f"{receiver.url}/ok"}
                )
                assert refused.status_code == 400, refused.text
                assert refused.json()["field"] == "webhook_endpoint"
                assert SIGNING_SECRET_NAME in refused.json()["detail"]
                assert "loopstream secrets create" in refused.json()["detail"]
            finally:
                deploys.delete(target["model_id"], target["deployment_id"]).result(60)
