"""The SDK drives a short training loop through the API over HTTP, the workers do the work."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from api.bootstrap import ensure_default_key
from api.client import RequestRejectedError, ServiceClient
from commands.work import AdamParams, Datum, LossFnInputs
from infra.services import SERVICES, _process
from infra.settings import REPO_ROOT, Settings
from projections.db import migrate

WORKERS = ("command-processor", "projections", "trainer-worker", "sampler-worker")
TIMEOUT_S = 120.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def platform(settings: Settings) -> Iterator[None]:
    """Processor, projections and workers; stops only those it started."""
    migrate(settings)
    started = []
    for spec in SERVICES:
        if spec.name in WORKERS:
            process = _process(settings, spec)
            if process.pid() is None:
                process.start([sys.executable, *spec.module_argv], cwd=REPO_ROOT)
                started.append(process)
    yield
    for process in started:
        process.stop()


@pytest.fixture(scope="module")
def service(
    platform: None, settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceClient]:
    """A private API process on a free port (not the `api` service, so nothing is shared),
    called with the default workspace's key (issued once the processor and projections run)."""
    port = _free_port()
    log = (tmp_path_factory.mktemp("api") / "api.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "api.app"], cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "LOOPSTREAM_API_PORT": str(port)},
    )  # fmt: skip
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            httpx.get(f"{base_url}/healthz").raise_for_status()
            break
        except httpx.TransportError:
            assert proc.poll() is None and time.monotonic() < deadline, "API did not start"
            time.sleep(0.1)
    with ServiceClient(base_url, api_key=ensure_default_key(settings)) as client:
        yield client
    proc.terminate()
    proc.wait(10)


def test_sdk_trains_saves_syncs_and_samples(
    service: ServiceClient, settings: Settings, tmp_path: Path
) -> None:
    session = service.create_session(settings.tiny_model_name, project="e2e")
    trainer = service.create_training_client(session, max_seq_len=64)
    tokens = list(b"hello world")
    datum = Datum(
        model_input=tokens[:-1],
        loss_fn_inputs=LossFnInputs(target_tokens=tokens[1:], weights=[1.0] * (len(tokens) - 1)),
    )
    # Calls pipeline: both are queued before either result is read.
    fb = trainer.forward_backward([datum], "cross_entropy")
    step = trainer.optim_step(AdamParams(learning_rate=1e-2))
    assert fb.result(TIMEOUT_S)["loss"] > 0
    assert step.result(TIMEOUT_S)["step"] == 1

    sampler = trainer.save_weights_and_get_sampling_client("step-1", timeout=TIMEOUT_S)
    assert sampler.checkpoint_uri == f"bt://loops:{trainer.run_id}/sampler_weights/step-1"
    out = sampler.sample(prompt="hello", num_samples=2, max_tokens=4, seed=7).result(TIMEOUT_S)
    assert len(out["sequences"]) == 2

    lp = trainer.compute_logprobs([tokens]).result(TIMEOUT_S)
    assert len(lp["logprobs"]) == 1

    # A second save under the same name is refused, naming the field.
    with pytest.raises(RequestRejectedError) as rejected:
        trainer.save_weights_for_sampler("step-1").result(TIMEOUT_S)
    assert rejected.value.field == "name"

    # The checkpoint the trainer wrote comes back bit for bit through the presigned URLs.
    deadline = time.monotonic() + 30
    while not (checkpoints := service.list_checkpoints(trainer.run_id)):
        assert time.monotonic() < deadline, "checkpoint never reached the read model"
        time.sleep(0.1)
    checkpoint = checkpoints[0]
    dest = service.download_checkpoint(checkpoint["checkpoint_id"], tmp_path / "ck", page_size=1)
    for f in checkpoint["files"]:
        data = (dest / f["relative_file_name"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == f["sha256"]

    service.end_session(session.session_id).result(TIMEOUT_S)
