"""The input boundary without services: the limit types, and the API middleware on a tiny app.

Findings of issue 10 these pin down: NUL accepted into commands (3), a 500 that broke the
keep-alive connection (4), "None: field required" for a missing body (5), Infinity accepted and no
body size limit (6), and a TTL that overflowed the processor (1, the schema side).
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient
from pydantic import BaseModel, ValidationError

from api.boundary import InputBoundary
from api.errors import install_error_handlers
from api.models import SaveWeightsCreate, SessionCreate
from commands.envelope import CommandEnvelope
from commands.loops import CreateSession, EndSession, RecordCheckpoint
from commands.work import ForwardBackward, Sample
from events.limits import MAX_TTL_SECONDS, TEXT_PATTERN, json_problem, text_problem
from events.schemas import generate

LIMIT = 4096


class Body(BaseModel):
    name: str
    value: float = 0.0


def tiny_app() -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)
    app.add_middleware(InputBoundary, max_body_bytes=LIMIT)

    @app.post("/items/{item_id}")
    def post_item(item_id: str, body: Body) -> dict[str, Any]:
        return {"item_id": item_id, "name": body.name}

    @app.post("/free")
    async def free(request: Request) -> dict[str, Any]:
        return {"n": len(await request.body())}

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("a bug")

    @app.get("/ok")
    def ok(request: Request) -> dict[str, Any]:
        return {"client_port": request.client.port if request.client else None}

    return app


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    with TestClient(tiny_app(), raise_server_exceptions=False) as test_client:
        yield test_client


# --- the limit types (commands and their JSON Schemas) -------------------------------------


def test_text_problem_names_nul_and_lone_surrogates() -> None:
    assert text_problem("fine ünïcode 🙂") is None
    assert "NUL" in (text_problem("a\x00b") or "")
    assert "surrogate" in (text_problem("a\ud800b") or "")


def test_command_payloads_refuse_nul_in_free_text() -> None:
    with pytest.raises(ValidationError, match="NUL"):
        EndSession(reason="a\x00b")
    with pytest.raises(ValidationError, match="NUL"):
        CreateSession(base_model="m", name="a\x00b")
    with pytest.raises(ValidationError):
        CommandEnvelope(command_id="a\x00b", type="EndSession", aggregate_id="s1")


def test_record_checkpoint_refuses_a_ttl_past_ten_years() -> None:
    files = [{"relative_file_name": "a", "size_bytes": 1, "sha256": "0" * 64}]
    base = {"run_id": "r1", "checkpoint_id": "c1", "name": "n", "kind": "weights", "files": files}
    RecordCheckpoint.model_validate({**base, "ttl_seconds": MAX_TTL_SECONDS})
    for ttl in (10**20, 2**62):
        with pytest.raises(ValidationError, match="ttl_seconds"):
            RecordCheckpoint.model_validate({**base, "ttl_seconds": ttl})


def test_work_requests_refuse_non_finite_floats_and_huge_seeds() -> None:
    datum = {"model_input": [1], "loss_fn_inputs": {"target_tokens": [2], "weights": [1.0]}}
    for bad in (float("inf"), float("nan")):
        broken = {**datum, "loss_fn_inputs": {"target_tokens": [2], "weights": [bad]}}
        with pytest.raises(ValidationError, match="finite"):
            ForwardBackward.model_validate({"data": [broken]})
    with pytest.raises(ValidationError, match="seed"):
        Sample(prompt="a", seed=2**64)
    with pytest.raises(ValidationError, match="prompt"):
        Sample(prompt="a\x00")


def test_loader_state_refuses_nul_keys_and_non_finite_numbers() -> None:
    assert json_problem({"a": [1, {"b\x00": 2}]}) == ("a.1", "key must not contain NUL (\\u0000)")
    assert json_problem({"a": float("inf")}) == ("a", "must be a finite number")
    with pytest.raises(ValidationError, match="loader_state"):
        SaveWeightsCreate(name="s1", loader_state={"epoch": "a\x00"})


def test_json_schemas_show_the_text_pattern_and_the_maxima() -> None:
    schemas = generate()
    reason = schemas["commands/EndSession.v1.json"]["properties"]["payload"]["properties"]
    assert reason["reason"]["pattern"] == TEXT_PATTERN
    record = schemas["commands/RecordCheckpoint.v1.json"]["properties"]["payload"]["properties"]
    ttl = next(s for s in record["ttl_seconds"]["anyOf"] if s.get("type") == "integer")
    assert ttl["maximum"] == MAX_TTL_SECONDS
    envelope = schemas["CommandEnvelope.json"]["properties"]
    assert envelope["command_id"]["pattern"] == TEXT_PATTERN


def test_api_models_share_the_limits() -> None:
    with pytest.raises(ValidationError, match="NUL"):
        SessionCreate(base_model="m", project="p\x00")
    with pytest.raises(ValidationError, match="ttl_seconds"):
        SaveWeightsCreate(name="s1", ttl_seconds=10**20)


# --- the middleware -------------------------------------------------------------------------


def test_nul_in_a_json_body_is_a_422_naming_the_field(client: TestClient) -> None:
    response = client.post("/items/x", json={"name": "a\x00b"})
    assert response.status_code == 422
    assert response.json()["field"] == "name"
    assert response.json()["errors"]


def test_lone_surrogate_in_a_json_body_is_a_422(client: TestClient) -> None:
    raw = b'{"name": "a\\ud800b"}'
    response = client.post("/items/x", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 422 and response.json()["field"] == "name"


@pytest.mark.parametrize("literal", ["Infinity", "-Infinity", "NaN", "1e999"])
def test_non_finite_json_numbers_are_a_422_naming_the_field(
    client: TestClient, literal: str
) -> None:
    raw = f'{{"name": "a", "value": {literal}}}'.encode()
    response = client.post("/items/x", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert response.json()["field"] == "value"
    assert "finite" in response.json()["detail"]


def test_nul_in_a_path_id_names_the_parameter(client: TestClient) -> None:
    response = client.post("/items/a%00b", json={"name": "a"})
    assert response.status_code == 422
    assert response.json()["field"] == "item_id"


def test_nul_in_a_query_parameter_names_it(client: TestClient) -> None:
    response = client.get("/ok", params={"reason": "a\x00b"})
    assert response.status_code == 422 and response.json()["field"] == "reason"


def test_missing_body_names_the_body(client: TestClient) -> None:
    response = client.post("/items/x")
    assert response.status_code == 422
    assert response.json()["field"] == "body"
    assert response.json()["detail"] == "body: a JSON request body is required"


def test_body_over_the_limit_is_a_413_by_content_length(client: TestClient) -> None:
    response = client.post("/free", content=b"x" * (LIMIT + 1))
    assert response.status_code == 413
    assert str(LIMIT) in response.json()["detail"] and response.json()["field"] == "body"


def test_body_over_the_limit_is_a_413_while_streaming(client: TestClient) -> None:
    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it is read
        for _ in range(10):
            yield b"x" * 1000

    response = client.post("/free", content=chunks())
    assert response.status_code == 413


def test_body_within_the_limit_reaches_the_route(client: TestClient) -> None:
    response = client.post("/free", content=b"x" * LIMIT)
    assert response.status_code == 200 and response.json() == {"n": LIMIT}


def test_unhandled_error_is_a_json_500_with_a_request_id(client: TestClient) -> None:
    response = client.get("/boom")
    assert response.status_code == 500
    body = response.json()
    assert body["request_id"] and body["request_id"] in body["detail"]
    assert response.headers["x-request-id"] == body["request_id"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_500_leaves_the_keep_alive_connection_usable() -> None:
    """uvicorn closes a connection whose app raised after answering; the boundary answers and
    does not raise, so the next request goes over the same connection."""
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(tiny_app(), port=port, log_level="critical"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as http:
            for _ in range(200):
                try:
                    first = http.get("/ok")
                    break
                except httpx.TransportError:
                    time.sleep(0.05)
            assert http.get("/boom").status_code == 500
            after = http.get("/ok")
            assert after.status_code == 200
            assert after.json()["client_port"] == first.json()["client_port"]  # same connection
    finally:
        server.should_exit = True
        thread.join(10)


def test_malformed_json_is_left_to_fastapi_as_a_422(client: TestClient) -> None:
    raw = b'{"name": '
    response = client.post("/items/x", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert json.loads(response.text)["errors"]
