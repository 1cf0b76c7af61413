"""Direct in-process engine calls on the tiny model: the floor the control plane adds to.

Times, per call (p50 / p99 over --calls calls, after --warmup untimed ones):
- train step: `forward_backward` (importance_sampling, the RL loss) + `optim_step`;
- sample: `sample` of a group of sequences;
- weight sync: `save_weights_for_sampler` + `SamplerEngine.load_weights` through a folder.

The control-plane overhead benchmark (API -> Kafka -> worker -> event -> future) subtracts these.

    .venv/bin/python benchmarks/engine_step.py --calls 50
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from gpu_workers.engine.model_io import set_cpu_threads
from gpu_workers.engine.sampler import SamplerEngine
from gpu_workers.engine.trainer import TrainerEngine
from gpu_workers.engine.types import AdamParams, Datum, SamplingParams
from gpu_workers.tiny_model import BOS_ID, ensure_tiny_model

RESULTS = Path(__file__).parent / "results" / "engine_step.json"


def percentiles(samples_ms: list[float]) -> dict[str, float]:
    ordered = sorted(samples_ms)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {
        "p50_ms": round(statistics.median(ordered), 3),
        "p99_ms": round(p99, 3),
        "mean_ms": round(statistics.fmean(ordered), 3),
    }


def timed(fn: Callable[[int], object], *, calls: int, warmup: int) -> list[float]:
    for i in range(warmup):
        fn(-1 - i)
    samples = []
    for i in range(calls):
        t0 = time.perf_counter()
        fn(i)
        samples.append((time.perf_counter() - t0) * 1e3)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--group", type=int, default=32, help="sequences per sample / batch")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads (0 = the workers' default, 1)"
    )
    args = parser.parse_args()
    threads = set_cpu_threads(args.threads or None)

    tmp = Path(tempfile.mkdtemp(prefix="engine-bench-"))
    model_dir = ensure_tiny_model(tmp / "tiny")
    trainer = TrainerEngine(model_dir, max_seq_len=64)
    sampler = SamplerEngine(model_dir)
    sampling = SamplingParams(max_tokens=args.new_tokens, temperature=1.0, stop_at_eos=False)
    seqs = sampler.sample([BOS_ID], args.group, sampling)
    batch = [
        Datum.from_tokens(
            [BOS_ID, *s.tokens], logprobs=s.logprobs, advantages=[0.1 * (i % 3 - 1)] * len(s.tokens)
        )
        for i, s in enumerate(seqs)
    ]
    adam = AdamParams(learning_rate=3e-3)

    def train_step(_: int) -> None:
        trainer.forward_backward(batch, "importance_sampling")
        trainer.optim_step(adam)

    def sample(i: int) -> None:
        sampler.sample([BOS_ID], args.group, replace(sampling, seed=i))

    def weight_sync(i: int) -> None:
        folder = tmp / f"sync-{i}"
        trainer.save_weights_for_sampler(folder)
        sampler.load_weights(folder, checkpoint_id=str(i))

    kw = {"calls": args.calls, "warmup": args.warmup}
    try:
        results = {
            "train_step": percentiles(timed(train_step, **kw)),
            "sample": percentiles(timed(sample, **kw)),
            "weight_sync": percentiles(timed(weight_sync, **kw)),
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report = {
        "benchmark": "engine_step",
        "model": "tiny llama (hidden 64, 2 layers, 4 heads, 260 vocab, ~99k params), float32",
        "device": "cpu",
        "machine": platform.machine(),
        "torch": torch.__version__,
        "torch_threads": threads,
        "calls": args.calls,
        "warmup": args.warmup,
        "group": args.group,
        "new_tokens": args.new_tokens,
        "train_step": "forward_backward(importance_sampling, batch=group) + optim_step",
        "sample": "sample(prompt=[bos], num_samples=group, max_tokens=new_tokens)",
        "weight_sync": "save_weights_for_sampler + load_weights (sha256-verified) via a folder",
        "results": results,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")

    table = Table(title=f"engine calls, tiny model, CPU, {threads} thread(s), n={args.calls}")
    for column in ("call", "p50 ms", "p99 ms", "mean ms"):
        table.add_column(column, justify="right" if column != "call" else "left")
    for name, r in results.items():
        table.add_row(name, f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}", f"{r['mean_ms']:.2f}")
    Console().print(table)
    Console().print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
