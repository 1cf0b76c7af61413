"""tinker-cookbook (pinned 0.6.1, its code unchanged) trains against the Tinker door.

The cookbook's own RL loop (`tinker_cookbook.rl.train.main`) on its arithmetic environment, its
supervised loop (`tinker_cookbook.supervised.train.main`) on its example conversations, and the
math_rl command line with a resume, each for a few steps on the tiny CPU model. The one hook is
the cookbook's public `register_tokenizer`: there is no model hub here, so the tiny model's name
is mapped to its local tokenizer folder; `role_colon` is a cookbook renderer that works with any
tokenizer. Every step's metrics (the cookbook's `metrics.jsonl`) must be finite, and the
sampler and trainer must agree on the sampled tokens' logprobs (`kl_sample_train` < 1e-3).

On the tiny random model the arithmetic reward is the same for every sample (-0.1: no answer,
no stop sequence), so the advantages are zero unless the KL penalty adds its own term: these
tests check that the cookbook's calls run through loopstream, not that the model learns to add.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import tinker_cookbook
from tinker_cookbook.recipes.math_rl.arithmetic_env import ArithmeticDatasetBuilder
from tinker_cookbook.rl import train as rl_train
from tinker_cookbook.supervised import train as sl_train
from tinker_cookbook.supervised.data import FromConversationFileBuilder
from tinker_cookbook.supervised.types import ChatDatasetBuilderCommonConfig
from tinker_cookbook.tokenizer_utils import register_tokenizer, unregister_tokenizer

from gpu_workers.models import resolve_base_model
from infra.settings import Settings

RENDERER = "role_colon"  # "User: ...\n\nAssistant: ...": no chat template needed
KL_SAMPLE_TRAIN_MAX = 1e-3
# Small on purpose: 2 CPU cores run the workers and this test at once.
GROUPS_PER_BATCH = 2
GROUP_SIZE = 2
MAX_TOKENS = 8
RL_STEPS = 3

# `python -c` prelude of the command-line test: registers the tokenizer, then runs the recipe's
# module as `python -m` would (argv: model name, tokenizer folder, then the recipe's own args).
CLI_PRELUDE = """
import runpy, sys
from functools import partial
from transformers import AutoTokenizer
from tinker_cookbook.tokenizer_utils import register_tokenizer
register_tokenizer(sys.argv[1], partial(AutoTokenizer.from_pretrained, sys.argv[2]))
del sys.argv[1:3]
runpy.run_module("tinker_cookbook.recipes.math_rl.train", run_name="__main__", alter_sys=True)
"""


@pytest.fixture(scope="module")
def tokenizer_folder(services: Settings) -> Iterator[Path]:
    """The tiny model's local folder, registered as its name's tokenizer for this module."""
    from transformers import AutoTokenizer

    folder = resolve_base_model(services, services.tiny_model_name)
    register_tokenizer(
        services.tiny_model_name, cache(lambda: AutoTokenizer.from_pretrained(str(folder)))
    )
    yield folder
    unregister_tokenizer(services.tiny_model_name)


@pytest.fixture
def cookbook_env(
    services: Settings, api_key: str, tokenizer_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> str:
    """The base URL the cookbook's configs take; the key goes the SDK's way, TINKER_API_KEY."""
    from api.config import get_api_settings

    monkeypatch.setenv("TINKER_API_KEY", api_key)
    return get_api_settings().base_url


def _metrics(log_path: Path) -> list[dict[str, Any]]:
    with (log_path / "metrics.jsonl").open() as f:
        return [json.loads(line) for line in f if line.strip()]


def _check_metrics(rows: list[dict[str, Any]], *, steps: int) -> None:
    """Steps 0..steps-1 each logged, every number finite, kl_sample_train small where logged."""
    assert {row["step"] for row in rows} >= set(range(steps)), [row["step"] for row in rows]
    for row in rows:
        for name, value in row.items():
            if isinstance(value, int | float):
                assert math.isfinite(value), f"step {row['step']}: {name} = {value}"
            if _is_kl_sample_train(name):
                assert abs(value) < KL_SAMPLE_TRAIN_MAX, f"step {row['step']}: {name} = {value}"
    assert any(_is_kl_sample_train(name) for row in rows for name in row)


def _is_kl_sample_train(name: str) -> bool:
    """`optim/kl_sample_train_v1`, `..._v2` (not `time/compute_kl_sample_train`)."""
    return name.rsplit("/", 1)[-1].startswith("kl_sample_train")


def _arithmetic(model_name: str, *, n_batches: int = RL_STEPS) -> ArithmeticDatasetBuilder:
    return ArithmeticDatasetBuilder(
        batch_size=GROUPS_PER_BATCH,
        model_name_for_tokenizer=model_name,
        renderer_name=RENDERER,
        n_batches=n_batches,
        group_size=GROUP_SIZE,
    )


def _run_rl(
    services: Settings, base_url: str, log_path: Path, **overrides: Any
) -> list[dict[str, Any]]:
    model = services.tiny_model_name
    config = rl_train.Config(
        learning_rate=1e-4,
        dataset_builder=_arithmetic(model),
        model_name=model,
        recipe_name="loopstream_integration_test",
        renderer_name=RENDERER,
        max_tokens=MAX_TOKENS,
        log_path=str(log_path),
        base_url=base_url,
        eval_every=0,
        save_every=0,
        **overrides,
    )
    asyncio.run(rl_train.main(config))
    rows = _metrics(log_path)
    _check_metrics(rows, steps=RL_STEPS)
    return rows


# ------------------------------------------------------------------ RL (rl.train.main)


def test_rl_importance_sampling_on_arithmetic(
    services: Settings, cookbook_env: str, tmp_path: Path
) -> None:
    _run_rl(services, cookbook_env, tmp_path, loss_fn="importance_sampling")


def test_rl_ppo_with_kl_penalty_against_the_base_model(
    services: Settings, cookbook_env: str, tmp_path: Path
) -> None:
    rows = _run_rl(
        services,
        cookbook_env,
        tmp_path,
        loss_fn="ppo",
        kl_penalty_coef=0.1,
        kl_reference_config=rl_train.KLReferenceConfig(base_model=services.tiny_model_name),
    )
    steps = [row for row in rows if "kl_policy_base" in row]
    assert len(steps) == RL_STEPS
    # The penalty is the only non-zero advantage here: the policy moves.
    assert any(row["grad_norm"] > 0 for row in steps)


def test_rl_async_off_policy(services: Settings, cookbook_env: str, tmp_path: Path) -> None:
    rows = _run_rl(
        services,
        cookbook_env,
        tmp_path,
        async_config=rl_train.AsyncConfig(
            max_steps_off_policy=1, groups_per_batch=GROUPS_PER_BATCH, loss_fn="ppo"
        ),
    )
    # Sampling ran ahead: some step trained on groups sampled with the previous weights.
    assert max(row.get("async/staleness_max", 0) for row in rows) >= 1


def test_rl_stable_reinforce(services: Settings, cookbook_env: str, tmp_path: Path) -> None:
    _run_rl(services, cookbook_env, tmp_path, loss_fn="stable_reinforce")


def test_rl_gspo(services: Settings, cookbook_env: str, tmp_path: Path) -> None:
    _run_rl(services, cookbook_env, tmp_path, loss_fn="gspo")


# ------------------------------------------------------------------ SL (supervised.train.main)


def test_supervised_on_the_example_conversations_with_nll_evaluation(
    services: Settings, cookbook_env: str, tmp_path: Path
) -> None:
    model = services.tiny_model_name
    conversations = Path(tinker_cookbook.__file__).parent / "example_data" / "conversations.jsonl"
    steps = 3
    config = sl_train.Config(
        log_path=str(tmp_path),
        model_name=model,
        recipe_name="loopstream_integration_test",
        renderer_name=RENDERER,
        dataset_builder=FromConversationFileBuilder(
            file_path=str(conversations),
            test_size=8,  # held out: the cookbook scores it with its SamplerNLLEvaluator
            common_config=ChatDatasetBuilderCommonConfig(
                model_name_for_tokenizer=model,
                renderer_name=RENDERER,
                max_length=256,  # bytes, on the byte-level tiny model
                batch_size=16,
            ),
        ),
        learning_rate=1e-3,
        base_url=cookbook_env,
        eval_every=steps - 1,  # steps 0 and 2
        save_every=0,
        max_steps=steps,
    )
    asyncio.run(sl_train.main(config))

    rows = _metrics(tmp_path)
    assert {row["step"] for row in rows} >= set(range(steps))
    for row in rows:
        for name, value in row.items():
            if isinstance(value, int | float):
                assert math.isfinite(value), f"step {row['step']}: {name} = {value}"
    assert all(row["train_mean_nll"] > 0 for row in rows if "train_mean_nll" in row)
    test_nll = [row["test/nll"] for row in rows if "test/nll" in row]
    assert len(test_nll) == 2
    assert test_nll[-1] < test_nll[0]  # three steps at lr 1e-3 lower the held-out NLL


# ------------------------------------------------------------------ math_rl command line


def _math_rl_cli(
    services: Settings, tokenizer_folder: Path, base_url: str, log_path: Path, *, max_steps: int
) -> subprocess.CompletedProcess[str]:
    args = {
        "model_name": services.tiny_model_name,
        "renderer_name": RENDERER,
        "env": "arithmetic",
        "group_size": GROUP_SIZE,
        "groups_per_batch": GROUPS_PER_BATCH,
        "max_tokens": MAX_TOKENS,
        "loss_fn": "ppo",
        "eval_every": 0,
        "save_every": 1,
        "max_steps": max_steps,
        "log_path": log_path,
        "base_url": base_url,
        "behavior_if_log_dir_exists": "resume",
    }
    cmd = [sys.executable, "-c", CLI_PRELUDE, services.tiny_model_name, str(tokenizer_folder)]
    proc = subprocess.run(
        cmd + [f"{name}={value}" for name, value in args.items()],
        env=dict(os.environ),  # TINKER_API_KEY from cookbook_env
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def test_math_rl_command_line_then_resume(
    services: Settings, cookbook_env: str, tokenizer_folder: Path, tmp_path: Path
) -> None:
    first = _math_rl_cli(services, tokenizer_folder, cookbook_env, tmp_path, max_steps=2)
    assert "Resumed training" not in first.stdout + first.stderr
    _check_metrics(_metrics(tmp_path), steps=2)

    second = _math_rl_cli(services, tokenizer_folder, cookbook_env, tmp_path, max_steps=4)
    output = second.stdout + second.stderr
    assert "Resumed training from tinker://" in output, output[-4000:]
    rows = _metrics(tmp_path)
    _check_metrics(rows, steps=4)
    trained = [row["step"] for row in rows if "optim/kl_sample_train_v1" in row]
    assert trained == [0, 1, 2, 3]  # steps 0-1 from the first run, 2-3 after the resume
