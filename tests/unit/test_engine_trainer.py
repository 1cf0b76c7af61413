"""The trainer engine: hand-checked losses, -100 targets, AdamW, bit-identical resume, LoRA."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

from gpu_workers.engine.sampler import SamplerEngine
from gpu_workers.engine.trainer import TrainerEngine
from gpu_workers.engine.types import AdamParams, Datum, InvalidInputError, SamplingParams
from gpu_workers.manifest import ChecksumMismatchError, read_manifest
from gpu_workers.tiny_model import BOS_ID, ensure_tiny_model

torch.set_num_threads(1)
V = 260  # the tiny model's vocabulary


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def _uniform_trainer(model_dir: Path) -> TrainerEngine:
    """A trainer whose model outputs all-zero logits: every token has logp = -log(V)."""
    trainer = TrainerEngine(model_dir, max_seq_len=32)
    with torch.no_grad():
        for param in trainer.model.parameters():
            param.zero_()
    return trainer


def _batch() -> list[Datum]:
    return [
        Datum.from_tokens(list(b"the cat sat"), weights=[1.0] * 5 + [0.5] * 5),
        Datum.from_tokens(list(b"on a mat")),
    ]


def _reference_logprobs(trainer: TrainerEngine, datum: Datum) -> torch.Tensor:
    """logp of each target straight from the HF model's logits, independently of the engine."""
    with torch.no_grad():
        logits = trainer.model(input_ids=torch.tensor([datum.model_input])).logits[0]
    logp = torch.log_softmax(logits.double(), dim=-1)
    targets = [int(t) for t in datum.loss_fn_inputs["target_tokens"]]
    return torch.tensor([logp[i, t] if t != -100 else 0.0 for i, t in enumerate(targets)])


def test_cross_entropy_on_uniform_logits_is_weight_sum_times_log_vocab(model_dir: Path) -> None:
    trainer = _uniform_trainer(model_dir)
    datum = Datum.from_tokens([BOS_ID, 5, 6, 7], weights=[1.0, 0.5, 2.0])

    out = trainer.forward_backward([datum], "cross_entropy")

    assert out.loss == pytest.approx(3.5 * math.log(V), rel=1e-6)
    assert out.metrics["loss:sum"] == out.loss
    assert out.metrics["tokens:sum"] == 3
    assert out.loss_fn_outputs[0]["logprobs"] == pytest.approx([-math.log(V)] * 3, rel=1e-6)


def test_importance_sampling_on_uniform_logits_matches_hand_computation(model_dir: Path) -> None:
    trainer = _uniform_trainer(model_dir)
    sampler_logprobs = [-5.0, -6.0, -4.0]
    advantages = [1.0, -0.5, 2.0]
    datum = Datum.from_tokens([BOS_ID, 5, 6, 7], logprobs=sampler_logprobs, advantages=advantages)
    lp = -math.log(V)  # the trainer's logprob of every token
    expected = -sum(math.exp(lp - q) * a for q, a in zip(sampler_logprobs, advantages, strict=True))
    expected_gap = sum(abs(q - lp) for q in sampler_logprobs) / 3

    out = trainer.forward_backward([datum], "importance_sampling")

    assert out.loss == pytest.approx(expected, rel=1e-5)
    assert out.metrics["logprob_gap:mean"] == pytest.approx(expected_gap, rel=1e-5)


def test_losses_match_an_independent_log_softmax_on_a_random_model(model_dir: Path) -> None:
    trainer = TrainerEngine(model_dir, max_seq_len=32)
    data = _batch()
    ref = [_reference_logprobs(trainer, d) for d in data]
    weights = [
        torch.tensor(d.loss_fn_inputs.get("weights", [1.0] * len(r)))
        for d, r in zip(data, ref, strict=True)
    ]

    out = trainer.forward([*data], "cross_entropy")

    expected = -sum(float((w * r).sum()) for w, r in zip(weights, ref, strict=True))
    assert out.loss == pytest.approx(expected, rel=1e-5)
    for got, r in zip(out.loss_fn_outputs, ref, strict=True):
        assert got["logprobs"] == pytest.approx(r.tolist(), abs=1e-5)


def test_targets_of_minus_100_contribute_nothing(model_dir: Path) -> None:
    trainer = TrainerEngine(model_dir, max_seq_len=32)
    tokens = [BOS_ID, 10, 20, 30, 40]
    masked = Datum(model_input=tokens[:-1], loss_fn_inputs={"target_tokens": [10, -100, 30, -100]})
    first = Datum(model_input=tokens[:2], loss_fn_inputs={"target_tokens": [10, -100]})
    ref = _reference_logprobs(trainer, Datum.from_tokens(tokens))

    out = trainer.forward([masked], "cross_entropy")

    assert out.metrics["tokens:sum"] == 2
    assert out.loss == pytest.approx(-float(ref[0] + ref[2]), rel=1e-5)
    assert trainer.forward([first], "cross_entropy").metrics["tokens:sum"] == 1


def test_forward_backward_accumulates_gradients_across_calls(model_dir: Path) -> None:
    data = _batch()
    together = TrainerEngine(model_dir, max_seq_len=32)
    split = TrainerEngine(model_dir, max_seq_len=32)

    together.forward_backward(data, "cross_entropy")
    split.forward_backward(data[:1], "cross_entropy")
    split.forward_backward(data[1:], "cross_entropy")

    for name, param in together.trainable.items():
        torch.testing.assert_close(split.trainable[name].grad, param.grad, atol=1e-6, rtol=1e-5)


def test_optim_step_is_adamw_with_that_calls_hyperparameters(model_dir: Path) -> None:
    trainer = TrainerEngine(model_dir, max_seq_len=32)
    reference = copy.deepcopy(trainer.model)
    ref_opt = torch.optim.AdamW(reference.parameters())
    steps = [
        AdamParams(),
        AdamParams(
            learning_rate=3e-3,
            beta1=0.8,
            beta2=0.99,
            eps=1e-8,
            weight_decay=0.1,
            grad_clip_norm=0.5,
        ),
    ]
    data = _batch()
    for params in steps:
        trainer.forward_backward(data, "cross_entropy")
        out = trainer.optim_step(params)

        ids = torch.nn.utils.rnn.pad_sequence(
            [torch.tensor(d.model_input) for d in data], batch_first=True, padding_value=256
        )
        targets = torch.nn.utils.rnn.pad_sequence(
            [torch.tensor(d.loss_fn_inputs["target_tokens"], dtype=torch.long) for d in data],
            batch_first=True,
            padding_value=-100,
        )
        w = torch.nn.utils.rnn.pad_sequence(
            [
                torch.tensor(d.loss_fn_inputs.get("weights", [1.0] * len(d.model_input)))
                for d in data
            ],
            batch_first=True,
        )
        logits = reference(input_ids=ids).logits
        nll = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="none"
        )
        (nll * w.flatten()).sum().backward()
        norm = torch.nn.utils.clip_grad_norm_(
            reference.parameters(), params.grad_clip_norm or float("inf")
        )
        for group in ref_opt.param_groups:
            group.update(
                lr=params.learning_rate,
                betas=(params.beta1, params.beta2),
                eps=params.eps,
                weight_decay=params.weight_decay,
            )
        ref_opt.step()
        ref_opt.zero_grad()
        assert out.metrics["grad_norm"] == pytest.approx(float(norm), rel=1e-4)

    assert trainer.step == 2
    for (name, got), want in zip(
        trainer.model.named_parameters(), reference.parameters(), strict=True
    ):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5, msg=name)
        assert got.grad is None  # zeroed after the step


def test_compute_logprobs_has_none_first_and_matches_forward(model_dir: Path) -> None:
    trainer = TrainerEngine(model_dir, max_seq_len=32)
    tokens = [BOS_ID, *b"hello"]

    logprobs = trainer.compute_logprobs(tokens)

    assert logprobs[0] is None and len(logprobs) == len(tokens)
    ref = _reference_logprobs(trainer, Datum.from_tokens(tokens))
    assert logprobs[1:] == pytest.approx(ref.tolist(), abs=1e-5)


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_resume_from_saved_state_gives_identical_losses(
    model_dir: Path, tmp_path: Path, lora_rank: int
) -> None:
    data, params = _batch(), AdamParams(learning_rate=1e-2)
    first = TrainerEngine(model_dir, max_seq_len=32, lora_rank=lora_rank, seed=3)
    for _ in range(2):
        first.forward_backward(data, "cross_entropy")
        first.optim_step(params)
    first.save_state(tmp_path / "state")
    losses_first = []
    for _ in range(3):
        losses_first.append(first.forward_backward(data, "cross_entropy").loss)
        first.optim_step(params)

    resumed = TrainerEngine(model_dir, max_seq_len=32, lora_rank=lora_rank, seed=99)
    resumed.load_state(tmp_path / "state")
    losses_resumed = []
    for _ in range(3):
        losses_resumed.append(resumed.forward_backward(data, "cross_entropy").loss)
        resumed.optim_step(params)

    assert losses_resumed == losses_first  # bit for bit, not approximately
    assert resumed.step == first.step == 5
    assert read_manifest(tmp_path / "state").metadata["step"] == 2


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_sampler_logprobs_match_trainer_after_weight_sync(
    model_dir: Path, tmp_path: Path, lora_rank: int
) -> None:
    trainer = TrainerEngine(model_dir, max_seq_len=64, lora_rank=lora_rank)
    for _ in range(3):
        trainer.forward_backward(_batch(), "cross_entropy")
        trainer.optim_step(AdamParams(learning_rate=1e-2))
    sampler = SamplerEngine(model_dir)
    manifest = trainer.save_weights_for_sampler(tmp_path / "sampler")
    version = sampler.load_weights(tmp_path / "sampler", checkpoint_id="step-3")
    (seq,) = sampler.sample([BOS_ID, *b"the"], 1, SamplingParams(max_tokens=24, seed=5))

    assert version.digest == manifest.digest and seq.weights_version == version
    trainer_logprobs = trainer.compute_logprobs([BOS_ID, *b"the", *seq.tokens])[4:]
    assert seq.logprobs == pytest.approx(trainer_logprobs, abs=1e-4)
    assert sampler.compute_logprobs([BOS_ID, *b"the"]) == pytest.approx(
        trainer.compute_logprobs([BOS_ID, *b"the"]), abs=1e-4
    )


def test_lora_trains_only_adapters_and_its_state_holds_only_the_adapters(
    model_dir: Path, tmp_path: Path
) -> None:
    trainer = TrainerEngine(model_dir, max_seq_len=32, lora_rank=4)
    embed_before = trainer.base_model.get_input_embeddings().weight.detach().clone()
    before = trainer.forward(_batch(), "cross_entropy").loss
    for _ in range(5):
        trainer.forward_backward(_batch(), "cross_entropy")
        trainer.optim_step(AdamParams(learning_rate=1e-2))

    assert trainer.forward(_batch(), "cross_entropy").loss < before
    assert all("lora_" in name for name in trainer.trainable)
    assert torch.equal(trainer.base_model.get_input_embeddings().weight, embed_before)
    manifest = trainer.save_state(tmp_path / "state")
    names = {f.path for f in manifest.files}
    assert {"adapter_config.json", "dcp/.metadata", "dcp/__0_0.distcp"} <= names
    assert "model.safetensors" not in names
    with pytest.raises(InvalidInputError) as err:
        TrainerEngine(model_dir, max_seq_len=32).load_state(tmp_path / "state")
    assert err.value.field == "lora_rank"


def test_bad_requests_name_the_field_and_leave_gradients_alone(model_dir: Path) -> None:
    trainer = TrainerEngine(model_dir, max_seq_len=8)
    too_long = Datum.from_tokens(list(range(20)))

    cases = [
        (lambda: trainer.forward_backward([too_long], "cross_entropy"), "data[0].model_input"),
        (lambda: trainer.forward_backward(_batch()[:1], "dpo"), "loss_fn"),
        (
            lambda: trainer.forward_backward([Datum.from_tokens([1, 2])], "importance_sampling"),
            "data[0].loss_fn_inputs.logprobs",
        ),
        (lambda: trainer.optim_step(AdamParams(learning_rate=-1.0)), "learning_rate"),
        (lambda: trainer.compute_logprobs([1, 2, 300]), "tokens[2]"),
        (lambda: TrainerEngine(model_dir, max_seq_len=4096), "max_seq_len"),
        (lambda: TrainerEngine(model_dir, lora_rank=-1), "lora_rank"),
        (lambda: TrainerEngine(model_dir / "nope"), "model_dir"),
    ]
    for call, field in cases:
        with pytest.raises(InvalidInputError) as err:
            call()
        assert err.value.field == field
    assert all(p.grad is None for p in trainer.trainable.values())


def test_tampered_state_is_refused_before_loading(model_dir: Path, tmp_path: Path) -> None:
    trainer = TrainerEngine(model_dir, max_seq_len=32)
    trainer.save_state(tmp_path / "state")
    with (tmp_path / "state" / "dcp" / "__0_0.distcp").open("ab") as fh:
        fh.write(b"\x00")

    with pytest.raises(ChecksumMismatchError, match="distcp"):
        TrainerEngine(model_dir, max_seq_len=32).load_state(tmp_path / "state")
