"""The tiny model is a normal HF folder: deterministic, loadable by the Auto classes, byte-level."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from gpu_workers.manifest import verify_folder
from gpu_workers.tiny_model import BOS_ID, EOS_ID, PAD_ID, ensure_tiny_model

torch.set_num_threads(1)


def test_same_seed_gives_the_same_bytes_and_another_seed_other_weights(tmp_path: Path) -> None:
    a = verify_folder(ensure_tiny_model(tmp_path / "a", seed=0))
    b = verify_folder(ensure_tiny_model(tmp_path / "b", seed=0))
    c = verify_folder(ensure_tiny_model(tmp_path / "c", seed=1))

    assert a.digest == b.digest
    weights = {m.digest: {f.path: f.sha256 for f in m.files} for m in (a, c)}
    assert weights[a.digest]["model.safetensors"] != weights[c.digest]["model.safetensors"]


def test_ensure_is_idempotent(tmp_path: Path) -> None:
    path = ensure_tiny_model(tmp_path / "m")
    before = (path / "model.safetensors").stat().st_mtime_ns

    assert ensure_tiny_model(tmp_path / "m") == path
    assert (path / "model.safetensors").stat().st_mtime_ns == before


def test_loads_with_the_auto_classes_as_a_small_llama(tmp_path: Path) -> None:
    path = ensure_tiny_model(tmp_path / "m")

    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)

    assert model.config.model_type == "llama"
    assert model.config.vocab_size == 260 and model.config.max_position_embeddings == 512
    assert 90_000 < sum(p.numel() for p in model.parameters()) < 110_000
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (
        BOS_ID,
        EOS_ID,
        PAD_ID,
    )


def test_tokenizer_maps_each_byte_to_its_own_id(tmp_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(ensure_tiny_model(tmp_path / "m"))
    text = "héllo, wörld\n\x00"

    ids = tokenizer(text, add_special_tokens=False).input_ids

    assert ids == list(text.encode())
    assert tokenizer(text).input_ids == [BOS_ID, *text.encode()]
    assert tokenizer.decode([BOS_ID, *ids, EOS_ID], skip_special_tokens=True) == text
