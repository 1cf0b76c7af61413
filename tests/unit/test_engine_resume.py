"""Resume checkpoints: K steps, save_state, a fresh engine, load_state, one step == K + 1 steps."""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from gpu_workers.engine.model_io import full_state_dict, save_weights
from gpu_workers.engine.resume import MAX_LOADER_STATE_BYTES, STATE_FORMAT, STATE_FORMAT_V1
from gpu_workers.engine.trainer import TrainerEngine
from gpu_workers.engine.types import AdamParams, Datum, InvalidInputError
from gpu_workers.manifest import ChecksumMismatchError, write_manifest
from gpu_workers.tiny_model import (
    TinyModelConfig,
    build_byte_tokenizer,
    build_tiny_model,
    ensure_tiny_model,
)

torch.set_num_threads(1)
ADAM = AdamParams(learning_rate=1e-2, weight_decay=0.1, grad_clip_norm=1.0)
DATASET = [
    Datum.from_tokens(list(text))
    for text in (b"the cat sat", b"on a mat", b"a dog ran", b"far away", b"then it slept")
]
K = 3  # optimizer steps before the interruption


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def _train_step(engine: TrainerEngine, position: int) -> float:
    """One step of a loop that uses both the data position and torch's RNG: a shuffled pick."""
    order = torch.randperm(len(DATASET)).tolist()
    batch = [DATASET[(i + position) % len(DATASET)] for i in order[:2]]
    loss = engine.forward_backward(batch, "cross_entropy").loss
    engine.optim_step(ADAM)
    return loss


def _moments(engine: TrainerEngine) -> dict[str, dict[str, torch.Tensor]]:
    return {name: engine.optimizer.state[p] for name, p in engine.trainable.items()}


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_resumed_run_takes_the_same_next_step_as_an_uninterrupted_one(
    model_dir: Path, tmp_path: Path, lora_rank: int
) -> None:
    torch.manual_seed(0)
    uninterrupted = TrainerEngine(model_dir, max_seq_len=32, lora_rank=lora_rank, seed=3)
    losses = [_train_step(uninterrupted, position) for position in range(K + 1)]

    torch.manual_seed(0)
    interrupted = TrainerEngine(model_dir, max_seq_len=32, lora_rank=lora_rank, seed=3)
    for position in range(K):
        _train_step(interrupted, position)
    interrupted.save_state(tmp_path / "state", loader_state={"position": K})
    del interrupted
    torch.manual_seed(12345)  # a new process: other RNG state, other LoRA init
    resumed = TrainerEngine(model_dir, max_seq_len=32, lora_rank=lora_rank, seed=99)
    resumed.load_state(tmp_path / "state")
    assert resumed.loader_state == {"position": K}
    next_loss = _train_step(resumed, resumed.loader_state["position"])

    assert next_loss == losses[K]  # bit for bit, not approximately
    assert resumed.step == uninterrupted.step == K + 1
    for name, param in uninterrupted.trainable.items():
        assert torch.equal(resumed.trainable[name], param), name
    for name, slots in _moments(uninterrupted).items():
        for slot, value in slots.items():
            assert torch.equal(_moments(resumed)[name][slot], value), f"{name} {slot}"


def test_load_restores_torchs_rng_as_it_was_at_the_save(model_dir: Path, tmp_path: Path) -> None:
    engine = TrainerEngine(model_dir, max_seq_len=32)
    torch.manual_seed(7)
    torch.rand(3)  # somewhere in the middle of a stream
    engine.save_state(tmp_path / "state")
    expected = torch.rand(16)

    torch.manual_seed(8)
    TrainerEngine(model_dir, max_seq_len=32).load_state(tmp_path / "state")

    assert torch.equal(torch.rand(16), expected)


def test_loader_state_round_trips_and_is_none_when_not_saved(
    model_dir: Path, tmp_path: Path
) -> None:
    engine = TrainerEngine(model_dir, max_seq_len=32)
    position = {"epoch": 1, "batch": 37, "order": [4, 0, 2], "source": {"shard": "a", "p": 0.5}}
    engine.save_state(tmp_path / "with", loader_state=position)
    engine.save_state(tmp_path / "without")
    resumed = TrainerEngine(model_dir, max_seq_len=32)

    resumed.load_state(tmp_path / "with")
    assert resumed.loader_state == position
    resumed.load_state(tmp_path / "without")
    assert resumed.loader_state is None
    doc = json.loads((tmp_path / "with" / "trainer_state.json").read_text())
    assert doc["format"] == STATE_FORMAT and doc["loader_state"] == position


@pytest.mark.parametrize(
    ("loader_state", "reason"),
    [
        ({"blob": "x" * MAX_LOADER_STATE_BYTES}, "bytes as JSON"),
        ({"fn": object()}, "JSON-serialisable"),
        ({"nan": float("nan")}, "JSON-serialisable"),
        ({"order": (1, 2)}, "come back equal"),
        ({1: "int key"}, "come back equal"),
        ([1, 2], "must be a dict"),
    ],
)
def test_a_loader_state_that_cannot_round_trip_is_refused_before_writing(
    model_dir: Path, tmp_path: Path, loader_state: object, reason: str
) -> None:
    engine = TrainerEngine(model_dir, max_seq_len=32)

    with pytest.raises(InvalidInputError, match=reason) as err:
        engine.save_state(tmp_path / "state", loader_state=loader_state)  # type: ignore[arg-type]

    assert err.value.field == "loader_state"
    assert not (tmp_path / "state").exists()
    assert not list(tmp_path.iterdir())  # no staging folder left behind either


def test_v2_folder_is_a_dcp_checkpoint_listed_file_by_file_in_the_manifest(
    model_dir: Path, tmp_path: Path
) -> None:
    engine = TrainerEngine(model_dir, max_seq_len=32, lora_rank=4)
    engine.forward_backward(DATASET[:2], "cross_entropy")
    engine.optim_step(ADAM)

    manifest = engine.save_state(tmp_path / "state")

    names = {f.path for f in manifest.files}
    assert {"dcp/.metadata", "dcp/__0_0.distcp", "trainer_state.json"} <= names
    assert {"adapter_config.json", "config.json", "tokenizer.json"} <= names
    assert not {"model.safetensors", "optimizer.safetensors"} & names
    folder = tmp_path / "state"
    on_disk = {p.relative_to(folder).as_posix() for p in folder.rglob("*")}
    assert names | {"manifest.json", "dcp"} == on_disk
    # A LoRA state holds the adapters, not the frozen base model (about 99k floats).
    assert (tmp_path / "state" / "dcp" / "__0_0.distcp").stat().st_size < 400_000


def test_the_same_state_saved_twice_has_the_same_digest(model_dir: Path, tmp_path: Path) -> None:
    # The store refuses different content under an existing name: a retried save must match.
    engine = TrainerEngine(model_dir, max_seq_len=32)
    engine.forward_backward(DATASET[:2], "cross_entropy")
    engine.optim_step(ADAM)
    rng = torch.get_rng_state()

    first = engine.save_state(tmp_path / "a", loader_state={"batch": 1})
    torch.set_rng_state(rng)
    second = engine.save_state(tmp_path / "b" / "elsewhere", loader_state={"batch": 1})

    assert first.digest == second.digest


def test_saving_before_the_first_step_leaves_the_optimizer_untouched(
    model_dir: Path, tmp_path: Path
) -> None:
    engine = TrainerEngine(model_dir, max_seq_len=32)
    engine.save_state(tmp_path / "state")
    assert not engine.optimizer.state  # no zero-lr initialisation step on the live run

    resumed = TrainerEngine(model_dir, max_seq_len=32)
    resumed.forward_backward(DATASET[:2], "cross_entropy")
    resumed.optim_step(ADAM)
    resumed.load_state(tmp_path / "state")

    assert not resumed.optimizer.state and resumed.step == 0
    assert json.loads((tmp_path / "state" / "trainer_state.json").read_text())["optimizer"] is None


def test_load_without_optimizer_keeps_weights_and_step_and_starts_adamw_afresh(
    model_dir: Path, tmp_path: Path
) -> None:
    engine = TrainerEngine(model_dir, max_seq_len=32)
    for position in range(2):
        _train_step(engine, position)
    engine.save_state(tmp_path / "state")

    resumed = TrainerEngine(model_dir, max_seq_len=32)
    resumed.load_state(tmp_path / "state", optimizer=False)

    assert resumed.step == 2 and not resumed.optimizer.state
    for name, param in engine.trainable.items():
        assert torch.equal(resumed.trainable[name], param)


def _save_v1(engine: TrainerEngine, folder: Path) -> None:
    """A loopstream.trainer_state/v1 folder, as save_state wrote it before v2."""
    folder.mkdir()
    if engine.config.lora_rank > 0:
        from peft import get_peft_model_state_dict

        save_weights(get_peft_model_state_dict(engine.model), folder / "adapter_model.safetensors")
        engine.model.peft_config["default"].save_pretrained(str(folder))
    else:
        save_weights(full_state_dict(engine.model), folder / "model.safetensors")
    optimizer = {
        f"{name}::{slot}": torch.as_tensor(value).detach().clone()
        for name, param in engine.trainable.items()
        for slot, value in engine.optimizer.state[param].items()
    }
    save_file(optimizer, str(folder / "optimizer.safetensors"), metadata={"format": "pt"})
    metadata = {
        "step": engine.step,
        "lora_rank": engine.config.lora_rank,
        "lora_alpha": engine.config.lora_alpha,
        "max_seq_len": engine.config.max_seq_len,
        "seed": engine.config.seed,
    }
    doc = {"format": STATE_FORMAT_V1, **metadata}
    (folder / "trainer_state.json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    engine.base_model.config.save_pretrained(str(folder))
    engine.tokenizer.save_pretrained(str(folder))
    write_manifest(folder, kind="state", metadata=metadata)


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_a_v1_folder_still_resumes_bit_for_bit(
    model_dir: Path, tmp_path: Path, lora_rank: int
) -> None:
    torch.manual_seed(0)
    engine = TrainerEngine(model_dir, max_seq_len=32, lora_rank=lora_rank, seed=3)
    for position in range(K):
        _train_step(engine, position)
    _save_v1(engine, tmp_path / "v1")
    rng = torch.get_rng_state()
    expected = _train_step(engine, K)

    resumed = TrainerEngine(model_dir, max_seq_len=32, lora_rank=lora_rank, seed=99)
    resumed.load_state(tmp_path / "v1")
    torch.set_rng_state(rng)  # v1 kept no RNG state: the caller's job then

    assert resumed.step == K and resumed.loader_state is None
    assert _train_step(resumed, K) == expected
    for name, param in engine.trainable.items():
        assert torch.equal(resumed.trainable[name], param), name


@pytest.mark.parametrize("name", ["dcp/__0_0.distcp", "dcp/.metadata"])
def test_a_corrupted_dcp_file_is_refused_by_the_manifest(
    model_dir: Path, tmp_path: Path, name: str
) -> None:
    engine = TrainerEngine(model_dir, max_seq_len=32)
    _train_step(engine, 0)
    engine.save_state(tmp_path / "state")
    path = tmp_path / "state" / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size, one bit off
    path.write_bytes(bytes(data))
    fresh = TrainerEngine(model_dir, max_seq_len=32)
    before = {n: p.detach().clone() for n, p in fresh.trainable.items()}

    with pytest.raises(ChecksumMismatchError, match=re.escape(name)):
        fresh.load_state(tmp_path / "state")

    assert fresh.step == 0 and not fresh.optimizer.state
    assert all(torch.equal(fresh.trainable[n], p) for n, p in before.items())


class _Payload:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("code from a checkpoint ran",))


def test_a_dcp_index_that_would_run_code_is_refused(model_dir: Path, tmp_path: Path) -> None:
    # The manifest checks integrity, not intent: whoever can rewrite the folder can rewrite it.
    engine = TrainerEngine(model_dir, max_seq_len=32)
    engine.save_state(tmp_path / "state")
    (tmp_path / "state" / "dcp" / ".metadata").write_bytes(pickle.dumps(_Payload()))
    (tmp_path / "state" / "manifest.json").unlink()
    write_manifest(tmp_path / "state", kind="state")

    with pytest.raises(InvalidInputError, match=r"builtins\.print is not allowed"):
        TrainerEngine(model_dir, max_seq_len=32).load_state(tmp_path / "state")


def test_a_state_of_another_model_shape_is_refused_and_leaves_the_engine_alone(
    model_dir: Path, tmp_path: Path
) -> None:
    engine = TrainerEngine(model_dir, max_seq_len=32)
    _train_step(engine, 0)
    engine.save_state(tmp_path / "state")
    narrow_dir = tmp_path / "narrow"
    build_tiny_model(TinyModelConfig(hidden_size=32), seed=0).save_pretrained(narrow_dir)
    build_byte_tokenizer().save_pretrained(narrow_dir)
    narrow = TrainerEngine(narrow_dir, max_seq_len=32)
    narrow.forward_backward(DATASET[:2], "cross_entropy")  # gradients held when the load comes
    before = {n: p.detach().clone() for n, p in narrow.trainable.items()}
    grads = {n: p.grad.clone() for n, p in narrow.trainable.items()}

    with pytest.raises(InvalidInputError, match="does not fit") as err:
        narrow.load_state(tmp_path / "state")

    assert err.value.field == "checkpoint"
    assert narrow.step == 0 and not narrow.optimizer.state
    assert all(torch.equal(narrow.trainable[n], p) for n, p in before.items())
    assert all(torch.equal(narrow.trainable[n].grad, g) for n, g in grads.items())


def test_load_over_held_gradients_restores_adamw_and_drops_them(
    model_dir: Path, tmp_path: Path
) -> None:
    engine = TrainerEngine(model_dir, max_seq_len=32)
    _train_step(engine, 0)
    engine.save_state(tmp_path / "state")
    resumed = TrainerEngine(model_dir, max_seq_len=32)
    resumed.forward_backward(DATASET[:2], "cross_entropy")

    resumed.load_state(tmp_path / "state")

    assert all(p.grad is None for p in resumed.trainable.values())
    for name, slots in _moments(engine).items():
        for slot, value in slots.items():
            assert torch.equal(_moments(resumed)[name][slot], value), f"{name} {slot}"
