"""The sampler engine: batched autoregressive sampling from an HF causal LM, with hot weight swaps.

Kafka-free and synchronous, like the trainer engine. `SamplerEngineProtocol` is the interface the
sampler worker programs against; `SamplerEngine` implements it with plain torch (CPU tests, small
models) and `gpu_workers.engine.vllm_sampler.VllmSamplerEngine` with vLLM (GPU hosts).

Logprobs reported with each token are the policy's temperature-1 logprobs (the raw model
distribution, before temperature and top_p), which is what the trainer's `compute_logprobs`
computes: the importance ratio of the two then measures only weight staleness and numerics.
"""

from __future__ import annotations

import copy
import hashlib
import os
import random
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from safetensors.torch import load_file

from gpu_workers.deltas import apply_chain
from gpu_workers.engine.chain import open_chain
from gpu_workers.engine.model_io import (
    copy_state_into,
    full_state_dict,
    load_causal_lm,
    prompt_scores,
    sequence_logprobs,
)
from gpu_workers.engine.types import (
    InvalidInputError,
    PromptScores,
    PromptScoring,
    SampledSequence,
    SamplingParams,
    StopReason,
    TopK,
    WeightsVersion,
    check_prompt_scoring,
    check_sample_request,
    check_token_range,
)
from gpu_workers.manifest import (
    MANIFEST_NAME,
    Manifest,
    build_manifest,
    verify_folder,
)

if TYPE_CHECKING:
    from infra.settings import Settings


@runtime_checkable
class SamplerEngineProtocol(Protocol):
    tokenizer: Any  # a Hugging Face tokenizer: the worker encodes text prompts with it

    @property
    def weights_version(self) -> WeightsVersion: ...

    def sample(
        self, prompt_tokens: Sequence[int], num_samples: int, params: SamplingParams
    ) -> list[SampledSequence]: ...

    def compute_logprobs(self, tokens: Sequence[int]) -> list[float | None]: ...

    def score_prompt(
        self, tokens: Sequence[int], scoring: PromptScoring | None = None
    ) -> PromptScores: ...

    def load_weights(
        self, folder: str | os.PathLike[str], *, checkpoint_id: str
    ) -> WeightsVersion: ...

    def load_chain(
        self,
        folders: Sequence[str | os.PathLike[str]],
        *,
        checkpoint_id: str,
        keep_prompt_cache: bool = False,
        verified: bool = False,
    ) -> WeightsVersion: ...

    def reset_prompt_cache(self) -> int | None: ...

    def close(self) -> None:
        """Give back what the engine holds outside Python's heap (GPU memory, engine
        processes) now, not whenever the garbage collector gets to it. Idempotent; the engine
        serves nothing afterwards."""
        ...


@dataclass(frozen=True)
class SamplerConfig:
    model_dir: Path  # HF model folder: the base model or a sampler_weights checkpoint
    max_seq_len: int | None = None  # prompt + new tokens at most; None = max_position_embeddings
    seed: int = 0  # seeds the draws of calls that pass no seed of their own
    device: str = "cpu"  # torch device
    checkpoint_id: str = "base"  # the weights version's id until the first load_weights
    # Prompts whose prefill (KV cache + last logits) is kept for the next call with the same
    # prompt: RL samples each prompt many times. Computed with the weights of the moment, so a
    # weight sync must drop them (`reset_prompt_cache`), as vLLM's prefix cache.
    prompt_cache_size: int = 32


class SamplerEngine:
    def __init__(
        self,
        model_dir: str | os.PathLike[str],
        *,
        max_seq_len: int | None = None,
        seed: int = 0,
        device: str = "cpu",
        checkpoint_id: str = "base",
        prompt_cache_size: int = 32,
    ) -> None:
        self.config = SamplerConfig(
            Path(model_dir), max_seq_len, seed, device, checkpoint_id, prompt_cache_size
        )
        manifest = _verified_or_built_manifest(self.config.model_dir)
        self.model, self.tokenizer = load_causal_lm(model_dir, device=device)
        limit = int(getattr(self.model.config, "max_position_embeddings", 0) or 1 << 30)
        self.max_seq_len = min(max_seq_len or limit, limit)
        self.vocab_size: int = self.model.config.vocab_size
        self.eos_token_ids = _eos_ids(self.model, self.tokenizer)
        self._version = WeightsVersion(checkpoint_id, manifest.digest)
        self._seed_rng = random.Random(seed)  # draws seeds for calls that bring none
        # One request or weight swap at a time: a swap never lands in the middle of a sample.
        self._lock = threading.Lock()
        # prompt tokens -> (KV cache after the prompt, logits of its last position), batch of 1
        self._prompt_cache: OrderedDict[tuple[int, ...], tuple[object, torch.Tensor]] = (
            OrderedDict()
        )
        self.prompt_cache_hits = 0

    @property
    def weights_version(self) -> WeightsVersion:
        return self._version

    # ------------------------------------------------------------------ sampling

    @torch.no_grad()
    def sample(
        self, prompt_tokens: Sequence[int], num_samples: int, params: SamplingParams
    ) -> list[SampledSequence]:
        prompt = check_sample_request(
            prompt_tokens, num_samples, params, vocab_size=self.vocab_size,
            max_seq_len=self.max_seq_len,
        )  # fmt: skip
        with self._lock:
            version = self._version
            base_seed = params.seed if params.seed is not None else self._seed_rng.getrandbits(63)
            # One generator per sample: sample i depends on (seed, i) only, not on the others.
            gens = [
                torch.Generator(device=self.config.device).manual_seed(_row_seed(base_seed, i))
                for i in range(num_samples)
            ]
            stop_ids = set(params.stop_token_ids)
            if params.stop_at_eos:
                stop_ids |= self.eos_token_ids
            tokens_N: list[list[int]] = [[] for _ in range(num_samples)]
            logprobs_N: list[list[float]] = [[] for _ in range(num_samples)]
            topk_N: list[list[TopK]] = [[] for _ in range(num_samples)]
            reasons: list[StopReason | None] = [None] * num_samples
            cut_at: list[int | None] = [None] * num_samples  # text length before a stop string

            # Prefill once (or not at all, on a cache hit), then one row per sample.
            past, last_logits_1_V, hit = self._prefill(prompt)
            past.batch_repeat_interleave(num_samples)  # type: ignore[attr-defined]
            logits_N_V = last_logits_1_V.expand(num_samples, -1)
            for _ in range(params.max_tokens):
                logp_N_V = torch.log_softmax(logits_N_V, dim=-1)  # temperature-1 policy
                next_N = _choose(logits_N_V, params, gens)
                logp_N = logp_N_V.gather(1, next_N[:, None]).squeeze(1)
                if params.topk_logprobs > 0:
                    k = min(params.topk_logprobs, logp_N_V.shape[-1])
                    top_values, top_ids = logp_N_V.topk(k, dim=-1)
                    step_topk = [
                        list(zip(ids, values, strict=True))
                        for ids, values in zip(top_ids.tolist(), top_values.tolist(), strict=True)
                    ]
                for i, (token, lp) in enumerate(zip(next_N.tolist(), logp_N.tolist(), strict=True)):
                    if reasons[i] is not None:
                        continue  # finished rows ride along in the batch; their draws are dropped
                    tokens_N[i].append(token)
                    logprobs_N[i].append(lp)
                    if params.topk_logprobs > 0:
                        topk_N[i].append(step_topk[i])
                    if token in stop_ids:
                        reasons[i] = "stop"
                    elif params.stop_strings:
                        cut_at[i] = _stop_string_cut(self._decode(tokens_N[i]), params.stop_strings)
                        if cut_at[i] is not None:
                            reasons[i] = "stop"
                if all(r is not None for r in reasons):
                    break
                # Decode step: one new token per row against the KV cache of the previous steps.
                out = self.model(input_ids=next_N[:, None], past_key_values=past, use_cache=True)
                past, logits_N_V = out.past_key_values, out.logits[:, -1, :].float()
        return [
            SampledSequence(
                tokens=tokens_N[i],
                text=self._decode(tokens_N[i])[: cut_at[i]],
                logprobs=logprobs_N[i],
                stop_reason=reasons[i] or "length",
                weights_version=version,
                topk_logprobs=topk_N[i] if params.topk_logprobs > 0 else None,
                prompt_cache_hit_tokens=len(prompt) if hit else 0,
            )
            for i in range(num_samples)
        ]

    def compute_logprobs(self, tokens: Sequence[int]) -> list[float | None]:
        tokens = [int(t) for t in tokens]
        if not tokens:
            raise InvalidInputError("tokens", "must hold at least one token")
        if len(tokens) > self.max_seq_len:
            raise InvalidInputError(
                "tokens", f"{len(tokens)} tokens exceed max_seq_len {self.max_seq_len}"
            )
        check_token_range(tokens, "tokens", self.vocab_size)
        with self._lock:
            return sequence_logprobs(self.model, tokens)

    def score_prompt(
        self, tokens: Sequence[int], scoring: PromptScoring | None = None
    ) -> PromptScores:
        """Each prompt token's logprob (temperature 1, like the sampled logprobs) and what
        `scoring` asks for besides."""
        tokens = [int(t) for t in tokens]
        if len(tokens) > self.max_seq_len:
            raise InvalidInputError(
                "tokens", f"{len(tokens)} tokens exceed max_seq_len {self.max_seq_len}"
            )
        check_prompt_scoring(tokens, scoring, self.vocab_size)
        with self._lock:
            return prompt_scores(self.model, tokens, scoring)

    # ------------------------------------------------------------------ weight sync

    def load_weights(self, folder: str | os.PathLike[str], *, checkpoint_id: str) -> WeightsVersion:
        """Swap in the weights of a checkpoint folder, in place, after verifying every file.

        A base folder replaces every weight; a delta folder applies onto the weights loaded now,
        which must be its parent. A folder that fails leaves the engine on its old weights.
        """
        return self.load_chain([folder], checkpoint_id=checkpoint_id)

    def load_chain(
        self,
        folders: Sequence[str | os.PathLike[str]],
        *,
        checkpoint_id: str,
        keep_prompt_cache: bool = False,
        verified: bool = False,
    ) -> WeightsVersion:
        """Swap in the weights a chain of folders leads to: [base, delta, ...] or [delta, ...]
        onto the weights loaded now. Every file's sha256, every parent link and the digest of the
        resulting weights are checked before a single weight is touched. Cached prompts were
        computed with the old weights: they are dropped unless `keep_prompt_cache` (the weight
        sync's `reset_prompt_cache: false`, or a caller that resets them itself)."""
        chain = open_chain(folders, verified=verified)
        if chain.base is not None:
            device = str(next(self.model.parameters()).device)
            state: dict[str, torch.Tensor] = {}
            for name in chain.base_shards:
                state.update(load_file(str(chain.base / name), device=device))
            parent = chain.base_digest
        else:
            # Views of the live weights: apply_delta builds new tensors and leaves these alone.
            state, parent = full_state_dict(self.model), self._version.digest
        state = apply_chain(state, chain.deltas, parent_digest=parent, verified=True)
        with self._lock:
            # A delta's unchanged tensors are the live ones: copy_state_into skips them.
            copy_state_into(self.model, state)
            if not keep_prompt_cache:
                self._prompt_cache.clear()
            self._version = WeightsVersion(checkpoint_id, chain.digest)
        return self._version

    def reset_prompt_cache(self) -> int:
        """Drop every cached prompt prefill; returns how many there were."""
        with self._lock:
            dropped = len(self._prompt_cache)
            self._prompt_cache.clear()
        return dropped

    def close(self) -> None:
        """Drop the cached prefills (KV tensors, on the GPU with device="cuda") and give the
        allocator's cached blocks back; the model's own memory goes with the engine object."""
        self.reset_prompt_cache()
        if torch.cuda.is_initialized():
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ internals

    def _prefill(self, prompt: list[int]) -> tuple[object, torch.Tensor, bool]:
        """A private copy of the prompt's KV cache and its last logits (1 x V), from the cache
        when this prompt was seen since the last reset (then True). Call with the lock held."""
        key = tuple(prompt)
        cached = self._prompt_cache.get(key)
        if cached is None:
            out = self.model(input_ids=torch.tensor([prompt], device=self.config.device),
                             use_cache=True)  # fmt: skip
            cached = (out.past_key_values, out.logits[:, -1, :].float())
            if self.config.prompt_cache_size > 0:
                self._prompt_cache[key] = cached
                while len(self._prompt_cache) > self.config.prompt_cache_size:
                    self._prompt_cache.popitem(last=False)
            else:
                return cached[0], cached[1], False
            hit = False
        else:
            self.prompt_cache_hits += 1
            self._prompt_cache.move_to_end(key)
            hit = True
        # Decoding appends to the cache in place: each call works on its own copy.
        return copy.deepcopy(cached[0]), cached[1], hit

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)


def build_sampler_engine(
    settings: Settings,
    base: Path,
    *,
    max_seq_len: int | None,
    gpu_memory_utilization: float | None = None,
) -> SamplerEngineProtocol:
    """The engine the settings choose (`sampler_engine`) on the base model folder `base`: the
    paired samplers' worker and deployment replicas build theirs here."""
    if settings.sampler_engine == "vllm":
        from gpu_workers.engine.vllm_sampler import VllmSamplerEngine

        return VllmSamplerEngine(
            base,
            gpu_memory_utilization=gpu_memory_utilization or settings.vllm_gpu_memory_utilization,
            dtype=settings.vllm_dtype,
            max_seq_len=max_seq_len,
            checkpoint_id="base",
        )
    # The torch engine serves up to the model's own limit (as it always has); `max_seq_len`
    # sizes vLLM's KV cache.
    return SamplerEngine(base, device=settings.torch_device, checkpoint_id="base")


def _choose(
    logits_N_V: torch.Tensor, params: SamplingParams, gens: list[torch.Generator]
) -> torch.Tensor:
    """The next token of every row: greedy at temperature 0, else top_k, temperature, top_p."""
    if params.temperature == 0:
        return logits_N_V.argmax(dim=-1)
    if 0 < params.top_k < logits_N_V.shape[-1]:
        # Everything below the k-th largest logit is out before the softmax (ties stay in).
        kth_N_1 = logits_N_V.topk(params.top_k, dim=-1).values[:, -1:]
        logits_N_V = logits_N_V.masked_fill(logits_N_V < kth_N_1, float("-inf"))
    # Shifted so the top logit is 0 and divided in float64: a tiny temperature (1e-300) is
    # 0 as a float32 and overflowed to inf/NaN; this way it tends to greedy, as it should.
    shifted_N_V = (logits_N_V - logits_N_V.amax(dim=-1, keepdim=True)).double()
    probs_N_V = torch.softmax(shifted_N_V / params.temperature, dim=-1).to(logits_N_V.dtype)
    if params.top_p < 1.0:
        # Keep the smallest set of most likely tokens whose mass reaches top_p; the most likely
        # one always stays (a top_p below float32's resolution compares as 0).
        sorted_N_V, order_N_V = probs_N_V.sort(dim=-1, descending=True)
        mass_before_N_V = sorted_N_V.cumsum(dim=-1) - sorted_N_V
        cut_N_V = mass_before_N_V >= params.top_p
        cut_N_V[:, 0] = False
        sorted_N_V = sorted_N_V.masked_fill(cut_N_V, 0.0)
        probs_N_V = torch.zeros_like(probs_N_V).scatter(-1, order_N_V, sorted_N_V)
    picks = [
        torch.multinomial(probs_N_V[i], 1, generator=gen) for i, gen in enumerate(gens)
    ]  # multinomial renormalizes, so the top_p cut needs no division
    return torch.cat(picks)  # (N,)


def _stop_string_cut(text: str, stops: list[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def _row_seed(seed: int, row: int) -> int:
    digest = hashlib.sha256(f"{seed}:{row}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _eos_ids(model: torch.nn.Module, tokenizer: object) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):  # type: ignore[union-attr]
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(int(v) for v in value)
    return ids


def _verified_or_built_manifest(model_dir: Path) -> Manifest:
    # A folder loopstream wrote carries a manifest: trust nothing it does not vouch for. A
    # foreign model folder has none; its digest is computed from its bytes instead.
    if (model_dir / MANIFEST_NAME).is_file():
        return verify_folder(model_dir, allow_extra=True)
    return build_manifest(model_dir, kind="base_model")
