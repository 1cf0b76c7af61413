"""The API's input boundary against the running API service (api.config base URL), over one
keep-alive connection, as the findings of issue 10 were reproduced: NUL in body, query and path
ids (3, 4), an offset past bigint (4), the 422 shape in the OpenAPI and a missing body (5),
Infinity and an oversize body (6). Never a 500, and the connection stays usable after each.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from api.config import get_api_settings
from infra.settings import Settings

HUGE_OFFSET = "9223372036854775808"  # 2**63: past a PostgreSQL bigint


@pytest.fixture(scope="module")
def http(services: Settings, api_key: str) -> Iterator[httpx.Client]:
    # Every route authenticates; the boundary is checked for a caller with a valid key.
    headers = {"Authorization": f"Api-Key {api_key}"}
    with httpx.Client(base_url=get_api_settings().base_url, timeout=30, headers=headers) as client:
        assert client.get("/healthz").status_code == 200
        yield client


def assert_refused(response: httpx.Response, field: str, *codes: int) -> None:
    assert response.status_code in (codes or (422,)), response.text
    body = response.json()
    assert body["field"] == field, body
    if response.status_code == 422:
        assert body["errors"] and body["detail"].startswith(field)


def test_nul_in_a_session_name_is_refused_not_logged(http: httpx.Client) -> None:
    response = http.post("/v1/loops/sessions", json={"base_model": "m", "name": "a\u0000b"})
    assert_refused(response, "name")


def test_nul_in_the_end_reason_is_refused(http: httpx.Client) -> None:
    response = http.delete("/v1/loops/sessions/somesession?reason=a%00b")
    assert_refused(response, "reason")


@pytest.mark.parametrize(
    ("path", "field"),
    [
        ("/v1/loops/sessions/a%00b", "session_id"),
        ("/v1/loops/runs/a%00b", "run_id"),
        ("/v1/loops/runs/a%00b/checkpoints", "run_id"),
        ("/v1/loops/checkpoints/a%00b", "checkpoint_id"),
        ("/v1/loops/checkpoints/a%00b/files", "checkpoint_id"),
        ("/v1/loops/futures/a%00b", "request_id"),
        ("/v1/loops/samplers/a%00b/syncs", "sampler_id"),
        ("/v1/loops/samplers/a%00b/weights", "sampler_id"),
    ],
)
def test_nul_in_a_path_id_is_a_422_and_the_connection_survives(
    http: httpx.Client, path: str, field: str
) -> None:
    assert_refused(http.get(path), field)
    assert http.get("/healthz").status_code == 200  # same keep-alive connection


@pytest.mark.parametrize("path", ["/v1/loops/sessions", "/api/v1/training_runs"])
def test_an_offset_past_bigint_is_a_422(http: httpx.Client, path: str, api_key: str) -> None:
    response = http.get(path, params={"offset": HUGE_OFFSET}, headers={"X-API-Key": api_key})
    assert_refused(response, "offset")
    assert http.get("/healthz").status_code == 200


def test_infinity_in_a_body_is_a_422_naming_the_field(http: httpx.Client) -> None:
    raw = b'{"adam_params": {"learning_rate": Infinity}}'
    response = http.post("/v1/loops/runs/norun/optim_step", content=raw,
                         headers={"content-type": "application/json"})  # fmt: skip
    assert_refused(response, "adam_params.learning_rate")


def test_a_huge_ttl_is_refused_at_the_api(http: httpx.Client) -> None:
    response = http.post("/v1/loops/runs/norun/save_weights",
                         json={"name": "x", "ttl_seconds": 10**20})  # fmt: skip
    assert_refused(response, "ttl_seconds")


def test_missing_body_names_the_body(http: httpx.Client) -> None:
    response = http.post("/v1/loops/sessions")
    assert_refused(response, "body")
    assert "None" not in response.json()["detail"]


def test_a_body_over_the_limit_is_a_413(services: Settings) -> None:
    limit = get_api_settings().api_max_body_bytes
    with httpx.Client(base_url=get_api_settings().base_url, timeout=60) as client:
        response = client.post("/v1/loops/runs/norun/forward_backward",
                               content=b" " * (limit + 1),
                               headers={"content-type": "application/json"})  # fmt: skip
    assert_refused(response, "body", 413)
    assert str(limit) in response.json()["detail"]


def test_openapi_declares_the_422_the_api_sends(http: httpx.Client) -> None:
    spec = http.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    assert "HTTPValidationError" not in schemas
    assert set(schemas["ValidationErrorBody"]["required"]) == {"detail", "field", "errors"}
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            ref = operation["responses"]["422"]["content"]["application/json"]["schema"]["$ref"]
            assert ref.endswith("/ValidationErrorBody"), (method, path)


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/api/v1/create_model", {"session_id": "s", "base_model": "loopstream/tiny-llama"},
         "model_seq_id"),
        ("/api/v1/create_model",
         {"session_id": "s", "model_seq_id": "x", "base_model": "loopstream/tiny-llama"},
         "model_seq_id"),
        ("/api/v1/create_model",
         {"session_id": "s", "model_seq_id": 0, "base_model": "loopstream/tiny-llama",
          "lora_config": [1]},
         "lora_config"),
        ("/api/v1/optim_step", {"model_id": "m", "seq_id": {"a": 1}}, "seq_id"),
        ("/api/v1/save_weights", {"model_id": "m", "seq_id": -1}, "seq_id"),
    ],
)  # fmt: skip
def test_a_malformed_tinker_body_is_a_400_naming_the_field(
    http: httpx.Client, path: str, body: dict, field: str, api_key: str
) -> None:
    response = http.post(path, json=body, headers={"X-API-Key": api_key})
    assert response.status_code == 400, response.text
    assert response.json()["field"] == field
    assert http.get("/healthz").status_code == 200
