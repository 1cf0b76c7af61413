"""The CLI against the running services: runs list, sessions end, checkpoints delete and
download, logs, smoke; each read back through the SDK, or from what it wrote."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from api.cli import app
from api.client import ServiceClient, TrainingClient
from infra.settings import Settings


def cli(*args: str, exit_code: int = 0) -> Any:
    done = CliRunner().invoke(app, list(args), env={"COLUMNS": "100"})
    assert done.exit_code == exit_code, f"{args}: {done.stdout}\n{done.stderr}\n{done.exception!r}"
    return done


def cli_json(*args: str) -> Any:
    return json.loads(cli(*args, "-o", "json").stdout)


@pytest.fixture
def client(services: Settings) -> Iterator[ServiceClient]:
    with ServiceClient() as service:
        yield service


@pytest.fixture
def training(client: ServiceClient) -> Iterator[TrainingClient]:
    session = client.create_session("loopstream/tiny-llama", project="cli-test")
    yield client.create_training_client(session, max_seq_len=32)
    if client.get_session(session.session_id)["status"] == "active":
        client.end_session(session.session_id, reason="test over").result(60)


def _wait(predicate: Any, *, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_runs_list_shows_a_new_run_first_with_its_session_and_sampler(
    training: TrainingClient,
) -> None:
    runs = cli_json("runs", "list", "--limit", "20")
    mine = next(r for r in runs if r["run_id"] == training.run_id)
    assert mine["sampler_id"] == training.sampler_id and mine["status"] == "active"
    table = cli("runs", "list", "--limit", "5").stdout
    assert training.run_id in table and training.sampler_id in table and "…" not in table


def test_sessions_end_ends_the_session_and_stops_its_run(
    client: ServiceClient, training: TrainingClient
) -> None:
    session_id = client.get_run(training.run_id)["session_id"]
    ended = cli("sessions", "end", session_id, "--reason", "done from the CLI")
    assert f"session {session_id} ended" in ended.stdout
    _wait(lambda: client.get_session(session_id)["status"] == "ended")
    assert client.get_session(session_id)["end_reason"] == "done from the CLI"
    _wait(lambda: client.get_run(training.run_id)["status"] == "stopped")
    refused = cli("sessions", "end", session_id, exit_code=1)  # already ended: said on stderr
    assert refused.stdout == "" and "error:" in refused.stderr


def test_checkpoints_download_writes_every_file_verified(
    client: ServiceClient, training: TrainingClient, tmp_path: Path
) -> None:
    saved = training.save_weights_for_sampler("cli-download", hotload=False).result(60)
    checkpoint = client.get_checkpoint(saved["checkpoint_id"])
    dest = tmp_path / "weights"
    result = cli_json("checkpoints", "download", saved["checkpoint_id"], str(dest))
    assert result["dest"] == str(dest)
    assert {f["path"] for f in result["files"]} == {
        str(dest / f["relative_file_name"]) for f in checkpoint["files"]
    }
    for f in checkpoint["files"]:
        data = (dest / f["relative_file_name"]).read_bytes()
        assert len(data) == f["size_bytes"]
        assert hashlib.sha256(data).hexdigest() == f["sha256"]


def test_checkpoints_delete_takes_it_out_of_the_listing(
    client: ServiceClient, training: TrainingClient
) -> None:
    saved = training.save_weights("cli-delete").result(60)
    checkpoint_id = saved["checkpoint_id"]
    _wait(lambda: any(c["checkpoint_id"] == checkpoint_id
                      for c in client.list_checkpoints(training.run_id)))  # fmt: skip
    assert (
        f"checkpoint {checkpoint_id} deleted" in cli("checkpoints", "delete", checkpoint_id).stdout
    )
    _wait(lambda: client.get_checkpoint(checkpoint_id)["status"] == "deleted")
    live = cli_json("checkpoints", "list", training.run_id)
    assert checkpoint_id not in {c["checkpoint_id"] for c in live}
    every = cli_json("checkpoints", "list", training.run_id, "--include-deleted")
    assert {c["checkpoint_id"]: c["status"] for c in every}[checkpoint_id] == "deleted"
    again = cli("checkpoints", "delete", checkpoint_id, exit_code=1)
    assert "already deleted" in again.stderr


def test_logs_prints_the_api_and_stack_logs(services: Settings) -> None:
    for service in ("api", "command-processor", "projections", "trainer-worker",
                    "sampler-worker", "janitor", "replica-controller", "gateway",
                    "kafka", "postgres", "s3", "ray"):  # fmt: skip
        done = cli("logs", service, "-n", "2")
        assert 0 < len(done.stdout.splitlines()) <= 2, service
    assert cli("stack", "logs", "api", "-n", "1").stdout  # `stack logs` takes them all too


def test_smoke_crosses_every_worker_and_ends_its_session(client: ServiceClient) -> None:
    report = cli_json("smoke")
    assert [s["step"] for s in report["steps"]] == [
        "create session", "create run", "sample", "forward_backward + optim_step",
        "save sampler weights", "read checkpoint", "end session",
    ]  # fmt: skip
    assert client.get_session(report["session_id"])["status"] == "ended"
    assert client.get_checkpoint(report["checkpoint_id"])["status"] == "active"
