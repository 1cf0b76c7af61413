"""Hostile input to the inference gateway: every refusal is a 4xx naming the field, never a 500,
and garbage on the gateway's Kafka topics stops neither the replica controller nor the async
worker.

One deployment (min_replica 1) for the whole module: every replica is a torch process.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from confluent_kafka import Producer

from api.bootstrap import issue_key
from events.kafka_log import producer_config
from infra.settings import Settings
from tests.integration.kafka_helpers import create_workspace

WAIT_S = 180.0
Json = dict[str, Any]


@pytest.fixture(scope="module")
def deployed(served_model: Json) -> Json:
    return served_model


@pytest.fixture(scope="module")
def gateway(services: Settings, api_key: str) -> Iterator[httpx.Client]:
    url = f"http://{services.gateway_host}:{services.gateway_port}"
    with httpx.Client(base_url=url, headers={"Authorization": f"Api-Key {api_key}"},
                      timeout=WAIT_S) as client:  # fmt: skip
        yield client


def predict_path(model: Json) -> str:
    return f"/model/{model['model_id']}/deployment/{model['deployment_id']}/predict"


def served(gateway: httpx.Client, model: Json) -> None:
    """Wait out the cold start: a first small request answered."""
    reply = gateway.post(predict_path(model), json={"prompt": "a", "max_tokens": 1})
    assert reply.status_code == 200, reply.text


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompt_tokens": [5000]}, "prompt_tokens"),  # past the tiny vocabulary (260)
        ({"prompt_tokens": [2**31 - 1]}, "prompt_tokens"),
        ({"prompt": ""}, "prompt"),  # encodes to no token
        ({"prompt": "a", "max_tokens": 8192, "n": 64}, "max_tokens"),  # past the context
    ],
)
def test_input_the_replica_refuses_is_a_400_naming_the_field(
    gateway: httpx.Client, deployed: Json, body: Json, field: str
) -> None:
    # The engine's InvalidInputError did not unpickle in the gateway: each of these was a 500.
    served(gateway, deployed)

    reply = gateway.post(predict_path(deployed), json=body)

    assert reply.status_code == 400, reply.text
    assert reply.json()["field"].startswith(field)


def test_openai_completions_with_a_refused_prompt_are_a_400(
    gateway: httpx.Client, deployed: Json
) -> None:
    served(gateway, deployed)
    model = f"{deployed['model_id']}/{deployed['deployment_id']}"

    for prompt in ([99999], ""):
        reply = gateway.post("/v1/completions", json={"model": model, "prompt": prompt})
        assert reply.status_code == 400, reply.text
        assert reply.json()["error"]["param"].startswith("prompt")


@pytest.mark.parametrize("sampling", [{"temperature": 1e-300}, {"top_p": 5e-324}])
def test_a_temperature_or_top_p_below_float32_resolution_is_answered(
    gateway: httpx.Client, deployed: Json, sampling: Json
) -> None:
    served(gateway, deployed)

    reply = gateway.post(predict_path(deployed), json={"prompt": "a", "max_tokens": 2, **sampling})

    assert reply.status_code == 200, reply.text


def test_tenancy_other_workspace_and_train_only_keys_get_404_and_403(
    services: Settings, gateway: httpx.Client, deployed: Json
) -> None:
    other = create_workspace(services, "hostile", "other")
    other_key = issue_key(services, workspace_id=other, scopes=("infer",))
    train_key = issue_key(services, scopes=("train",))
    submitted = gateway.post(
        predict_path(deployed).replace("/predict", "/async_predict"),
        json={"model_input": {"prompt": "a", "max_tokens": 1}},
    )
    assert submitted.status_code == 201, submitted.text

    as_other = {"Authorization": f"Api-Key {other_key}"}
    assert gateway.post(predict_path(deployed), headers=as_other,
                        json={"prompt": "a"}).status_code == 404  # fmt: skip
    request_id = submitted.json()["request_id"]
    assert gateway.get(f"/async_request/{request_id}", headers=as_other).status_code == 404
    as_trainer = {"Authorization": f"Api-Key {train_key}"}
    assert gateway.post(predict_path(deployed), headers=as_trainer,
                        json={"prompt": "a"}).status_code == 403  # fmt: skip


def test_garbage_on_the_gateways_topics_stops_neither_controller_nor_async_worker(
    services: Settings, gateway: httpx.Client, deployed: Json
) -> None:
    served(gateway, deployed)
    producer = Producer(producer_config(services))
    future = json.dumps({"deployment_id": deployed["deployment_id"], "model_id": "x",
                         "workspace_id": "y", "at": "9999-12-31T23:59:59+00:00",
                         "requests": 1e308, "queued": 10**30, "ongoing": "x"})  # fmt: skip
    garbage = [b"\xff\xfe", b"", b"null", b"[]", b"{}", b'{"deployment_id": 5}',
               future.encode(), b'{"a":' * 10000]  # fmt: skip
    for topic in ("deployment-traffic", "async-requests"):
        for value in garbage:
            producer.produce(services.topic(topic), key=b"hostile", value=value)
    assert producer.flush(30) == 0

    reply = gateway.post(predict_path(deployed), json={"prompt": "a", "max_tokens": 1})
    assert reply.status_code == 200, reply.text
    submitted = gateway.post(
        predict_path(deployed).replace("/predict", "/async_predict"),
        json={"model_input": {"prompt": "a", "max_tokens": 1}},
    )
    request_id = submitted.json()["request_id"]
    deadline = time.monotonic() + WAIT_S
    while True:
        # Not found for a moment after the 201: the status is a read model (docs/async.md).
        answer = gateway.get(f"/async_request/{request_id}")
        status = answer.json()["status"] if answer.status_code == 200 else answer.status_code
        if status == "SUCCEEDED":
            break
        assert status not in ("FAILED", "EXPIRED"), status
        assert time.monotonic() < deadline, f"async request still {status}"
        time.sleep(0.2)


def test_made_up_deployment_ids_add_no_metrics_labels(
    gateway: httpx.Client, deployed: Json
) -> None:
    for i in range(20):
        made_up = f"/model/{deployed['model_id']}/deployment/madeup{i}/predict"
        assert gateway.post(made_up, json={"prompt": "a"}).status_code == 404

    assert "madeup" not in gateway.get("/metrics").text
