"""Sampling engines on one GPU: the torch engine vs vLLM, tokens/s and hotload seconds.

Standalone: no Kafka, PostgreSQL or S3. One model folder (gpu_workers/tiny_model.py's Llama built
at the size the options say, or --model PATH), the same prompts and checkpoints for each engine:
- tokens/s: N prompts x M samples x T new tokens through `sample`, one call per prompt as the
  sampler worker makes them (stop_at_eos off: every sample is T tokens long). For vLLM also all
  N prompts in one `LLM.generate` call ("batched"), the engine's own ceiling.
- hotload seconds: `load_weights` of a base folder (every weight, perturbed) and `load_chain` of
  one delta (gpu_workers.deltas, xor_zstd) of weights perturbed again; medians over --rounds.
- after each hotload, the logprobs of a fixed sequence: vLLM's must match the torch engine's
  within --atol, and the delta must move them by more than --atol (else the check proves
  nothing: the script says so).

Engines run one after the other (the torch engine's GPU memory is freed before vLLM starts).
vLLM is skipped, with the reason, when it is not installed (`uv pip install -e '.[gpu]'`).

    .venv/bin/python benchmarks/engines_gpu.py                        # GPU host: torch + vllm
    .venv/bin/python benchmarks/engines_gpu.py --engines torch --hidden 64 --layers 2 --heads 4 \
        --prompts 4 --samples 4 --tokens 16 --out benchmarks/results/engines_gpu_cpu.json
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from safetensors.torch import load_file
from transformers import AutoTokenizer
from transformers.utils import logging as hf_logging

from gpu_workers.deltas import ChainHead, chain_metadata, write_base_link, write_delta
from gpu_workers.engine.model_io import WEIGHTS_NAME, save_weights, weight_files
from gpu_workers.engine.sampler import SamplerEngine
from gpu_workers.engine.types import SamplingParams
from gpu_workers.manifest import write_manifest
from gpu_workers.tiny_model import TinyModelConfig, build_byte_tokenizer, build_tiny_model

RESULTS = Path(__file__).parent / "results" / "engines_gpu.json"
CHECK_TEXT = "The quick brown fox jumps over the lazy dog. " * 4
# |logprob difference| vLLM may show against the torch engine (fp32), per vLLM dtype.
DEFAULT_ATOL = {"float32": 2e-3, "bfloat16": 5e-2, "float16": 2e-2}
# Files of a model folder that are not copied into the base checkpoint folder.
NOT_COPIED = ("manifest.json", "chain.json")


@dataclass(frozen=True)
class Fixture:
    model_dir: Path  # what both engines start on
    base: Path  # a base sampler-weights folder (every weight perturbed)
    delta: Path  # a delta onto `base` (every weight perturbed again)
    delta_digest: str  # the weights version digest after base + delta
    prompts: list[list[int]]  # (N, P) token ids
    check_tokens: list[int]  # the fixed sequence whose logprobs are compared
    parameters: int


# ---------------------------------------------------------------------------------- fixture


def build_model(folder: Path, args: argparse.Namespace) -> Path:
    config = TinyModelConfig(
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=args.heads,
        intermediate_size=args.hidden * 11 // 4,  # Llama's MLP ratio, as the other benchmarks
    )
    build_tiny_model(config, seed=0).save_pretrained(folder)
    build_byte_tokenizer().save_pretrained(folder)
    write_manifest(folder, kind="base_model")
    return folder


def read_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    names = weight_files([p.name for p in model_dir.iterdir()])
    if not names:
        raise SystemExit(f"{model_dir} holds no model*.safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for name in names:
        state.update(load_file(str(model_dir / name)))
    return state


def perturbed(
    state: dict[str, torch.Tensor], *, scale: float, seed: int
) -> dict[str, torch.Tensor]:
    """Every float tensor plus Gaussian noise of `scale` times its own spread."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, w in sorted(state.items()):
        if not w.is_floating_point():
            out[name] = w
            continue
        w32 = w.float()
        spread = w32.std() if w32.numel() > 1 and w32.std() > 0 else w32.abs().mean()
        noise = torch.randn(w.shape, generator=gen) * (scale * float(spread))
        out[name] = (w32 + noise).to(w.dtype)
    return out


def make_fixture(tmp: Path, args: argparse.Namespace) -> Fixture:
    model_dir = Path(args.model) if args.model else build_model(tmp / "model", args)
    weights_0 = read_weights(model_dir)

    # Base: a complete HF folder with perturbed weights, marked as a chain's base.
    base = tmp / "base"
    base.mkdir()
    for f in model_dir.iterdir():
        is_weights = f.name.endswith(".safetensors") or f.name.endswith(".safetensors.index.json")
        if f.is_file() and not is_weights and f.name not in NOT_COPIED:
            shutil.copy2(f, base / f.name)
    weights_b = perturbed(weights_0, scale=args.perturb, seed=1)
    save_weights(weights_b, base / WEIGHTS_NAME)
    link = write_base_link(base, weights_b)
    base_manifest = write_manifest(base, kind="sampler_weights", metadata=chain_metadata(link))

    # Delta: the base's weights perturbed again, as a trainer's delta save would store them.
    weights_d = perturbed(weights_b, scale=args.perturb, seed=2)
    head = ChainHead(
        state=weights_b,
        folder_digest=base_manifest.digest,
        uri=str(base),
        position=0,
        base_digest=base_manifest.digest,
    )
    delta_manifest = write_delta(tmp / "delta", parent=head, state=weights_d)

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [
        tokenizer.encode(f"Prompt {i}: the next number after {i * 7} is")
        for i in range(args.prompts)
    ]
    check = tokenizer.encode(CHECK_TEXT)[: args.check_tokens]
    return Fixture(
        model_dir=model_dir,
        base=base,
        delta=tmp / "delta",
        delta_digest=delta_manifest.digest,
        prompts=prompts,
        check_tokens=check,
        parameters=sum(w.numel() for w in weights_0.values()),
    )


# ---------------------------------------------------------------------------------- runs


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], object]) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def run_engine(engine: Any, fx: Fixture, args: argparse.Namespace) -> dict[str, Any]:
    """tokens/s, hotload seconds and post-hotload logprobs of one engine (either kind)."""
    params = SamplingParams(max_tokens=args.tokens, temperature=1.0, stop_at_eos=False)
    engine.sample(fx.prompts[0], min(args.samples, 2), replace(params, max_tokens=4, seed=0))

    tokens = 0

    def sample_all() -> None:
        nonlocal tokens
        for i, prompt in enumerate(fx.prompts):
            seqs = engine.sample(prompt, args.samples, replace(params, seed=i))
            tokens += sum(len(s.tokens) for s in seqs)

    sample_s = timed(sample_all)

    base_s, delta_s = [], []
    logprobs: dict[str, list[float | None]] = {}
    for r in range(args.rounds):
        base_s.append(timed(partial(engine.load_weights, fx.base, checkpoint_id=f"base-{r}")))
        logprobs["base"] = engine.compute_logprobs(fx.check_tokens)
        delta_s.append(timed(partial(engine.load_chain, [fx.delta], checkpoint_id=f"delta-{r}")))
        logprobs["delta"] = engine.compute_logprobs(fx.check_tokens)
        if engine.weights_version.digest != fx.delta_digest:
            raise SystemExit(f"weights version {engine.weights_version} after the delta is wrong")
    return {
        "tokens": tokens,
        "sample_s": round(sample_s, 3),
        "tokens_per_s": round(tokens / sample_s, 1),
        "hotload_base_s": round(statistics.median(base_s), 4),
        "hotload_delta_s": round(statistics.median(delta_s), 4),
        "hotload_base_s_all": [round(s, 4) for s in base_s],
        "hotload_delta_s_all": [round(s, 4) for s in delta_s],
        "logprobs": logprobs,
    }


def run_torch(fx: Fixture, args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    engine = SamplerEngine(fx.model_dir, max_seq_len=args.max_seq_len, device=args.torch_device)
    startup_s = time.perf_counter() - t0
    try:
        result = run_engine(engine, fx, args)
    finally:
        del engine
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # vLLM sizes its KV cache from the free memory
    return {"startup_s": round(startup_s, 2), "device": args.torch_device, **result}


def run_vllm(fx: Fixture, args: argparse.Namespace) -> dict[str, Any]:
    from gpu_workers.engine.vllm_sampler import (
        VllmNotInstalledError,
        VllmSamplerEngine,
        vllm_sampling_kwargs,
    )

    t0 = time.perf_counter()
    try:
        engine = VllmSamplerEngine(
            fx.model_dir,
            max_seq_len=args.max_seq_len,
            dtype=args.vllm_dtype,
            gpu_memory_utilization=args.vllm_gpu_memory,
            enforce_eager=args.enforce_eager,
        )
    except VllmNotInstalledError as exc:
        return {"skipped": str(exc)}
    startup_s = time.perf_counter() - t0
    with engine:  # closed at the end: the engine core stops and gives its GPU memory back
        result = run_engine(engine, fx, args)

        # All prompts in one generate call: what vLLM does with a batch it sees whole.
        import vllm
        from vllm.inputs import TokensPrompt

        params = SamplingParams(max_tokens=args.tokens, temperature=1.0, stop_at_eos=False,
                                seed=0)  # fmt: skip
        vllm_params = vllm.SamplingParams(**vllm_sampling_kwargs(params, n=args.samples))
        prompts = [TokensPrompt(prompt_token_ids=p) for p in fx.prompts]
        outputs: list[Any] = []
        batched_s = timed(
            lambda: outputs.extend(engine.llm.generate(prompts, vllm_params, use_tqdm=False))
        )
    batched_tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return {
        "startup_s": round(startup_s, 2),
        "dtype": engine.dtype,
        "attention_backends": engine.attention_backends,
        "vllm_version": vllm.__version__,
        **result,
        "batched_tokens_per_s": round(batched_tokens / batched_s, 1),
    }


def compare(reference: list[float | None], other: list[float | None]) -> dict[str, float]:
    pairs = zip(reference, other, strict=True)
    diffs = [abs(a - b) for a, b in pairs if a is not None and b is not None]
    return {"max_abs": max(diffs), "mean_abs": statistics.fmean(diffs)}


def check_logprobs(results: dict[str, Any], atol: float) -> dict[str, Any]:
    torch_lp = results["torch"]["logprobs"]
    delta_effect = compare(torch_lp["base"], torch_lp["delta"])["mean_abs"]
    out: dict[str, Any] = {"atol": atol, "delta_effect_mean_abs": round(delta_effect, 5)}
    out["discriminates"] = delta_effect > atol
    vllm_run = results.get("vllm", {})
    if "logprobs" in vllm_run:
        after_base = compare(torch_lp["base"], vllm_run["logprobs"]["base"])
        after_delta = compare(torch_lp["delta"], vllm_run["logprobs"]["delta"])
        out["vllm_vs_torch_after_base"] = {k: round(v, 6) for k, v in after_base.items()}
        out["vllm_vs_torch_after_delta"] = {k: round(v, 6) for k, v in after_delta.items()}
        out["match"] = after_base["max_abs"] <= atol and after_delta["max_abs"] <= atol
    return out


# ---------------------------------------------------------------------------------- main


def print_table(results: dict[str, Any], check: dict[str, Any], fx: Fixture) -> None:
    console = Console(width=max(Console().width, 120))
    table = Table(title=f"sampling engines, {fx.parameters / 1e6:.1f}M parameters")
    for col in ("engine", "startup s", "tokens/s", "tokens/s batched", "base hotload s",
                "delta hotload s", "max |Δ logprob| vs torch"):  # fmt: skip
        table.add_column(col, justify="left" if col == "engine" else "right")
    for name, run in results.items():
        if "skipped" in run:
            table.add_row(name, "skipped", "", "", "", "", "")
            continue
        diff = check.get("vllm_vs_torch_after_delta", {}).get("max_abs")
        table.add_row(
            f"{name} ({run.get('device') or run.get('dtype')})",
            f"{run['startup_s']:.1f}",
            f"{run['tokens_per_s']:,.0f}",
            f"{run['batched_tokens_per_s']:,.0f}" if "batched_tokens_per_s" in run else "-",
            f"{run['hotload_base_s']:.3f}",
            f"{run['hotload_delta_s']:.3f}",
            "reference" if name == "torch" else "-" if diff is None else f"{diff:.2e}",
        )
    console.print(table)
    for name, run in results.items():
        if "skipped" in run:
            console.print(f"[yellow]{name} skipped[/yellow]: {escape(run['skipped'])}")
    if not check["discriminates"]:
        console.print(
            f"[yellow]the delta moves the check logprobs by {check['delta_effect_mean_abs']:.2e} "
            f"on average, not more than atol {check['atol']}: raise --perturb[/yellow]"
        )
    if "match" in check:
        verdict = "[green]match[/green]" if check["match"] else "[red]MISMATCH[/red]"
        console.print(f"vLLM vs torch logprobs after hotloads: {verdict} (atol {check['atol']})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", default="torch,vllm", help="comma-separated: torch,vllm")
    parser.add_argument("--model", help="an HF model folder (safetensors); default: build one")
    parser.add_argument("--hidden", type=int, default=1024, help="built model: d_model")
    parser.add_argument("--layers", type=int, default=8, help="built model: decoder blocks")
    parser.add_argument("--heads", type=int, default=16, help="built model: attention heads")
    parser.add_argument("--prompts", type=int, default=8, help="N prompts")
    parser.add_argument("--samples", type=int, default=16, help="M samples per prompt")
    parser.add_argument("--tokens", type=int, default=128, help="T new tokens per sample")
    parser.add_argument("--rounds", type=int, default=3, help="base + delta hotloads per engine")
    parser.add_argument("--perturb", type=float, default=0.05,
                        help="checkpoint noise, as a fraction of each tensor's std")  # fmt: skip
    parser.add_argument("--check-tokens", type=int, default=64, help="length of the check seq")
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--torch-device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--vllm-dtype", default="float32", choices=sorted(DEFAULT_ATOL),
                        help="float32 compares tightly with the torch engine (fp32)")  # fmt: skip
    parser.add_argument("--vllm-gpu-memory", type=float, default=0.5,
                        help="vLLM gpu_memory_utilization")  # fmt: skip
    parser.add_argument("--enforce-eager", action="store_true", help="vLLM without CUDA graphs")
    parser.add_argument("--atol", type=float, help="default: by --vllm-dtype")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if "torch" not in engines:
        raise SystemExit("--engines must include torch: it is the reference for the logprobs")
    atol = args.atol if args.atol is not None else DEFAULT_ATOL[args.vllm_dtype]

    hf_logging.disable_progress_bar()  # shard-writing bars are noise in a benchmark's output
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="engines-gpu-"))
    try:
        fx = make_fixture(tmp, args)
        results: dict[str, Any] = {"torch": run_torch(fx, args)}
        if "vllm" in engines:
            results["vllm"] = run_vllm(fx, args)
        check = check_logprobs(results, atol)
        print_table(results, check, fx)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor()
    doc = {
        "device": device or platform.machine(),
        "torch_version": torch.__version__,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "parameters": fx.parameters,
        "check": check,
        "engines": {
            name: {k: v for k, v in run.items() if k != "logprobs"} for name, run in results.items()
        },
        "total_s": round(time.perf_counter() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
