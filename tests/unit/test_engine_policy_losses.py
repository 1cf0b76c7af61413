"""ppo, cispo, dro, gspo and stable_reinforce: loss values against a hand-computed case and an
independent torch reference, gradients against autograd on the reference, loss_fn_config checks,
sampler top_k, top-k logprobs and prompt-cache hits."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from gpu_workers.engine.sampler import SamplerEngine
from gpu_workers.engine.trainer import TrainerEngine
from gpu_workers.engine.types import Datum, InvalidInputError, PromptScoring, SamplingParams
from gpu_workers.tiny_model import BOS_ID, ensure_tiny_model

torch.set_num_threads(1)
V = 260  # the tiny model's vocabulary
TOKENS = [BOS_ID, 97, 98, 99, 97, 100]
SAMPLER_LOGP = [-5.0, -5.8, -5.4, -6.2, -5.5]
ADVANTAGES = [1.0, -1.0, 0.5, 2.0, -0.5]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


RATIO_MASK = [0.0, 1.0, 1.0, 1.0, 0.0]


def _datum(loss_fn: str = "ppo", config: dict[str, float] | None = None) -> Datum:
    datum = Datum.from_tokens(TOKENS, logprobs=SAMPLER_LOGP, advantages=ADVANTAGES)
    if loss_fn == "gspo" and (config or {}).get("masked"):
        return Datum(datum.model_input, {**datum.loss_fn_inputs, "sequence_ratio_mask": RATIO_MASK})
    return datum


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
    elif loss_fn == "dro":
        loss = -(logp * adv - 0.5 * config["beta"] * (logp - q) ** 2).sum()
    elif loss_fn == "gspo":
        # One ratio per sequence, the geometric mean of the token ratios over the mask; each
        # token's gradient flows through its own logp (GSPO-token).
        mask = torch.tensor(RATIO_MASK if config.get("masked") else [1.0] * 5, dtype=torch.float64)
        seq_ratio = torch.exp(((logp - q) * mask).sum() / mask.sum()).detach()
        token_ratio = seq_ratio * torch.exp(logp - logp.detach())
        lo, hi = (
            config.get("clip_low_threshold", 1 - 3e-4),
            config.get("clip_high_threshold", 1 + 4e-4),
        )
        loss = -torch.min(token_ratio * adv, token_ratio.clamp(lo, hi) * adv).sum()
    else:  # stable_reinforce
        cap, kl_coeff = config.get("clip_high_threshold", 2.0), config.get("kl_coeff", 0.0)
        weight = torch.clamp(ratio, max=cap).detach()
        kl = torch.exp(q - logp) - (q - logp) - 1
        loss = -(weight * logp * adv).sum() + kl_coeff * kl.sum()
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
        ("gspo", {}),
        ("gspo", {"clip_low_threshold": 0.5, "clip_high_threshold": 2.0}),
        ("gspo", {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1, "masked": 1.0}),
        ("stable_reinforce", {}),
        ("stable_reinforce", {"kl_coeff": 0.5, "clip_high_threshold": 1.01}),
    ],
)
def test_policy_loss_and_gradients_match_the_torch_reference(
    model_dir: Path, loss_fn: str, config: dict[str, float]
) -> None:
    trainer = TrainerEngine(model_dir, max_seq_len=32)
    expected_loss, expected_grads = _reference(trainer, loss_fn, config)

    engine_config = {k: v for k, v in config.items() if k != "masked"}
    out = trainer.forward_backward([_datum(loss_fn, config)], loss_fn, engine_config)

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


def test_gspo_ratio_is_one_per_sequence(model_dir: Path) -> None:
    # Sampler logprobs off by +0.1 on one token and -0.1 on another: the token ratios differ, but
    # their geometric mean is 1, so GSPO's sequence ratio is 1 and nothing is clipped.
    trainer = TrainerEngine(model_dir, max_seq_len=32)
    logp = trainer.forward(
        [Datum.from_tokens(TOKENS, weights=[1.0] * 5)], "cross_entropy"
    ).loss_fn_outputs[0]["logprobs"]
    q = [v + d for v, d in zip(logp, [0.1, -0.1, 0.0, 0.0, 0.0], strict=True)]
    datum = Datum.from_tokens(TOKENS, logprobs=q, advantages=[1.0] * 5)
    out = trainer.forward([datum], "gspo", {})
    assert out.loss == pytest.approx(-5.0, rel=1e-4)


def test_stable_reinforce_config_is_checked(model_dir: Path) -> None:
    trainer = TrainerEngine(model_dir, max_seq_len=32)
    with pytest.raises(InvalidInputError) as err:
        trainer.forward([_datum()], "stable_reinforce", {"kl_coeff": -1.0})
    assert err.value.field == "loss_fn_config.kl_coeff"
    with pytest.raises(InvalidInputError) as err:
        trainer.forward([_datum()], "stable_reinforce", {"beta": 1.0})
    assert err.value.field == "loss_fn_config.beta"


def test_sampler_answers_top_k_logprobs_and_prompt_cache_hits(model_dir: Path) -> None:
    sampler = SamplerEngine(model_dir)
    params = SamplingParams(max_tokens=4, temperature=1.0, seed=1, topk_logprobs=3)
    (first,) = sampler.sample([BOS_ID, 97, 98], 1, params)
    (again,) = sampler.sample([BOS_ID, 97, 98], 1, params)
    assert first.prompt_cache_hit_tokens == 0 and again.prompt_cache_hit_tokens == 3
    assert first.topk_logprobs is not None and len(first.topk_logprobs) == len(first.tokens)
    for (token, lp), top in zip(zip(first.tokens, first.logprobs, strict=True),
                                first.topk_logprobs, strict=True):  # fmt: skip
        assert len(top) == 3 and [v for _, v in top] == sorted((v for _, v in top), reverse=True)
        assert lp <= top[0][1] + 1e-6
        assert token not in dict(top) or dict(top)[token] == pytest.approx(lp, abs=1e-5)
    scores = sampler.score_prompt([BOS_ID, 97, 98, 99], PromptScoring(top_k=2))
    assert scores.logprobs[0] is None and scores.topk is not None and scores.topk[0] is None
    assert scores.logprobs[1:] == pytest.approx(sampler.compute_logprobs([BOS_ID, 97, 98, 99])[1:])
    assert all(len(top) == 2 for top in scores.topk[1:] if top is not None)


def test_sampler_scores_target_ids_and_draws_alternative_prompt_tokens(model_dir: Path) -> None:
    sampler = SamplerEngine(model_dir)
    prompt = [BOS_ID, 97, 98, 99]
    full = torch.log_softmax(
        sampler.model(input_ids=torch.tensor([prompt])).logits[0, :-1].double(), dim=-1
    )
    targets = [[97, -1], [5, 6], [-1, 99]]
    scoring = PromptScoring(target_ids=targets, alt_k=4, temperature=1.0, seed=7)
    scores = sampler.score_prompt(prompt, scoring)
    assert scores.target_logprobs is not None and scores.alt_tokens and scores.alt_logprobs
    for t, row in enumerate(targets):
        for j, token in enumerate(row):
            expected = 0.0 if token < 0 else float(full[t, token])
            assert scores.target_logprobs[t][j] == pytest.approx(expected, abs=1e-5)
    assert len(scores.alt_tokens) == 3 and all(len(row) == 4 for row in scores.alt_tokens)
    for t, (tokens, lps) in enumerate(zip(scores.alt_tokens, scores.alt_logprobs, strict=True)):
        assert lps == pytest.approx([float(full[t, token]) for token in tokens], abs=1e-5)
    assert sampler.score_prompt(prompt, scoring).alt_tokens == scores.alt_tokens  # same seed
    with pytest.raises(InvalidInputError) as err:
        sampler.score_prompt(prompt, PromptScoring(target_ids=[[1]]))
    assert err.value.field == "target_prompt_logprobs"
