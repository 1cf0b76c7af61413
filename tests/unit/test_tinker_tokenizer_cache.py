"""loopstream's tiny model's tokenizer, written into a Hugging Face hub cache, loads by its name
with AutoTokenizer (what the SDK's SamplingClient.get_tokenizer calls) and no network."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from api.tinker.hf_cache import publish_tokenizer
from gpu_workers.tiny_model import build_byte_tokenizer

NAME = "loopstream/tiny-llama"


def _tokenizer_folder(path: Path) -> Path:
    build_byte_tokenizer().save_pretrained(path)
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return path


def _load_in_a_fresh_process(hub_cache: Path, text: str) -> list[int]:
    """AutoTokenizer.from_pretrained(NAME) as the SDK calls it, in a process that has no Hub
    token, no offline switch and (on the test machines) no network: a Hub asked for an unknown
    name, or not answering, leaves the cache as the only source."""
    code = (
        "import json, sys\n"
        "from transformers import AutoTokenizer\n"
        f"tok = AutoTokenizer.from_pretrained({NAME!r}, fast=True)\n"
        "ids = tok.encode(sys.argv[1], add_special_tokens=False)\n"
        "assert tok.decode(ids) == sys.argv[1], tok.decode(ids)\n"
        "print(json.dumps(ids))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env["HF_HUB_CACHE"] = str(hub_cache)
    out = subprocess.run(
        [sys.executable, "-c", code, text], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_published_tokenizer_loads_by_name_offline(tmp_path: Path) -> None:
    hub = tmp_path / "hub"
    snapshot = publish_tokenizer(_tokenizer_folder(tmp_path / "model"), NAME, hub_cache=hub)

    repo = hub / "models--loopstream--tiny-llama"
    assert (repo / "refs" / "main").read_text() == snapshot.name
    assert (snapshot / "tokenizer.json").is_file()
    assert (repo / ".no_exist" / snapshot.name / "tokenizer.model").is_file()
    text = "héllo, wörld ✓"
    assert _load_in_a_fresh_process(hub, text) == list(text.encode())  # ids are the bytes


def test_publishing_is_idempotent_and_a_changed_tokenizer_moves_main(tmp_path: Path) -> None:
    hub = tmp_path / "hub"
    folder = _tokenizer_folder(tmp_path / "model")
    first = publish_tokenizer(folder, NAME, hub_cache=hub)
    assert publish_tokenizer(folder, NAME, hub_cache=hub) == first

    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "changed": True}))
    second = publish_tokenizer(folder, NAME, hub_cache=hub)

    assert second != first and first.is_dir()  # an old snapshot stays for a reader holding it
    assert (hub / "models--loopstream--tiny-llama" / "refs" / "main").read_text() == second.name
