"""Serving through the gateway on real Ray replicas (issue 14): deploy a run's checkpoint with
the CLI, scale from zero on the first request, tokens stamped with the checkpoint's digest,
deactivate/activate, tenancy, kill -9 of a replica mid-traffic.

One deployment for the whole module: every replica is a process that imports torch (~10 s of
CPU here), so the tests share it and run in order.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import httpx
import psycopg
import pytest

from api.bootstrap import issue_key
from api.client import ServiceClient, TrainingClient
from api.deploy_client import DeploymentsClient
from events.audit import history
from infra.settings import Settings
from tests.integration.kafka_helpers import create_workspace
from tests.integration.test_deployments import cli_json

WAIT_S = 180.0
Json = dict[str, Any]


@pytest.fixture(scope="module")
def service(services: Settings) -> Iterator[ServiceClient]:
    with ServiceClient() as client:
        yield client


@pytest.fixture(scope="module")
def gateway(services: Settings, api_key: str) -> Iterator[httpx.Client]:
    url = f"http://{services.gateway_host}:{services.gateway_port}"
    with httpx.Client(base_url=url, headers={"Authorization": f"Api-Key {api_key}"},
                      timeout=WAIT_S) as client:  # fmt: skip
        yield client


@pytest.fixture(scope="module")
def deployed(service: ServiceClient) -> Iterator[Json]:
    """A run's base sampler checkpoint deployed with `loopstream deploy-checkpoints` on the
    smallest CPU instance (min_replica 0: nothing runs until the first request)."""
    session = service.create_session("loopstream/tiny-llama", project="serving-test")
    training: TrainingClient = service.create_training_client(session, max_seq_len=64)
    training.save_weights_for_sampler("served", hotload=False).result(WAIT_S)
    model = cli_json("deploy-checkpoints", "--run-id", training.run_id, "--checkpoint", "served")
    yield {**model, "deployment_id": model["deployments"][0]["deployment_id"]}
    DeploymentsClient(service).delete(model["model_id"], model["deployments"][0]["deployment_id"])
    service.end_session(session.session_id, reason="test over").result(60)


def predict_path(model: Json) -> str:
    return f"/model/{model['model_id']}/deployment/{model['deployment_id']}/predict"


def replica_rows(settings: Settings, deployment_id: str) -> list[dict[str, Any]]:
    with psycopg.connect(settings.pg_conninfo, row_factory=psycopg.rows.dict_row) as conn:
        return conn.execute(
            f"select * from {settings.read_schema}.replicas where deployment_id = %s "
            "order by requested_at",
            (deployment_id,),
        ).fetchall()


def eventually(fetch: Any, what: str, timeout_s: float = WAIT_S) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = fetch()
        if value:
            return value
        assert time.monotonic() < deadline, f"gave up waiting: {what}"
        time.sleep(0.1)


def test_the_first_request_scales_from_zero_and_is_answered_with_the_checkpoints_weights(
    settings: Settings, gateway: httpx.Client, deployed: Json
) -> None:
    assert replica_rows(settings, deployed["deployment_id"]) == []  # min_replica 0: none yet
    answer = gateway.post(predict_path(deployed), json={"prompt": "hi", "max_tokens": 6, "seed": 3})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["weights"]["digest"] == deployed["content_digest"]
    assert body["weights"]["checkpoint_id"] == deployed["checkpoint_uri"]
    assert len(body["choices"][0]["tokens"]) == 6 and body["completion_tokens"] == 6
    # The same seed on the same weights gives the same tokens.
    again = gateway.post(predict_path(deployed), json={"prompt": "hi", "max_tokens": 6, "seed": 3})
    assert again.json()["choices"] == body["choices"]

    # The cold start is in the log, step by step, with its durations.
    [replica] = replica_rows(settings, deployed["deployment_id"])
    events = [e for e in history(settings, replica["replica_id"])]
    assert [e.type for e in events] == ["ReplicaRequested", "ReplicaStarting", "ReplicaReady"]
    assert events[0].payload["reason"] == "scale_from_zero"
    ready = events[2].payload
    assert 0 < ready["load_ms"] < ready["start_ms"]
    assert ready["content_digest"] == deployed["content_digest"]


def test_the_seeds_host_routing_and_bad_input_and_metrics(
    gateway: httpx.Client, deployed: Json
) -> None:
    bare = gateway.post(
        f"/deployment/{deployed['deployment_id']}/predict",
        json={"prompt_tokens": [5, 6, 7], "max_tokens": 2},
        headers={"Host": f"model-{deployed['model_id']}.api.example.com"},
    )
    assert bare.status_code == 200, bare.text
    for body, field in (
        ({"prompt": "x", "prompt_tokens": [1]}, None),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "x", "temperature": "NaN"}, "temperature"),
        ({"prompt_tokens": [2**40]}, "prompt_tokens"),
        ({"prompt": "x", "n": 10**9}, "n"),
    ):
        refused = gateway.post(predict_path(deployed), json=body)
        assert refused.status_code in (400, 422), (body, refused.text)
        if field is not None:
            assert field in refused.text, (body, refused.text)
    metrics = gateway.get("/metrics").text
    assert (
        f'loopstream_gateway_requests_total{{deployment_id="{deployed["deployment_id"]}"' in metrics
    )
    assert "loopstream_gateway_request_seconds_bucket" in metrics


def test_another_workspace_gets_404_and_so_does_a_missing_key(
    settings: Settings, gateway: httpx.Client, deployed: Json
) -> None:
    other = create_workspace(settings, "serving", "other")
    key = issue_key(settings, workspace_id=other, scopes=("infer",))
    answer = gateway.post(predict_path(deployed), json={"prompt": "x"},
                          headers={"Authorization": f"Api-Key {key}"})  # fmt: skip
    assert answer.status_code == 404, answer.text
    assert gateway.post(predict_path(deployed), json={"prompt": "x"},
                        headers={"Authorization": ""}).status_code == 401  # fmt: skip


def test_kill_9_of_a_replica_mid_traffic_is_retried_and_the_replica_replaced(
    settings: Settings, gateway: httpx.Client, deployed: Json
) -> None:
    [serving] = [r for r in replica_rows(settings, deployed["deployment_id"])
                 if r["status"] == "READY"]  # fmt: skip

    def one(i: int) -> httpx.Response:
        return gateway.post(predict_path(deployed), json={"prompt": f"p{i}", "max_tokens": 64})

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(one, i) for i in range(8)]
        time.sleep(0.3)
        os.kill(serving["pid"], signal.SIGKILL)
        answers = [f.result() for f in futures]
    # Every request is answered: by the replacement (retried once), or with a clear,
    # retryable 503, never a 500 or a hang.
    assert {a.status_code for a in answers} <= {200, 503}, [a.text for a in answers]
    for refused in (a for a in answers if a.status_code == 503):
        assert "retry" in refused.json()["detail"]

    rows = eventually(
        lambda: [r for r in replica_rows(settings, deployed["deployment_id"])
                 if r["replaces"] == serving["replica_id"] and r["status"] == "READY"],
        "a replacement replica",
    )  # fmt: skip
    assert len(rows) == 1
    [failed] = [r for r in replica_rows(settings, deployed["deployment_id"])
                if r["replica_id"] == serving["replica_id"]]  # fmt: skip
    assert failed["status"] == "FAILED" and failed["reason"].startswith("serving:")
    after = gateway.post(predict_path(deployed), json={"prompt": "after", "max_tokens": 2})
    assert after.status_code == 200 and after.json()["replica_id"] == rows[0]["replica_id"]


def test_deactivated_deployments_answer_404_and_serve_again_once_activated(
    settings: Settings, service: ServiceClient, gateway: httpx.Client, deployed: Json
) -> None:
    deploys = DeploymentsClient(service)
    deploys.deactivate(deployed["model_id"], deployed["deployment_id"]).result(60)
    refused = eventually(
        lambda: (
            (r := gateway.post(predict_path(deployed), json={"prompt": "x"})).status_code == 404
            and r
        ),
        "a 404 after deactivation",
        timeout_s=10,
    )
    assert "deactivated" in refused.json()["detail"]
    # Its replicas drain and stop.
    eventually(
        lambda: all(r["status"] in ("STOPPED", "FAILED")
                    for r in replica_rows(settings, deployed["deployment_id"])),
        "replicas stopped",
    )  # fmt: skip
    deploys.activate(deployed["model_id"], deployed["deployment_id"]).result(60)
    served = eventually(
        lambda: (
            (r := gateway.post(predict_path(deployed), json={"prompt": "x"})).status_code == 200
            and r
        ),
        "served again",
    )
    assert served.json()["weights"]["digest"] == deployed["content_digest"]
