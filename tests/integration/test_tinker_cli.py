"""The `tinker` command line the SDK installs, unchanged, against loopstream: its checkpoint and
run commands answer from the same routes as the RestClient (docs/tinker.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import tinker

from infra.settings import Settings

TINKER = str(Path(sys.executable).parent / "tinker")


def _tinker(api_key: str, *args: str) -> Any:
    from api.config import get_api_settings

    api = get_api_settings()
    env = {
        **os.environ,
        "TINKER_API_KEY": api_key,
        "TINKER_BASE_URL": f"http://{api.api_host}:{api.api_port}",
    }
    done = subprocess.run(
        [TINKER, "-f", "json", *args], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, (args, done.stdout[-2000:], done.stderr[-2000:])
    return json.loads(done.stdout) if done.stdout.strip() else None  # set-ttl prints nothing


def test_the_tinker_cli_lists_runs_and_checkpoints_and_sets_a_ttl(
    services: Settings, api_key: str, training_client: tinker.TrainingClient, tmp_path: Path
) -> None:
    saved = training_client.save_state("cli-listed").result()
    model_id = training_client.model_id

    # Across recent runs (other tests' too, so only the shape is checked), then of this run.
    assert _tinker(api_key, "run", "list")["runs"]
    assert _tinker(api_key, "checkpoint", "list")["checkpoints"]
    mine = _tinker(api_key, "checkpoint", "list", "--run-id", model_id)["checkpoints"]
    assert [c["tinker_path"] for c in mine] == [saved.path]

    _tinker(api_key, "checkpoint", "set-ttl", saved.path, "--ttl", "7200")
    (after,) = _tinker(api_key, "checkpoint", "list", "--run-id", model_id)["checkpoints"]
    assert after["expires_at"] is not None

    # Download an export: the CLI fetches every file through its presigned URL.
    exported = training_client.save_weights_external("cli-export").result()
    _tinker(api_key, "checkpoint", "download", exported.path, "--output", str(tmp_path))
    files = {p.name for p in tmp_path.rglob("*") if p.is_file()}
    assert {"config.json", "model.safetensors"} <= files, files
