"""The gateway's OpenAI-compatible routes with the official `openai` client, unchanged apart from
base_url and api_key: chat (plain and streamed), completions, n, a refused parameter, tenancy
and a deactivated deployment, on one real replica of the tiny base model.

One deployment for the whole module (a replica is a process that imports torch, ~10 s of CPU
here); the deactivation test runs last and the deployment is deleted at the end.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from api.bootstrap import issue_key
from api.client import ServiceClient
from api.deploy_client import DeploymentsClient
from api.gateway.app import DEPLOYMENT_CACHE_S
from infra.settings import Settings
from tests.integration.kafka_helpers import create_workspace

READY_S = 180.0  # the first request parks until the replica has loaded
Json = dict[str, Any]
HELLO = [{"role": "user", "content": "Say hello"}]


@pytest.fixture(scope="module")
def deployments(services: Settings) -> Iterator[DeploymentsClient]:
    with ServiceClient() as service:
        yield DeploymentsClient(service)


@pytest.fixture(scope="module")
def deployed(deployments: DeploymentsClient, served_model: Json) -> Json:
    model_id, deployment_id = served_model["model_id"], served_model["deployment_id"]
    return {
        **deployments.get_deployment(model_id, deployment_id),
        "name": f"{model_id}/{deployment_id}",
    }


def client_for(settings: Settings, api_key: str, *, path: str = "/v1") -> openai.OpenAI:
    base_url = f"http://{settings.gateway_host}:{settings.gateway_port}{path}"
    return openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=READY_S)


@pytest.fixture(scope="module")
def client(services: Settings, api_key: str, deployed: Json) -> openai.OpenAI:
    """A client whose first call has waited for the replica."""
    client = client_for(services, api_key)
    client.completions.create(model=deployed["name"], prompt="warm up", max_tokens=1)
    return client


def test_chat_completion_answers_in_openais_shape_with_the_weights_fingerprint(
    services: Settings, api_key: str, client: openai.OpenAI, deployed: Json
) -> None:
    answer = client.chat.completions.create(
        model=deployed["name"],
        messages=HELLO,
        max_tokens=8,
        seed=7,  # type: ignore[arg-type]
    )

    assert answer.object == "chat.completion" and answer.id.startswith("chatcmpl-")
    assert answer.model == deployed["name"]
    [choice] = answer.choices
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert answer.usage is not None and 0 < answer.usage.completion_tokens <= 8
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens
    # The fingerprint is the digest of the weights the native predict route reports.
    predict = httpx.post(
        f"{client.base_url}".removesuffix("/v1/")
        + f"/model/{deployed['model_id']}/deployment/{deployed['deployment_id']}/predict",
        json={"prompt": "x", "max_tokens": 1},
        headers={"Authorization": f"Api-Key {api_key}"},
        timeout=30,
    )
    digest = predict.json()["weights"]["digest"]
    assert answer.system_fingerprint == digest.rpartition(":")[2][:16]


def test_a_streamed_chat_concatenates_to_the_same_text_as_the_plain_answer(
    client: openai.OpenAI, deployed: Json
) -> None:
    kwargs: Any = {
        "model": deployed["name"],
        "messages": HELLO,
        "max_tokens": 24,
        "seed": 11,
        "temperature": 1.0,
    }
    plain = client.chat.completions.create(**kwargs)

    chunks = list(
        client.chat.completions.create(
            **kwargs, stream=True, stream_options={"include_usage": True}
        )
    )

    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    usage = chunks[-1].usage
    assert usage is not None and plain.usage is not None
    assert usage.completion_tokens == plain.usage.completion_tokens
    # One chunk per generated token, between the role chunk and the finish chunk.
    assert len([c for c in chunks if c.choices]) == usage.completion_tokens + 2
    assert chunks[-2].choices[0].finish_reason == plain.choices[0].finish_reason
    assert {c.system_fingerprint for c in chunks} == {plain.system_fingerprint}


def test_completions_with_n_two_and_logprobs_on_the_baseten_path(
    services: Settings, api_key: str, client: openai.OpenAI, deployed: Json
) -> None:
    answer = client.completions.create(
        model=deployed["name"], prompt="Once upon", max_tokens=5, n=2, seed=3, logprobs=0
    )

    assert answer.object == "text_completion" and [c.index for c in answer.choices] == [0, 1]
    assert answer.usage is not None and answer.usage.completion_tokens <= 10
    for choice in answer.choices:
        assert choice.logprobs is not None and choice.logprobs.token_logprobs is not None
        assert "".join(choice.logprobs.tokens or []).startswith(choice.text)
        assert all(lp <= 0 for lp in choice.logprobs.token_logprobs)
    # The same request on /model/{id}/deployment/{id}/v1: `model` is ignored there.
    path = f"/model/{deployed['model_id']}/deployment/{deployed['deployment_id']}/v1"
    same = client_for(services, api_key, path=path).completions.create(
        model="ignored", prompt="Once upon", max_tokens=5, n=2, seed=3
    )
    assert [c.text for c in same.choices] == [c.text for c in answer.choices]
    # "<model_id>" alone names the model's development deployment, and this one has none.
    assert not deployed["is_development"]
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model=deployed["model_id"], prompt="x", max_tokens=1)
    assert "development deployment" in str(missing.value)


def test_a_parameter_that_is_not_served_is_a_400_naming_it(
    client: openai.OpenAI, deployed: Json
) -> None:
    for kwargs, param in (
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"logprobs": True, "top_logprobs": 3}, "top_logprobs"),
        ({"temperature": 3}, "temperature"),
    ):
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model=deployed["name"], messages=HELLO, **kwargs)
        error = refused.value.body
        assert isinstance(error, dict) and error["param"] == param, error
        assert error["type"] == "invalid_request_error"


def test_another_workspaces_model_is_not_found(
    services: Settings, client: openai.OpenAI, deployed: Json
) -> None:
    workspace = create_workspace(services, "openai", "openai routes tenancy test")
    key = issue_key(services, workspace_id=workspace, scopes=("admin",), name="openai test")
    other = client_for(services, key)

    with pytest.raises(openai.NotFoundError) as missing:
        other.chat.completions.create(model=deployed["name"], messages=HELLO, max_tokens=2)
    assert isinstance(missing.value.body, dict) and missing.value.body["param"] == "model"


def test_a_deactivated_deployment_is_not_found(
    client: openai.OpenAI, deployments: DeploymentsClient, deployed: Json
) -> None:
    # Another deployment of the same model, never started (min_replica 0): deactivating it
    # costs no replica, and the shared one keeps serving the other test files.
    other = deployments.create_deployment(deployed["model_id"], name="to-deactivate").result(60)
    deployments.deactivate(deployed["model_id"], other["deployment_id"]).result(60)
    time.sleep(DEPLOYMENT_CACHE_S + 0.1)  # the gateway reuses a deployment's row this long
    try:
        with pytest.raises(openai.NotFoundError) as missing:
            client.completions.create(
                model=f"{deployed['model_id']}/{other['deployment_id']}", prompt="hi", max_tokens=1
            )
        assert "deactivated" in str(missing.value)
    finally:
        deployments.delete(deployed["model_id"], other["deployment_id"]).result(60)
