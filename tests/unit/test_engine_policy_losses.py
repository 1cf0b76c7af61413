"""ppo, cispo and dro: loss values against a hand-computed case and an independent torch
reference, gradients against autograd on the reference, loss_fn_config checks, sampler top_k."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from gpu_workers.engine.sampler import SamplerEngine
from gpu_workers.engine.trainer import TrainerEngine
from gpu_workers.engine.types import Datum, InvalidInputError, SamplingParams
from gpu_workers.tiny_model import BOS_ID, ensure_tiny_model

torch.set_num_threads(1)
V = 260  # the tiny model's vocabulary
TOKENS = [BOS_ID, 97, 98, 99, 97, 100]
SAMPLER_LOGP = [-5.0, -5.8, -5.4, -6.2, -5.5]
ADVANTAGES = [1.0, -1.0, 0.5, 2.0, -0.5]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def _datum() -> Datum:
    return Datum.from_tokens(TOKENS, logprobs=SAMPLER_LOGP, advantages=ADVANTAGES)


def _reference(
    trainer: TrainerEngine, loss_fn: str, config: dict[str, float]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The loss written straight from Tinker's formulas on the model's own logits (float64)."""
    params = list(trainer.trainable.values())
    logits = trainer.model(input_ids=torch.tensor([TOKENS[:-1]])).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)[torch.arange(5), torch.tensor(TOKENS[1:])]
    q = torch.tensor(SAMPLER_LOGP, dtype=torch.float64)
    adv = torch.tensor(ADVANTAGES, dtype=torch.float64)
    ratio = torch.exp(logp - q)
    if loss_fn == "ppo":
        clipped = ratio.clamp(config["clip_low_threshold"], config["clip_high_threshold"])
        loss = -torch.min(ratio * adv, clipped * adv).sum()
    elif loss_fn == "cispo":
        clipped = ratio.clamp(config["clip_low_threshold"], config["clip_high_threshold"])
        loss = -(clipped.detach() * logp * adv).sum()
    else:
        loss = -(logp * adv - 0.5 * config["beta"] * (logp - q) ** 2).sum()
    grads = torch.autograd.grad(loss, params)
    return loss.detach(), list(grads)


@pytest.mark.parametrize(
    ("loss_fn", "config"),
    [
        ("ppo", {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}),
        ("ppo", {"clip_low_threshold": 0.95, "clip_high_threshold": 1.05}),
        ("cispo", {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}),
        ("dro", {"beta": 0.05}),
        ("dro", {"beta": 2.0}),
    ],
)
def test_policy_loss_and_gradients_match_the_torch_reference(
    model_dir: Path, loss_fn: str, config: dict[str, float]
) -> None:
    trainer = TrainerEngine(model_dir, max_seq_len=32)
    expected_loss, expected_grads = _reference(trainer, loss_fn, config)

    out = trainer.forward_backward([_datum()], loss_fn, config)

    assert out.loss == pytest.approx(float(expected_loss), rel=1e-5, abs=1e-6)
    for param, expected in zip(trainer.trainable.values(), expected_grads, strict=True):
        assert param.grad is not None
        torch.testing.assert_close(param.grad.double(), expected.double(), rtol=1e-3, atol=1e-6)


def _uniform_trainer(model_dir: Path) -> TrainerEngine:
    trainer = TrainerEngine(model_dir, max_seq_len=32)
    with torch.no_grad():
        for param in trainer.model.parameters():
            param.zero_()
    return trainer


def test_ppo_clips_the_ratio_by_hand(model_dir: Path) -> None:
    # Uniform logits: logp = -log V = -5.5607 everywhere. With q = logp - 1 the ratio is e
    # (2.718), clipped to 1.2: A = +1 gains only 1.2, A = -1 pays the full -e (min of the two).
    logp = -math.log(V)
    datum = Datum.from_tokens(
        [BOS_ID, 5, 6], logprobs=[logp - 1.0, logp - 1.0], advantages=[1.0, -1.0]
    )
    out = _uniform_trainer(model_dir).forward([datum], "ppo")
    assert out.loss == pytest.approx(-(1.2 * 1.0) + math.e * 1.0, rel=1e-5)


def test_dro_penalty_by_hand(model_dir: Path) -> None:
    # logp - q = 1 on both tokens: loss = -sum(logp * A) + beta / 2 * 2 = -logp * 1.5 + beta.
    logp = -math.log(V)
    datum = Datum.from_tokens(
        [BOS_ID, 5, 6], logprobs=[logp - 1.0, logp - 1.0], advantages=[1.0, 0.5]
    )
    out = _uniform_trainer(model_dir).forward([datum], "dro", {"beta": 0.5})
    assert out.loss == pytest.approx(-logp * 1.5 + 0.5, rel=1e-5)


def test_forward_leaves_gradients_alone(model_dir: Path) -> None:
    trainer = TrainerEngine(model_dir, max_seq_len=32)
    trainer.forward([_datum()], "cispo")
    assert all(p.grad is None for p in trainer.trainable.values())


def test_unknown_loss_fn_config_key_is_refused_naming_it(model_dir: Path) -> None:
    trainer = TrainerEngine(model_dir, max_seq_len=32)
    with pytest.raises(InvalidInputError) as err:
        trainer.forward_backward([_datum()], "ppo", {"beta": 1.0})
    assert err.value.field == "loss_fn_config.beta"


def test_sampler_top_k_one_is_greedy(model_dir: Path) -> None:
    sampler = SamplerEngine(model_dir)
    greedy = sampler.sample([BOS_ID, 97], 1, SamplingParams(max_tokens=8, temperature=0.0))
    top1 = sampler.sample(
        [BOS_ID, 97], 3, SamplingParams(max_tokens=8, temperature=1.0, top_k=1, seed=3)
    )
    assert all(s.tokens == greedy[0].tokens for s in top1)
    with pytest.raises(InvalidInputError):
        SamplingParams(top_k=0)
