"""GPU smoke test of the vLLM sampling engine against the torch engine, in under 10 minutes.

Standalone (no Kafka, PostgreSQL or S3), on one CUDA GPU with the `gpu` extra installed. It builds
a small Llama (gpu_workers/tiny_model.py; head size 64, so fp32 attention runs on vLLM's Triton
backend) or takes --model, writes a base checkpoint and a chain of two deltas, and checks, in order:

1. start: the engine serves the checkpoint's own dtype, logs its attention backend, and its
   logprobs of a fixed sequence match the torch engine's (fp32, the reference) within --atol.
2. sample: samples have the asked length, finite logprobs, the served weights version.
3. raw logprobs: the logprobs reported with tokens sampled at temperature 0.7 / top_p 0.9 /
   top_k 20 are the temperature-1 policy's: they match the torch engine's teacher-forced
   logprobs of the same tokens (and the tempered distribution's would not).
4. base hotload: after `load_weights(base)` the logprobs match the torch engine's on the same base.
5. delta hotload: the same after a delta that moves every weight (and the delta must move them).
6. prefix cache: a prompt sampled twice hits the prefix cache; after a hotload it does not, and
   its samples carry the new weights' logprobs (no stale KV).
7. partial fused loads: a delta that changes only q_proj of one layer, v_proj of another, up_proj
   of one MLP and gate_proj of another (halves of vLLM's fused qkv_proj and gate_up_proj) is
   loaded with `keep_prompt_cache=True`, then `reset_prompt_cache()`; logprobs match the torch
   engine's with the same partial change.
8. close: `close()` gives the GPU memory back, and a second engine that would not fit beside
   the first (--restart-gpu-memory) starts and matches the reference.

Prints one line per check and writes JSON (--out). Exit status: 0 all passed, 1 a check failed,
2 nothing ran (no CUDA or no vllm: the reason is printed). Imports fine without vllm or a GPU.

    uv pip install -e '.[gpu]'
    .venv/bin/python benchmarks/vllm_smoke.py
    .venv/bin/python benchmarks/vllm_smoke.py --enforce-eager   # faster start, no CUDA graphs
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # vLLM's worker processes import the extension from the repo

from benchmarks.engines_gpu import NOT_COPIED, build_model, perturbed, read_weights  # noqa: E402
from gpu_workers.deltas import ChainHead, chain_metadata, write_base_link, write_delta  # noqa: E402
from gpu_workers.engine.model_io import WEIGHTS_NAME, save_weights  # noqa: E402
from gpu_workers.engine.sampler import SamplerEngine  # noqa: E402
from gpu_workers.engine.types import SamplingParams  # noqa: E402
from gpu_workers.manifest import write_manifest  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "vllm_smoke.json"
CHECK_TEXT = "The quick brown fox jumps over the lazy dog. " * 4
PROMPT_TEXT = "A prompt long enough to fill several blocks of vLLM's prefix cache: " * 2
# Halves of vLLM's fused projections, changed alone by the partial delta: (layer, tensor).
PARTIAL = ((0, "self_attn.q_proj"), (1, "self_attn.v_proj"), (0, "mlp.up_proj"),
           (1, "mlp.gate_proj"))  # fmt: skip
TEMPERED = SamplingParams(max_tokens=24, temperature=0.7, top_p=0.9, top_k=20, stop_at_eos=False)


@dataclass
class Report:
    checks: list[dict[str, Any]] = field(default_factory=list)

    @contextmanager
    def check(self, name: str) -> Iterator[dict[str, Any]]:
        """One numbered check: what the body puts in the dict is reported; an exception or a
        False "ok" fails it. The next checks still run when they can."""
        detail: dict[str, Any] = {}
        t0 = time.perf_counter()
        try:
            yield detail
            ok = bool(detail.pop("ok", True))
        except Exception as exc:
            ok = False
            detail["error"] = f"{type(exc).__name__}: {exc}"
            detail["trace"] = traceback.format_exc(limit=8)
        seconds = round(time.perf_counter() - t0, 2)
        self.checks.append({"check": name, "ok": ok, "seconds": seconds, **detail})
        shown = {k: v for k, v in detail.items() if k != "trace"}
        print(f"{'PASS' if ok else 'FAIL'}  {name} ({seconds} s)  {json.dumps(shown)}", flush=True)

    @property
    def passed(self) -> bool:
        return all(c["ok"] for c in self.checks)


@dataclass(frozen=True)
class Fixture:
    model_dir: Path
    base: Path
    delta: Path  # every weight moved, onto base
    partial: Path  # only PARTIAL moved, onto delta
    check_tokens: list[int]
    prompt: list[int]


# ---------------------------------------------------------------------------------- fixture


def make_fixture(tmp: Path, args: argparse.Namespace) -> Fixture:
    model_dir = Path(args.model) if args.model else build_model(tmp / "model", args)
    weights_0 = read_weights(model_dir)

    base = tmp / "base"
    base.mkdir()
    for f in model_dir.iterdir():
        is_weights = f.name.endswith(".safetensors") or f.name.endswith(".safetensors.index.json")
        if f.is_file() and not is_weights and f.name not in NOT_COPIED:
            shutil.copy2(f, base / f.name)
    weights_b = perturbed(weights_0, scale=args.perturb, seed=1)
    save_weights(weights_b, base / WEIGHTS_NAME)
    link = write_base_link(base, weights_b)
    base_digest = write_manifest(base, kind="sampler_weights", metadata=chain_metadata(link)).digest

    weights_d = perturbed(weights_b, scale=args.perturb, seed=2)
    head = ChainHead(state=weights_b, folder_digest=base_digest, uri=str(base), position=0,
                     base_digest=base_digest)  # fmt: skip
    delta_digest = write_delta(tmp / "delta", parent=head, state=weights_d).digest

    moved = perturbed(weights_d, scale=args.perturb * 4, seed=3)
    names = {f"model.layers.{layer}.{tensor}.weight" for layer, tensor in PARTIAL}
    missing = names - set(weights_d)
    if missing:
        raise SystemExit(f"the model has no {sorted(missing)}: the partial delta needs 2 layers")
    weights_p = {k: moved[k] if k in names else v for k, v in weights_d.items()}
    head = ChainHead(state=weights_d, folder_digest=delta_digest, uri=str(tmp / "delta"),
                     position=1, base_digest=base_digest)  # fmt: skip
    write_delta(tmp / "partial", parent=head, state=weights_p)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return Fixture(
        model_dir=model_dir,
        base=base,
        delta=tmp / "delta",
        partial=tmp / "partial",
        check_tokens=tokenizer.encode(CHECK_TEXT)[: args.check_tokens],
        prompt=tokenizer.encode(PROMPT_TEXT),
    )


# ---------------------------------------------------------------------------------- compare


def max_abs(a: Sequence[float | None], b: Sequence[float | None]) -> float:
    diffs = [abs(x - y) for x, y in zip(a, b, strict=True) if x is not None and y is not None]
    return max(diffs)


def parity(detail: dict[str, Any], ref: SamplerEngine, engine: Any, tokens: list[int],
           atol: float) -> list[float | None]:  # fmt: skip
    """The two engines' logprobs of `tokens` agree within atol; returns the reference's."""
    expected = ref.compute_logprobs(tokens)
    diff = max_abs(expected, engine.compute_logprobs(tokens))
    detail["max_abs_vs_torch"] = float(f"{diff:.3e}")
    detail["ok"] = detail.get("ok", True) and diff <= atol
    return expected


def teacher_forced(ref: SamplerEngine, prompt: list[int], tokens: list[int]) -> list[float]:
    """The torch engine's temperature-1 logprobs of `tokens` after `prompt`."""
    scored = ref.compute_logprobs(prompt + tokens)[len(prompt) :]
    return [float(x) for x in scored if x is not None]


@torch.no_grad()
def tempered(ref: SamplerEngine, prompt: list[int], tokens: list[int], t: float) -> list[float]:
    """The same tokens' logprobs at temperature t: what raw logprobs must not be."""
    ids = torch.tensor([prompt + tokens], device=ref.config.device)
    logits = ref.model(input_ids=ids).logits[0].float()  # (T, V)
    logp = torch.log_softmax(logits / t, dim=-1)
    rows = range(len(prompt) - 1, len(prompt) + len(tokens) - 1)
    return [float(logp[r, tok]) for r, tok in zip(rows, tokens, strict=True)]


def samples_match_reference(detail: dict[str, Any], ref: SamplerEngine, prompt: list[int],
                            seqs: list[Any], atol: float) -> None:  # fmt: skip
    """Every sampled token's reported logprob is the reference's teacher-forced one."""
    worst = 0.0
    for seq in seqs:
        worst = max(worst, max_abs(teacher_forced(ref, prompt, seq.tokens), seq.logprobs))
    detail["max_abs_vs_teacher_forced"] = float(f"{worst:.3e}")
    detail["ok"] = detail.get("ok", True) and worst <= atol


def gpu_free_gib() -> float:
    free, _ = torch.cuda.mem_get_info()
    return round(free / 2**30, 2)


# ---------------------------------------------------------------------------------- checks


def run_checks(fx: Fixture, args: argparse.Namespace, report: Report) -> None:
    from gpu_workers.engine.vllm_sampler import VllmSamplerEngine

    atol = args.atol
    ref = SamplerEngine(fx.model_dir, max_seq_len=args.max_seq_len, device=args.torch_device)
    initial = ref.compute_logprobs(fx.check_tokens)
    total_gib = torch.cuda.mem_get_info()[1] / 2**30
    engine: Any = None
    base_lp = delta_lp = initial  # the check sequence's logprobs after each hotload
    hits_before = 0  # prefix-cache hits of a repeated prompt before a hotload

    with report.check("1 start") as d:
        engine = VllmSamplerEngine(
            fx.model_dir,
            gpu_memory_utilization=args.gpu_memory,
            max_seq_len=args.max_seq_len,
            enforce_eager=args.enforce_eager,
        )
        d["dtype"] = engine.dtype
        d["attention_backends"] = engine.attention_backends
        d["max_seq_len"] = engine.max_seq_len
        diff = max_abs(initial, engine.compute_logprobs(fx.check_tokens))
        d["max_abs_vs_torch"] = float(f"{diff:.3e}")
        d["ok"] = diff <= atol and (args.model is not None or engine.dtype == "float32")
    if engine is None:
        return  # nothing else can run

    with report.check("2 sample") as d:
        params = SamplingParams(max_tokens=16, temperature=1.0, seed=0, stop_at_eos=False)
        seqs = engine.sample(fx.prompt, 4, params)
        d["samples"] = len(seqs)
        d["ok"] = (
            len(seqs) == 4
            and all(len(s.tokens) == 16 and len(s.logprobs) == 16 for s in seqs)
            and all(math.isfinite(lp) and lp <= 0 for s in seqs for lp in s.logprobs)
            and all(s.weights_version == engine.weights_version for s in seqs)
        )

    with report.check("3 raw temperature-1 logprobs") as d:
        seqs = engine.sample(fx.prompt, 4, TEMPERED)
        samples_match_reference(d, ref, fx.prompt, seqs, atol)
        gaps = []
        for s in seqs:
            at_t = tempered(ref, fx.prompt, s.tokens, TEMPERED.temperature)
            gaps += [abs(a - b) for a, b in zip(at_t, s.logprobs, strict=True)]
        d["tempered_would_differ_by"] = float(f"{statistics.fmean(gaps):.3e}")

    with report.check("4 base hotload") as d:
        ref.load_weights(fx.base, checkpoint_id="base")
        engine.load_weights(fx.base, checkpoint_id="base")
        base_lp = parity(d, ref, engine, fx.check_tokens, atol)
        d["ok"] = d["ok"] and engine.weights_version == ref.weights_version

    with report.check("5 delta hotload") as d:
        cached_before = engine.sample(fx.prompt, 2, TEMPERED)  # fill the prefix cache
        again = engine.sample(fx.prompt, 2, TEMPERED)
        hits_before = again[0].prompt_cache_hit_tokens
        d["prefix_hit_tokens_before"] = hits_before
        ref.load_chain([fx.delta], checkpoint_id="delta")
        engine.load_chain([fx.delta], checkpoint_id="delta")
        delta_lp = parity(d, ref, engine, fx.check_tokens, atol)
        d["delta_moved_logprobs_by"] = float(f"{max_abs(base_lp, delta_lp):.3e}")
        d["ok"] = (d["ok"] and engine.weights_version == ref.weights_version
                   and max_abs(base_lp, delta_lp) > atol and bool(cached_before))  # fmt: skip

    with report.check("6 prefix cache reset by a hotload") as d:
        seqs = engine.sample(fx.prompt, 2, TEMPERED)
        d["prefix_hit_tokens_after"] = seqs[0].prompt_cache_hit_tokens
        samples_match_reference(d, ref, fx.prompt, seqs, atol)
        d["ok"] = d["ok"] and hits_before > 0 and seqs[0].prompt_cache_hit_tokens == 0
        if hits_before == 0:
            d["why"] = "the prefix cache never hit: this check proves nothing"

    with report.check("7 partial fused q/k/v and gate/up loads") as d:
        engine.sample(fx.prompt, 1, TEMPERED)  # cached with the delta's weights
        ref.load_chain([fx.partial], checkpoint_id="partial")
        engine.load_chain([fx.partial], checkpoint_id="partial", keep_prompt_cache=True)
        stale = engine.sample(fx.prompt, 1, TEMPERED)
        d["prefix_hit_tokens_kept"] = stale[0].prompt_cache_hit_tokens
        engine.reset_prompt_cache()
        seqs = engine.sample(fx.prompt, 2, TEMPERED)
        d["prefix_hit_tokens_after_reset"] = seqs[0].prompt_cache_hit_tokens
        samples_match_reference(d, ref, fx.prompt, seqs, atol)
        partial_lp = parity(d, ref, engine, fx.check_tokens, atol)
        d["partial_moved_logprobs_by"] = float(f"{max_abs(delta_lp, partial_lp):.3e}")
        d["ok"] = (d["ok"] and seqs[0].prompt_cache_hit_tokens == 0
                   and max_abs(delta_lp, partial_lp) > atol)  # fmt: skip

    with report.check("8 close gives the GPU back") as d:
        d["free_gib_before"] = gpu_free_gib()
        engine.close()
        d["free_gib_after"] = gpu_free_gib()
        d["restart_needs_gib"] = round(args.restart_gpu_memory * total_gib, 2)
        second = VllmSamplerEngine(
            fx.model_dir,
            gpu_memory_utilization=args.restart_gpu_memory,
            max_seq_len=args.max_seq_len,
            enforce_eager=True,  # the start is what is checked: skip the graph capture
        )
        with second:
            d["second_engine_vs_torch_initial"] = float(
                f"{max_abs(initial, second.compute_logprobs(fx.check_tokens)):.3e}"
            )
        d["ok"] = engine.closed and second.closed
        d["ok"] = d["ok"] and d["second_engine_vs_torch_initial"] <= atol
    ref.close()


# ---------------------------------------------------------------------------------- main


def preflight() -> str | None:
    """Why nothing can run here, or None."""
    if not torch.cuda.is_available():
        return "no CUDA device: run this on a GPU host"
    try:
        import vllm  # noqa: F401
    except ImportError:
        return "vllm is not installed: uv pip install -e '.[gpu]'"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="an fp32 HF Llama folder; default: build a small one")
    parser.add_argument("--hidden", type=int, default=512, help="built model: d_model")
    parser.add_argument("--layers", type=int, default=4, help="built model: decoder blocks")
    parser.add_argument("--heads", type=int, default=8, help="built model: heads (size 64)")
    parser.add_argument("--perturb", type=float, default=0.05, help="checkpoint noise / std")
    parser.add_argument("--check-tokens", type=int, default=64, help="length of the check seq")
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--atol", type=float, default=2e-3, help="|logprob| gap allowed (fp32)")
    parser.add_argument("--gpu-memory", type=float, default=0.5,
                        help="the first engine's gpu_memory_utilization")  # fmt: skip
    parser.add_argument("--restart-gpu-memory", type=float, default=0.6,
                        help="the second engine's (the two add up to more than 1)")  # fmt: skip
    parser.add_argument("--torch-device", default="cuda", help="the torch reference's device")
    parser.add_argument("--enforce-eager", action="store_true", help="vLLM without CUDA graphs")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    why_not = preflight()
    if why_not is not None:
        print(f"SKIPPED  {why_not}")
        return 2
    report = Report()
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="vllm-smoke-"))
    try:
        run_checks(make_fixture(tmp, args), args, report)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    import vllm

    doc = {
        "device": torch.cuda.get_device_name(0),
        "vllm_version": vllm.__version__,
        "torch_version": torch.__version__,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "passed": report.passed,
        "checks": report.checks,
        "total_s": round(time.perf_counter() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"{'ALL PASSED' if report.passed else 'FAILED'} in {doc['total_s']} s; wrote {args.out}")
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
