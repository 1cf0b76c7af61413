"""The warmup generation after a weight swap, for whatever serves weights (the paired sampler's
worker and deployment replicas): seed 002's `warmup_after_hotload` / `warmup_max_retries`."""

from __future__ import annotations

import math
import time

from gpu_workers.engine.sampler import SamplerEngineProtocol
from gpu_workers.engine.types import SamplingParams

WARMUP_PROMPT = "warmup"
WARMUP_BACKOFF_S = 0.05


class WarmupError(Exception):
    """The new weights do not generate: every warmup attempt raised or gave non-finite logprobs."""


def warm_up(engine: SamplerEngineProtocol, max_retries: int) -> tuple[int, float]:
    """One short generation on the new weights, retried up to `max_retries` times. Returns
    (attempts, ms); raises WarmupError when none gives finite logprobs."""
    prompt = engine.tokenizer.encode(WARMUP_PROMPT, add_special_tokens=False) or [0]  # type: ignore[attr-defined]
    params = SamplingParams(max_tokens=1, temperature=1.0, seed=0)
    t0 = time.perf_counter()
    last = ""
    for attempt in range(1, max_retries + 2):
        try:
            (sequence,) = engine.sample(prompt, 1, params)
            if all(math.isfinite(lp) for lp in sequence.logprobs):
                return attempt, (time.perf_counter() - t0) * 1000
            last = f"non-finite logprobs {sequence.logprobs}"
        except Exception as exc:  # what a broken engine or weights raise is not ours to list
            last = f"{type(exc).__name__}: {exc}"
        if attempt <= max_retries:
            time.sleep(WARMUP_BACKOFF_S * attempt)
    raise WarmupError(f"no warmup generation in {max_retries + 1} attempts; last: {last}")
