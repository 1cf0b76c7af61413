"""Sampler-weight chains: base + deltas reproduce the trainer's weights bit for bit, or refuse."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from commands.loops import PROMOTABILITY_RULE, NotPromotableError, check_promotable
from gpu_workers import deltas
from gpu_workers.deltas import (
    DELTA_WEIGHTS_NAME,
    ChainHead,
    DeltaChainError,
    apply_chain,
    apply_delta,
    choose_checkpoint_type,
    decode,
    encode,
    read_link,
    state_digest,
    write_base_link,
    write_delta,
)
from gpu_workers.engine.model_io import WEIGHTS_NAME, full_state_dict, save_weights
from gpu_workers.engine.sampler import SamplerEngine
from gpu_workers.engine.trainer import TrainerEngine
from gpu_workers.engine.types import AdamParams, Datum
from gpu_workers.manifest import ChecksumMismatchError, read_manifest, write_manifest
from gpu_workers.tiny_model import BOS_ID, ensure_tiny_model

torch.set_num_threads(1)
RL_LEARNING_RATE = 1e-5  # full-parameter RL post-training runs at 1e-6 .. 1e-5


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def rl_step(trainer: TrainerEngine, rng: random.Random) -> None:
    """One policy-gradient step: 8 random rollouts of 16 tokens, advantage = reward - mean."""
    rollouts = [[BOS_ID, *(rng.randrange(97, 123) for _ in range(16))] for _ in range(8)]
    rewards_G = [s.count(ord("a")) / 16 for s in rollouts]
    mean = sum(rewards_G) / len(rewards_G)
    data = [
        Datum.from_tokens(
            s,
            logprobs=[float(x) for x in trainer.compute_logprobs(s)[1:]],  # on-policy
            advantages=[r - mean] * (len(s) - 1),
        )
        for s, r in zip(rollouts, rewards_G, strict=True)
    ]
    trainer.forward_backward(data, "importance_sampling")
    trainer.optim_step(AdamParams(learning_rate=RL_LEARNING_RATE))


def save_base(folder: Path, state: dict[str, torch.Tensor], uri: str) -> ChainHead:
    folder.mkdir(parents=True)
    save_weights(state, folder / WEIGHTS_NAME)
    write_base_link(folder, state)
    manifest = write_manifest(folder, kind="sampler_weights")
    return ChainHead(
        state={k: v.clone() for k, v in state.items()},
        folder_digest=manifest.digest,
        uri=uri,
        position=0,
        base_digest=manifest.digest,
    )


def save_delta(folder: Path, head: ChainHead, state: dict[str, torch.Tensor], **kw) -> ChainHead:
    manifest = write_delta(folder, parent=head, state=state, **kw)
    return ChainHead(
        state={k: v.clone() for k, v in state.items()},
        folder_digest=manifest.digest,
        uri=str(folder),
        position=head.position + 1,
        base_digest=head.base_digest,
    )


def test_chain_of_20_deltas_on_a_fresh_state_equals_the_trainers_weights(
    model_dir: Path, tmp_path: Path
) -> None:
    trainer = TrainerEngine(model_dir, max_seq_len=64)
    rng = random.Random(0)
    base_state = full_state_dict(trainer.model)
    head = save_base(tmp_path / "base", base_state, "base")
    folders = []
    for step in range(20):
        rl_step(trainer, rng)
        folders.append(tmp_path / f"delta-{step}")
        head = save_delta(folders[-1], head, full_state_dict(trainer.model))
    assert read_link(folders[-1]).position == 20

    # A fresh sampler: only the base folder's bytes, then the chain.
    from safetensors.torch import load_file

    fresh = load_file(str(tmp_path / "base" / WEIGHTS_NAME))
    rebuilt = apply_chain(fresh, folders, parent_digest=read_manifest(tmp_path / "base").digest)
    trained = full_state_dict(trainer.model)
    assert state_digest(rebuilt) == state_digest(trained)
    assert all(torch.equal(rebuilt[k].view(torch.int32), trained[k].view(torch.int32))
               for k in trained)  # fmt: skip


@pytest.mark.parametrize("codec", ["raw", "zstd", "xor_zstd"])
def test_every_codec_is_lossless_including_nan_and_negative_zero(codec: str) -> None:
    old = torch.randn(64, 32)  # (C, C')
    new = old + 1e-5 * torch.randn(64, 32)
    new[0, 0], new[0, 1], old[0, 2] = float("nan"), -0.0, 0.0
    stored = encode(new, old, codec)  # type: ignore[arg-type]
    back = decode(stored, old, codec, dtype=torch.float32, shape=[64, 32])  # type: ignore[arg-type]
    assert torch.equal(back.view(torch.int32), new.view(torch.int32))


def test_a_corrupted_delta_is_refused_naming_the_file(model_dir: Path, tmp_path: Path) -> None:
    trainer = TrainerEngine(model_dir, max_seq_len=64)
    base_state = full_state_dict(trainer.model)
    head = save_base(tmp_path / "base", base_state, "base")
    rl_step(trainer, random.Random(1))
    save_delta(tmp_path / "d1", head, full_state_dict(trainer.model))
    path = tmp_path / "d1" / DELTA_WEIGHTS_NAME
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatchError) as err:
        apply_delta(base_state, tmp_path / "d1")
    assert err.value.relative_file_name == DELTA_WEIGHTS_NAME
    assert "sha256" in str(err.value)


def test_a_delta_onto_the_wrong_parent_is_refused(model_dir: Path, tmp_path: Path) -> None:
    trainer = TrainerEngine(model_dir, max_seq_len=64)
    head = save_base(tmp_path / "base", full_state_dict(trainer.model), "base")
    rl_step(trainer, random.Random(2))
    save_delta(tmp_path / "d1", head, full_state_dict(trainer.model))
    with pytest.raises(DeltaChainError, match="parent digest"):
        apply_delta(head.state, tmp_path / "d1", parent_digest="0" * 64)
    # Right parent name but other bits underneath: the result's digest gives it away.
    wrong = {k: v + 1 for k, v in head.state.items()}
    with pytest.raises(ChecksumMismatchError, match="weights digest after apply"):
        apply_delta(wrong, tmp_path / "d1")


def test_delta_of_a_small_learning_rate_rl_step_moves_fewer_bytes_than_a_base(
    model_dir: Path, tmp_path: Path
) -> None:
    trainer = TrainerEngine(model_dir, max_seq_len=64)
    head = save_base(tmp_path / "base", full_state_dict(trainer.model), "base")
    rl_step(trainer, random.Random(3))
    state = full_state_dict(trainer.model)
    base_bytes = (tmp_path / "base" / WEIGHTS_NAME).stat().st_size
    sizes = {}
    for codec in ("raw", "zstd", "xor_zstd"):
        write_delta(tmp_path / codec, parent=head, state=state, codec=codec)  # type: ignore[arg-type]
        sizes[codec] = (tmp_path / codec / DELTA_WEIGHTS_NAME).stat().st_size
    # Every tensor moves under AdamW, so raw is a base's worth; XOR keeps only the low bits.
    assert sizes["xor_zstd"] < 0.75 * base_bytes, (sizes, base_bytes)
    assert sizes["xor_zstd"] < sizes["zstd"] <= sizes["raw"] * 1.01, sizes


def test_unchanged_tensors_are_left_out_of_a_delta(tmp_path: Path) -> None:
    state = {"a": torch.randn(8, 8), "b": torch.randn(8)}
    head = save_base(tmp_path / "base", state, "base")
    new = {"a": state["a"].clone(), "b": state["b"] + 1}
    manifest = write_delta(tmp_path / "d", parent=head, state=new)
    assert manifest.metadata["changed_tensors"] == 1
    assert manifest.metadata["checkpoint_type"] == "delta"
    assert manifest.metadata["parent_digest"] == head.folder_digest
    assert state_digest(apply_delta(state, tmp_path / "d")) == state_digest(new)


def test_saves_are_base_unless_a_delta_is_asked_for_and_lora_forces_base() -> None:
    assert choose_checkpoint_type(None, has_chain_head=False, lora_rank=0) == "base"
    assert choose_checkpoint_type(None, has_chain_head=True, lora_rank=0) == "base"
    assert choose_checkpoint_type("delta", has_chain_head=True, lora_rank=0) == "delta"
    assert choose_checkpoint_type("base", has_chain_head=True, lora_rank=0) == "base"
    assert choose_checkpoint_type("delta", has_chain_head=True, lora_rank=8) == "base"
    with pytest.raises(DeltaChainError, match="save a base first"):
        choose_checkpoint_type("delta", has_chain_head=False, lora_rank=0)


def test_promotability_matrix_quotes_the_rule() -> None:
    check_promotable(checkpoint_type="base", position=0, lora_rank=0)
    check_promotable(checkpoint_type="base", position=0, lora_rank=16)
    check_promotable(checkpoint_type="delta", position=3, lora_rank=16)
    with pytest.raises(NotPromotableError) as err:
        check_promotable(checkpoint_type="delta", position=3, lora_rank=0)
    assert PROMOTABILITY_RULE in str(err.value)
    assert "only the first checkpoint (saved as base) is promotable" in str(err.value)


@pytest.mark.parametrize("item", [1, 2, 4, 8])
def test_byte_shuffle_is_the_transpose_of_the_elements_bytes(item: int) -> None:
    bytes_NI = np.random.default_rng(0).integers(0, 256, size=24 * item, dtype=np.uint8)
    shuffled_IN = deltas._shuffle(bytes_NI, item)
    # The stored format: byte k of every element, then byte k + 1 of every element, ...
    assert shuffled_IN.tobytes() == bytes_NI.reshape(-1, item).T.tobytes()
    back = deltas._unshuffle(np.frombuffer(shuffled_IN.tobytes(), dtype=np.uint8), item)
    assert back.tobytes() == bytes_NI.tobytes()


def test_threads_write_and_apply_the_same_delta_as_one_thread(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trainer = TrainerEngine(model_dir, max_seq_len=64)
    base_state = {k: v.clone() for k, v in full_state_dict(trainer.model).items()}
    head = save_base(tmp_path / "base", base_state, "base")
    rl_step(trainer, random.Random(4))
    state = full_state_dict(trainer.model)
    one = write_delta(tmp_path / "one", parent=head, state=state)
    monkeypatch.setattr(deltas, "PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(deltas, "CODEC_THREADS", 3)

    threaded = write_delta(tmp_path / "threaded", parent=head, state=state)

    assert threaded.digest == one.digest  # byte for byte the same folder
    assert state_digest(apply_delta(base_state, tmp_path / "threaded")) == state_digest(state)
    wrong = {k: v + 1 for k, v in base_state.items()}
    with pytest.raises(ChecksumMismatchError, match="weights digest after apply"):
        apply_delta(wrong, tmp_path / "threaded")


def test_trainer_saves_a_base_then_deltas_that_a_sampler_replays_bit_for_bit(
    model_dir: Path, tmp_path: Path
) -> None:
    trainer = TrainerEngine(model_dir, max_seq_len=64)
    sampler = SamplerEngine(model_dir)
    rng = random.Random(5)
    trainer.save_weights_for_sampler(tmp_path / "0", checkpoint_type="base", uri="u0")
    for step in range(1, 3):
        rl_step(trainer, rng)  # moves the live weights: the chain head must be a copy
        trainer.save_weights_for_sampler(tmp_path / str(step), checkpoint_type="delta",
                                         uri=f"u{step}")  # fmt: skip
    sampler.load_chain([tmp_path / "0", tmp_path / "1", tmp_path / "2"], checkpoint_id="2")

    assert state_digest(full_state_dict(sampler.model)) == state_digest(
        full_state_dict(trainer.model)
    )
    assert read_link(tmp_path / "2").state_digest == state_digest(full_state_dict(trainer.model))


def test_tensors_sharing_memory_are_saved_each_with_its_own_bytes(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    tied = torch.randn(4, 3)
    state = {"embed.weight": tied, "lm_head.weight": tied, "norm.weight": torch.ones(3)}

    save_weights(state, tmp_path / WEIGHTS_NAME)

    back = load_file(str(tmp_path / WEIGHTS_NAME))
    assert all(torch.equal(back[k], v) for k, v in state.items())
