"""RL sanity: plain on-policy policy gradient through the engines learns a trivial reward.

The loop of the demo, without the control plane: sample from the sampler, score, one
importance-sampling step on the trainer, sync weights to the sampler through a checkpoint folder.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from gpu_workers.engine.sampler import SamplerEngine
from gpu_workers.engine.trainer import TrainerEngine
from gpu_workers.engine.types import AdamParams, Datum, SamplingParams
from gpu_workers.tiny_model import BOS_ID, ensure_tiny_model

torch.set_num_threads(1)

STEPS = 40  # optimizer steps
GROUP = 32  # samples per step
NEW_TOKENS = 16  # generated tokens per sample
LEARNING_RATE = 3e-3


def reward(tokens: list[int]) -> float:
    """Fraction of the generated positions holding the byte 'a'."""
    return tokens.count(ord("a")) / NEW_TOKENS


def test_policy_gradient_raises_the_reward_of_emitting_a(tmp_path: Path) -> None:
    model_dir = ensure_tiny_model(tmp_path / "tiny")
    trainer = TrainerEngine(model_dir, max_seq_len=64)
    sampler = SamplerEngine(model_dir)
    sampling = SamplingParams(max_tokens=NEW_TOKENS, temperature=1.0)
    mean_rewards, gaps = [], []

    for step in range(STEPS):
        seqs = sampler.sample([BOS_ID], GROUP, replace(sampling, seed=step))
        rewards_G = [reward(s.tokens) for s in seqs]
        mean = sum(rewards_G) / GROUP
        data = [
            Datum.from_tokens(
                [BOS_ID, *s.tokens],
                logprobs=s.logprobs,
                advantages=[r - mean] * len(s.tokens),  # advantage = reward - batch mean
            )
            for s, r in zip(seqs, rewards_G, strict=True)
        ]
        out = trainer.forward_backward(data, "importance_sampling")
        trainer.optim_step(AdamParams(learning_rate=LEARNING_RATE))
        folder = tmp_path / f"sampler-{step}"
        trainer.save_weights_for_sampler(folder)
        sampler.load_weights(folder, checkpoint_id=f"step-{step}")
        mean_rewards.append(mean)
        gaps.append(out.metrics["logprob_gap:mean"])

    last5 = sum(mean_rewards[-5:]) / 5
    assert last5 > 0.5, mean_rewards
    assert last5 > 5 * max(mean_rewards[0], 0.01), mean_rewards
    assert max(gaps) < 1e-4  # on-policy: the sampler's logprobs are the trainer's
