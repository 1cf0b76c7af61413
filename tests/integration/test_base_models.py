"""Base models: an unknown one is refused when the session is made, on both front doors, with
the same message; a folder added with `loopstream models add` serves a session at once."""

from __future__ import annotations

import shutil
import uuid

import httpx
import pytest
import tinker
from typer.testing import CliRunner

from api.client import ServiceClient
from api.config import get_api_settings
from gpu_workers.models import resolve_base_model
from infra.settings import Settings

TINY = "loopstream/tiny-llama"


def test_an_unknown_base_model_is_refused_at_session_creation_on_both_doors(
    services: Settings, api_key: str
) -> None:
    missing = f"acme/missing-{uuid.uuid4().hex[:6]}"
    with httpx.Client(
        base_url=get_api_settings().base_url,
        headers={"Authorization": f"Api-Key {api_key}"},
        timeout=60,
    ) as client:
        loops = client.post("/v1/loops/sessions", json={"base_model": missing})
    assert loops.status_code == 400, loops.text
    assert loops.json()["field"] == "base_model"
    message = loops.json()["detail"]
    assert f"base model {missing!r} is not available; available: " in message
    assert TINY in message and "loopstream models add" in message

    service = tinker.ServiceClient(base_url=get_api_settings().base_url, api_key=api_key)
    with pytest.raises(tinker.BadRequestError) as refused:
        service.create_lora_training_client(base_model=missing, rank=0).result()
    assert message in str(refused.value)


def test_a_model_added_from_a_local_folder_serves_a_session_at_once(services: Settings) -> None:
    name = f"test-{uuid.uuid4().hex[:8]}/tiny-copy"
    # A Hugging Face folder outside the model root: a copy of the tiny model, manifest dropped.
    source = services.model_root.parent / f"source-{uuid.uuid4().hex[:8]}"
    shutil.copytree(resolve_base_model(services, TINY), source)
    (source / "manifest.json").unlink()
    try:
        from api.cli import app

        added = CliRunner().invoke(app, ["models", "add", str(source), "--name", name])
        assert added.exit_code == 0, added.output
        listed = CliRunner().invoke(app, ["models", "list", "-o", "json"])
        assert name in listed.stdout

        with ServiceClient() as client:
            session = client.create_session(name)
            training = client.create_training_client(session, max_seq_len=32)
            sample = training.sampling_client().sample(prompt="a", num_samples=1, max_tokens=4)
            assert len(sample.result(120)["sequences"]) == 1
            client.end_session(session.session_id).result(60)
    finally:
        shutil.rmtree(source, ignore_errors=True)
        shutil.rmtree(services.model_root / name.split("/")[0], ignore_errors=True)
