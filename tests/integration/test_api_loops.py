"""The Loops REST API against the real stack: Kafka, PostgreSQL, S3, and the real command
processor and projection runner as subprocesses (started here unless already running).

Requests go through FastAPI's TestClient (the app in-process); the SDK is pointed at the same
TestClient. Training and sampling results need the GPU workers and are covered in tests/e2e;
here their requests are checked up to the bus (validation, state checks, idempotency).
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.bootstrap import ensure_default_key
from api.client import ServiceClient
from api.deps import AppState
from api.submit import command_id_for
from commands.bus import CommandBus
from commands.envelope import DEFAULT_WORKSPACE, CommandEnvelope
from infra.s3 import ObjectStore
from infra.services import SERVICES, _process
from infra.settings import Settings
from projections.db import migrate

NEEDED = ("command-processor", "projections")
WAIT_S = 30.0

Json = dict[str, Any]


@pytest.fixture(scope="module")
def services(settings: Settings) -> Iterator[None]:
    """The command processor and projection runner; stops only what it started."""
    migrate(settings)
    started = []
    for spec in SERVICES:
        if spec.name not in NEEDED:
            continue
        process = _process(settings, spec)  # the same pid files as `loopstream services`
        if process.pid() is None:
            process.start([".venv/bin/python", *spec.module_argv])
            started.append(process)
    yield
    for process in started:
        process.stop()


@pytest.fixture(scope="module")
def auth(settings: Settings, services: None) -> dict[str, str]:
    """Every route authenticates: the default workspace's admin key (issued once per stack)."""
    return {"Authorization": f"Api-Key {ensure_default_key(settings)}"}


@pytest.fixture(scope="module")
def client(settings: Settings, auth: dict[str, str]) -> Iterator[TestClient]:
    with TestClient(create_app(settings), headers=auth) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def sdk(client: TestClient) -> ServiceClient:
    return ServiceClient("http://testserver", http_client=client)


def result_of(client: TestClient, request_id: str) -> Json:
    response = client.get(f"/v1/loops/futures/{request_id}", params={"wait": WAIT_S})
    assert response.status_code == 200, response.text
    future = response.json()
    assert future["status"] == "accepted", future
    return future


def eventually(client: TestClient, path: str, predicate: Any = None) -> Json:
    """GET until 200 (and `predicate(body)`): results and entity rows land separately."""
    deadline = time.monotonic() + WAIT_S
    while True:
        response = client.get(path)
        if response.status_code == 200 and (predicate is None or predicate(response.json())):
            return response.json()  # type: ignore[no-any-return]
        assert time.monotonic() < deadline, f"{path}: {response.status_code} {response.text}"
        time.sleep(0.05)


@pytest.fixture()
def run(client: TestClient) -> Json:
    """A fresh session with an active run (max_seq_len 8)."""
    created = client.post("/v1/loops/sessions", json={"base_model": "loopstream/tiny-llama",
                                                      "project": "api-tests"})  # fmt: skip
    assert created.status_code == 202, created.text
    session_id = created.json()["session_id"]
    result_of(client, created.json()["request_id"])
    eventually(client, f"/v1/loops/sessions/{session_id}")
    response = client.post("/v1/loops/runs", json={"session_id": session_id, "max_seq_len": 8})
    assert response.status_code == 202, response.text
    accepted = response.json()
    result_of(client, accepted["request_id"])
    eventually(client, f"/v1/loops/runs/{accepted['run_id']}")
    eventually(client, f"/v1/loops/sessions/{session_id}", lambda s: len(s["samplers"]) == 1)
    return accepted  # type: ignore[no-any-return]


DATUM = {"model_input": [1, 2, 3], "loss_fn_inputs": {"target_tokens": [2, 3, 4],
                                                       "weights": [1.0, 1.0, 1.0]}}  # fmt: skip


# --- sessions and runs ---------------------------------------------------------------------------


def test_creates_session_and_run_and_reads_them_back(client: TestClient, run: Json) -> None:
    session = client.get(f"/v1/loops/sessions/{run['session_id']}").json()
    assert session["status"] == "active"
    assert session["base_model"] == "loopstream/tiny-llama"
    assert [r["run_id"] for r in session["runs"]] == [run["run_id"]]
    assert [s["sampler_id"] for s in session["samplers"]] == [run["sampler_id"]]
    got = client.get(f"/v1/loops/runs/{run['run_id']}").json()
    assert (got["max_seq_len"], got["lora_rank"], got["status"]) == (8, 0, "active")
    listed = client.get("/v1/loops/sessions", params={"status": "active", "limit": 1000}).json()
    assert run["session_id"] in {s["session_id"] for s in listed["data"]}


def test_what_an_accepted_command_created_is_readable_at_once(client: TestClient) -> None:
    """Read-your-writes: once a future says accepted, the first GET finds the resource (the API
    waits for the projection on a miss) and the next write on it is not refused as unknown."""
    for _ in range(5):
        created = client.post("/v1/loops/sessions", json={"base_model": "loopstream/tiny-llama"})
        session_id = created.json()["session_id"]
        result_of(client, created.json()["request_id"])
        assert client.get(f"/v1/loops/sessions/{session_id}").status_code == 200
        run = client.post("/v1/loops/runs", json={"session_id": session_id, "max_seq_len": 8})
        result_of(client, run.json()["request_id"])
        sampled = client.post(
            f"/v1/loops/samplers/{run.json()['sampler_id']}/sample",
            json={"prompt": "a", "max_tokens": 1},
        )
        assert sampled.status_code == 202, sampled.text


def test_sdk_creates_session_and_training_client(sdk: ServiceClient) -> None:
    session = sdk.create_session("loopstream/tiny-llama", project="api-tests")
    trainer = sdk.create_training_client(session, max_seq_len=32, lora_rank=4)
    assert sdk.get_run(trainer.run_id)["lora_rank"] == 4
    assert sdk.get_session(session.session_id)["runs"][0]["sampler_id"] == trainer.sampler_id


def test_unknown_session_and_run_are_404(client: TestClient) -> None:
    assert client.get("/v1/loops/sessions/nosuchsession").status_code == 404
    response = client.post("/v1/loops/runs", json={"session_id": "nosuchsession",
                                                   "max_seq_len": 8})  # fmt: skip
    assert response.status_code == 404 and response.json()["field"] == "session_id"
    response = client.post("/v1/loops/runs/nosuchrun/forward_backward", json={"data": [DATUM]})
    assert response.status_code == 404 and "run nosuchrun not found" in response.json()["detail"]


def test_reposting_the_same_key_creates_one_session(
    client: TestClient, settings: Settings, auth: dict[str, str]
) -> None:
    key = f"test-{uuid.uuid4()}"
    body = {"base_model": "loopstream/tiny-llama"}
    first = client.post("/v1/loops/sessions", json=body, headers={"Idempotency-Key": key}).json()
    result_of(client, key)
    second = client.post("/v1/loops/sessions", json=body, params={"request_id": key}).json()
    assert first == second == {"session_id": first["session_id"], "request_id": key}
    # A fresh app (as after an API restart) finds the result and still sends nothing new.
    with TestClient(create_app(settings), headers=auth) as fresh:
        third = fresh.post("/v1/loops/sessions", json={**body, "request_id": key}).json()
    assert third == first
    history = client.get(f"/v1/loops/futures/{key}").json()
    assert [e["type"] for e in history["events"]] == ["SessionCreated"]


# --- bad input ---------------------------------------------------------------------------------


def test_refuses_negative_learning_rate(client: TestClient, run: Json) -> None:
    response = client.post(f"/v1/loops/runs/{run['run_id']}/optim_step",
                           json={"adam_params": {"learning_rate": -0.1}})  # fmt: skip
    assert response.status_code == 422
    assert response.json()["field"] == "adam_params.learning_rate"


def test_refuses_unknown_loss_fn(client: TestClient, run: Json) -> None:
    response = client.post(f"/v1/loops/runs/{run['run_id']}/forward_backward",
                           json={"data": [DATUM], "loss_fn": "hinge"})  # fmt: skip
    assert response.status_code == 422
    assert response.json()["field"] == "loss_fn"
    assert "cross_entropy" in response.json()["detail"]


def test_refuses_sequence_longer_than_max_seq_len(client: TestClient, run: Json) -> None:
    long = {"model_input": list(range(9)),
            "loss_fn_inputs": {"target_tokens": list(range(9)), "weights": [1.0] * 9}}  # fmt: skip
    response = client.post(f"/v1/loops/runs/{run['run_id']}/forward_backward",
                           json={"data": [DATUM, long]})  # fmt: skip
    assert response.status_code == 422
    assert response.json()["field"] == "data.1.model_input"
    assert "max_seq_len 8" in response.json()["detail"]
    response = client.post(f"/v1/loops/runs/{run['run_id']}/compute_logprobs",
                           json={"sequences": [[1], list(range(9))]})  # fmt: skip
    assert response.status_code == 422 and response.json()["field"] == "sequences.1"


def test_training_request_is_accepted_with_its_key(client: TestClient, run: Json) -> None:
    key = f"fb-{uuid.uuid4()}"
    path = f"/v1/loops/runs/{run['run_id']}/forward_backward"
    first = client.post(path, json={"data": [DATUM]}, headers={"Idempotency-Key": key})
    again = client.post(path, json={"data": [DATUM], "request_id": key})
    assert first.status_code == again.status_code == 202
    assert first.json() == again.json() == {"request_id": key}


# --- futures -------------------------------------------------------------------------------------


def test_futures_long_poll_returns_the_result(client: TestClient) -> None:
    created = client.post("/v1/loops/sessions", json={"base_model": "loopstream/tiny-llama"})
    started = time.monotonic()
    future = result_of(client, created.json()["request_id"])  # one call, waits server-side
    assert time.monotonic() - started < WAIT_S
    assert future["request_type"] == "CreateSession"
    assert future["events"][0]["type"] == "SessionCreated"


def test_future_of_a_rejected_command_says_why(client: TestClient, run: Json) -> None:
    # A second run in one session is refused by the session aggregate (one trainer per session).
    response = client.post("/v1/loops/runs", json={"session_id": run["session_id"],
                                                   "max_seq_len": 8})  # fmt: skip
    future = client.get(f"/v1/loops/futures/{response.json()['request_id']}",
                        params={"wait": WAIT_S}).json()  # fmt: skip
    assert future["status"] == "rejected"
    assert future["field"] == "run_id" and "already has an active run" in future["reason"]


def test_future_pending_while_sent_and_404_when_unknown(client: TestClient) -> None:
    state: AppState = client.app.state.loopstream  # type: ignore[attr-defined]
    sent = f"sent-{uuid.uuid4()}"
    # As if this API had sent it (its command id on Kafka) and no result has come yet.
    state.sent.remember(command_id_for(DEFAULT_WORKSPACE, sent))
    response = client.get(f"/v1/loops/futures/{sent}", params={"wait": 0.1})
    assert response.status_code == 200 and response.json()["status"] == "pending"
    response = client.get(f"/v1/loops/futures/never-{uuid.uuid4()}", params={"wait": 0.1})
    assert response.status_code == 404
    assert "unknown request" in response.json()["detail"]
    assert "resubmit" in response.json()["detail"]
    assert client.get("/v1/loops/futures/x", params={"wait": 61}).status_code == 422


# --- sessions end ---------------------------------------------------------------------------------


def test_sampling_after_session_delete_is_409(client: TestClient, run: Json) -> None:
    sample = {"prompt": "a", "num_samples": 2, "max_tokens": 4, "affinity_key": "group-0"}
    ended = client.delete(f"/v1/loops/sessions/{run['session_id']}")
    assert ended.status_code == 202
    result_of(client, ended.json()["request_id"])
    eventually(
        client,
        f"/v1/loops/sessions/{run['session_id']}",
        lambda s: s["status"] == "ended" and s["samplers"][0]["status"] == "stopped",
    )
    response = client.post(f"/v1/loops/samplers/{run['sampler_id']}/sample", json=sample)
    assert response.status_code == 409
    assert "session ended" in response.json()["detail"]
    response = client.post(f"/v1/loops/runs/{run['run_id']}/optim_step", json={})
    assert response.status_code == 409 and response.json()["field"] == "run_id"
    assert client.delete(f"/v1/loops/sessions/{run['session_id']}").status_code == 409


# --- checkpoints ---------------------------------------------------------------------------------


@pytest.fixture()
def checkpoint(client: TestClient, run: Json, settings: Settings) -> Json:
    """A checkpoint folder of 5 files written to S3 as a trainer would, then recorded."""
    files = {
        "model.safetensors": bytes(range(256)) * 4099,
        "config.json": b'{"hidden_size": 64}',
        "tokenizer/tokenizer.json": b'{"bytes": true}',
        "optimizer.pt": uuid.uuid4().bytes * 1000,
        "manifest.json": b'{"files": []}',
    }
    checkpoint_id, name = f"ck{uuid.uuid4().hex[:10]}", "step-1"
    store = ObjectStore.from_settings(settings)
    store.ensure_bucket()
    for rel, data in files.items():
        store.put_bytes(f"checkpoints/{run['run_id']}/weights/{name}/{rel}", data)
    record = CommandEnvelope(
        command_id=str(uuid.uuid4()),
        type="RecordCheckpoint",
        aggregate_id=run["session_id"],
        actor="api-tests",
        payload={
            "run_id": run["run_id"], "checkpoint_id": checkpoint_id, "name": name,
            "kind": "weights", "step": 1,
            "files": [{"relative_file_name": rel, "size_bytes": len(data),
                       "sha256": hashlib.sha256(data).hexdigest()} for rel, data in files.items()],
        },
    )  # fmt: skip
    CommandBus(settings).send(record)
    result_of(client, record.command_id)
    eventually(client, f"/v1/loops/checkpoints/{checkpoint_id}")
    return {"checkpoint_id": checkpoint_id, "files": files, **run}


def test_lists_the_checkpoints_of_a_run(client: TestClient, checkpoint: Json) -> None:
    listed = client.get(f"/v1/loops/runs/{checkpoint['run_id']}/checkpoints").json()
    assert [c["checkpoint_id"] for c in listed["data"]] == [checkpoint["checkpoint_id"]]
    got = client.get(f"/v1/loops/checkpoints/{checkpoint['checkpoint_id']}").json()
    assert got["uri"] == f"bt://loops:{checkpoint['run_id']}/weights/step-1"
    assert got["total_size_bytes"] == sum(len(d) for d in checkpoint["files"].values())


def test_page_size_one_walks_every_file(client: TestClient, checkpoint: Json) -> None:
    path = f"/v1/loops/checkpoints/{checkpoint['checkpoint_id']}/files"
    names, token, pages = [], None, 0
    while True:
        params = {"page_size": 1, **({"page_token": token} if token else {})}
        page = client.get(path, params=params).json()
        assert set(page) == {"presigned_urls", "total_count", "next_page_token"}
        assert page["total_count"] == 5 and len(page["presigned_urls"]) == 1
        entry = page["presigned_urls"][0]
        assert set(entry) == {"url", "relative_file_name", "size_bytes"}
        assert entry["size_bytes"] == len(checkpoint["files"][entry["relative_file_name"]])
        names.append(entry["relative_file_name"])
        pages += 1
        token = page["next_page_token"]
        if token is None:
            break
    assert pages == 5 and sorted(names) == sorted(checkpoint["files"])
    whole = client.get(path).json()
    assert len(whole["presigned_urls"]) == 5 and whole["next_page_token"] is None


def test_bad_page_size_is_422_and_bad_token_is_400(client: TestClient, checkpoint: Json) -> None:
    path = f"/v1/loops/checkpoints/{checkpoint['checkpoint_id']}/files"
    for size in (0, 1001, "ten"):
        response = client.get(path, params={"page_size": size})
        assert response.status_code == 422 and response.json()["field"] == "page_size"
    token = client.get(path, params={"page_size": 2}).json()["next_page_token"]
    for bad in ("garbage", token[:-2] + ("AA" if token[-2:] != "AA" else "BB")):
        response = client.get(path, params={"page_token": bad})
        assert response.status_code == 400 and response.json()["field"] == "page_token"


def test_download_through_presigned_urls_is_bit_for_bit(
    sdk: ServiceClient, checkpoint: Json, tmp_path: Path
) -> None:
    dest = sdk.download_checkpoint(checkpoint["checkpoint_id"], tmp_path / "ck", page_size=2)
    downloaded = {str(p.relative_to(dest)): p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    assert downloaded == checkpoint["files"]


def test_deleting_a_checkpoint_hides_its_files(client: TestClient, checkpoint: Json) -> None:
    deleted = client.delete(f"/v1/loops/checkpoints/{checkpoint['checkpoint_id']}")
    assert deleted.status_code == 202
    result_of(client, deleted.json()["request_id"])
    eventually(client, f"/v1/loops/checkpoints/{checkpoint['checkpoint_id']}",
               lambda c: c["status"] == "deleted")  # fmt: skip
    response = client.get(f"/v1/loops/checkpoints/{checkpoint['checkpoint_id']}/files")
    assert response.status_code == 410
    listed = client.get(f"/v1/loops/runs/{checkpoint['run_id']}/checkpoints").json()
    assert listed["count"] == 0
