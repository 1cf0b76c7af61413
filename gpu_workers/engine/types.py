"""The engines' data types, shaped like the Tinker API's (Datum, AdamParams, SamplingParams, ...).

Plain frozen dataclasses that validate themselves on construction. Every validation failure is an
`InvalidInputError` (a `ValueError`) whose `field` names the offending input, so a worker can turn
it into a `CommandRejected` with a useful reason instead of a crash deep inside torch.

Conventions (as in Tinker): a Datum's `model_input` has T tokens and every `loss_fn_inputs` array
has T entries, one per input position; `target_tokens[t]` is the token the model should predict
after reading `model_input[: t + 1]` (the caller does the shift). Losses are sums, never means:
normalization is the caller's business, through `weights` or `advantages`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, get_args

LossFn = Literal[
    "cross_entropy", "importance_sampling", "ppo", "cispo", "dro", "gspo", "stable_reinforce"
]
LOSS_FNS: tuple[str, ...] = get_args(LossFn)
_POLICY_INPUTS = ("target_tokens", "logprobs", "advantages")
# Which loss_fn_inputs each loss needs, and which it may take. In importance_sampling `weights`
# is an optional 0/1 mask (e.g. to leave prompt positions out of the logprob-gap metric).
REQUIRED_INPUTS: dict[str, tuple[str, ...]] = {
    "cross_entropy": ("target_tokens",),
    "importance_sampling": _POLICY_INPUTS,
    "ppo": _POLICY_INPUTS,
    "cispo": _POLICY_INPUTS,
    "dro": _POLICY_INPUTS,
    "gspo": _POLICY_INPUTS,
    # The API fills `logprobs` in from what the sampler recorded (the datum's provenance spans).
    "stable_reinforce": _POLICY_INPUTS,
}
OPTIONAL_INPUTS: dict[str, tuple[str, ...]] = {
    name: ("weights", "sequence_ratio_mask") if name == "gspo" else ("weights",)
    for name in LOSS_FNS
}
# loss_fn_config keys each loss takes, with their defaults (Tinker's names). PPO and CISPO clip
# the ratio p_theta / q to [clip_low_threshold, clip_high_threshold] (Tinker: 1 -/+ 0.2); DRO's
# quadratic penalty has weight beta (0.05 is loopstream's default: Tinker's docs name no default).
# GSPO clips its sequence-level ratio to the paper's band (1 - 3e-4, 1 + 4e-4; Zheng et al. 2025).
# StableReinforce caps its importance weight at clip_high_threshold and pulls towards the
# sampler by kl_coeff (loopstream's definition, docs/tinker.md: Tinker publishes no formula).
LOSS_FN_CONFIG_DEFAULTS: dict[str, dict[str, float]] = {
    "cross_entropy": {},
    "importance_sampling": {},
    "ppo": {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2},
    "cispo": {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2},
    "dro": {"beta": 0.05},
    "gspo": {"clip_low_threshold": 1 - 3e-4, "clip_high_threshold": 1 + 4e-4},
    "stable_reinforce": {"clip_high_threshold": 2.0, "kl_coeff": 0.0},
}
IGNORE_INDEX = -100  # a target token of -100 contributes nothing (PyTorch's convention)
StopReason = Literal["stop", "length"]


class InvalidInputError(ValueError):
    """A request the engine refuses; `field` is the dotted path of the bad input."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.reason = message

    def __reduce__(self) -> tuple[type[InvalidInputError], tuple[str, str]]:
        # Pickled with both arguments: the default rebuilds from `args` (the one joined message)
        # and fails, so a refusal raised in a Ray actor reached its caller as a 500.
        return (type(self), (self.field, self.reason))


@dataclass(frozen=True)
class Datum:
    model_input: list[int]  # (T,) token ids fed to the model
    loss_fn_inputs: dict[str, list[float]]  # name -> (T,) array; target_tokens hold ints

    def __post_init__(self) -> None:
        _check_tokens(self.model_input, "model_input", allow_ignore=False)
        if len(self.model_input) == 0:
            raise InvalidInputError("model_input", "must hold at least one token")
        if not isinstance(self.loss_fn_inputs, Mapping):
            raise InvalidInputError("loss_fn_inputs", "must be a mapping of name -> list")
        for name, values in self.loss_fn_inputs.items():
            where = f"loss_fn_inputs.{name}"
            if not isinstance(values, Sequence) or isinstance(values, str | bytes):
                raise InvalidInputError(where, "must be a list of numbers")
            if len(values) != len(self.model_input):
                raise InvalidInputError(
                    where, f"has {len(values)} entries, model_input has {len(self.model_input)}"
                )
            if name == "target_tokens":
                _check_tokens(values, where, allow_ignore=True)
            else:
                for i, v in enumerate(values):
                    if (
                        isinstance(v, bool)
                        or not isinstance(v, int | float)
                        or not math.isfinite(v)
                    ):
                        raise InvalidInputError(f"{where}[{i}]", f"not a finite number: {v!r}")

    @classmethod
    def from_tokens(
        cls,
        tokens: Sequence[int],
        *,
        weights: Sequence[float] | None = None,
        **per_target: Sequence[float],
    ) -> Datum:
        """Shift a full sequence into (model_input, target_tokens), Tinker-cookbook style.

        `weights` and every other per-target array have len(tokens) - 1 entries, aligned with the
        targets (tokens[1:]).
        """
        inputs: dict[str, list[float]] = {"target_tokens": [int(t) for t in tokens[1:]]}
        if weights is not None:
            inputs["weights"] = [float(w) for w in weights]
        for name, values in per_target.items():
            inputs[name] = [float(v) for v in values]
        return cls(model_input=[int(t) for t in tokens[:-1]], loss_fn_inputs=inputs)


@dataclass(frozen=True)
class AdamParams:
    learning_rate: float = 1e-4  # step size
    beta1: float = 0.9  # decay of the first-moment (mean) estimate
    beta2: float = 0.95  # decay of the second-moment (uncentered variance) estimate
    eps: float = 1e-12  # added to sqrt(v) in the denominator
    weight_decay: float = 0.0  # decoupled (AdamW) decay, applied as lr * wd * w
    grad_clip_norm: float = 0.0  # clip the global grad L2 norm to this; 0 = no clipping

    def __post_init__(self) -> None:
        for name in ("learning_rate", "eps", "weight_decay", "grad_clip_norm"):
            value = getattr(self, name)
            if not _finite(value) or value < 0:
                raise InvalidInputError(name, f"must be a finite number >= 0, got {value!r}")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not _finite(value) or not 0.0 <= value < 1.0:
                raise InvalidInputError(name, f"must be in [0, 1), got {value!r}")


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16  # new tokens to generate at most
    temperature: float = 1.0  # softmax temperature; 0 = greedy
    top_p: float = 1.0  # nucleus sampling mass; 1 = off
    top_k: int = -1  # sample among the k most likely tokens only; -1 = off (Tinker's default)
    seed: int | None = None  # same seed + same weights + same prompt -> same tokens
    stop: list[str] | list[int] | None = None  # stop strings or stop token ids
    stop_at_eos: bool = True  # the model's eos token ends a sequence (it is kept in `tokens`)
    topk_logprobs: int = 0  # also answer the k most likely tokens at each generated position

    def __post_init__(self) -> None:
        if isinstance(self.topk_logprobs, bool) or not isinstance(self.topk_logprobs, int):
            raise InvalidInputError("topk_logprobs", f"must be an int, got {self.topk_logprobs!r}")
        if not 0 <= self.topk_logprobs <= MAX_TOPK:
            raise InvalidInputError("topk_logprobs", f"must be in [0, {MAX_TOPK}]")
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int):
            raise InvalidInputError("max_tokens", f"must be an int, got {self.max_tokens!r}")
        if self.max_tokens < 1:
            raise InvalidInputError("max_tokens", f"must be >= 1, got {self.max_tokens}")
        if not _finite(self.temperature) or self.temperature < 0:
            raise InvalidInputError("temperature", f"must be >= 0, got {self.temperature!r}")
        if not _finite(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise InvalidInputError("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int):
            raise InvalidInputError("top_k", f"must be an int, got {self.top_k!r}")
        if self.top_k == 0 or self.top_k < -1:
            raise InvalidInputError("top_k", f"must be -1 (off) or >= 1, got {self.top_k}")
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int)
        ):
            raise InvalidInputError("seed", f"must be an int or None, got {self.seed!r}")
        if self.stop is not None:
            if not isinstance(self.stop, list):
                raise InvalidInputError("stop", "must be a list of strings or of token ids")
            if all(isinstance(s, str) for s in self.stop):
                if any(s == "" for s in self.stop):
                    raise InvalidInputError("stop", "stop strings must not be empty")
            elif not all(isinstance(s, int) and not isinstance(s, bool) for s in self.stop):
                raise InvalidInputError("stop", "must be all strings or all token ids, not mixed")

    @property
    def stop_strings(self) -> list[str]:
        return [s for s in self.stop or [] if isinstance(s, str)]

    @property
    def stop_token_ids(self) -> list[int]:
        return [s for s in self.stop or [] if isinstance(s, int)]


@dataclass(frozen=True)
class WeightsVersion:
    checkpoint_id: str  # which checkpoint (e.g. its URI, or "base" for the base model)
    digest: str  # the manifest digest: identical bytes <=> identical digest

    def __str__(self) -> str:
        return f"{self.checkpoint_id}@{self.digest[:12]}"


TopK = list[tuple[int, float]]  # (token id, temperature-1 logprob), most likely first


@dataclass(frozen=True)
class SampledSequence:
    tokens: list[int]  # (N,) generated tokens, the stop token included when there is one
    text: str  # decoded generated text, cut before a matched stop string
    logprobs: list[float]  # (N,) temperature-1 policy logprob of each generated token
    stop_reason: StopReason  # "stop": eos/stop token/stop string; "length": hit max_tokens
    weights_version: WeightsVersion | None = None  # the weights that produced it
    topk_logprobs: list[TopK] | None = None  # (N,) when SamplingParams.topk_logprobs > 0
    # Prompt tokens whose prefill came from the prompt cache (the same for every sequence of a
    # request; Tinker's SampleResponse.prompt_cache_hit_tokens).
    prompt_cache_hit_tokens: int = 0


@dataclass(frozen=True)
class PromptScores:
    logprobs: list[float | None]  # (T,) logp(tokens[t] | tokens[:t]); None for t = 0
    topk: list[TopK | None] | None = None  # (T,) the k most likely tokens there; None for t = 0
    # (T - 1, K) logprobs of the requested token ids at positions 1.., 0.0 where the id was -1
    target_logprobs: list[list[float]] | None = None
    # (T - 1, k) tokens drawn at the request's temperature at positions 1.., with their logprobs
    alt_tokens: list[list[int]] | None = None
    alt_logprobs: list[list[float]] | None = None


@dataclass(frozen=True)
class PromptScoring:
    """What to compute over a prompt besides each token's logprob (Tinker's SampleRequest)."""

    top_k: int = 0  # the k most likely tokens at each position
    target_ids: list[list[int]] | None = None  # (T - 1, K) ids to score; -1 = none
    alt_k: int = 0  # tokens to draw at each position after the first
    temperature: float = 1.0  # of those draws
    seed: int | None = None  # of those draws

    @property
    def asks_more(self) -> bool:
        """Anything besides each prompt token's own logprob."""
        return self.top_k > 0 or self.target_ids is not None or self.alt_k > 0


@dataclass(frozen=True)
class ForwardBackwardOutput:
    loss: float  # the summed loss of the batch
    loss_fn_outputs: list[dict[str, list[float]]]  # per datum: {"logprobs": (T,)}
    metrics: dict[str, float] = field(default_factory=dict)  # loss:sum, tokens:sum, ...


@dataclass(frozen=True)
class OptimStepOutput:
    step: int  # optimizer steps taken so far, this one included
    metrics: dict[str, float] = field(default_factory=dict)  # grad_norm, learning_rate, ...


def check_loss_fn(loss_fn: str) -> LossFn:
    if loss_fn not in LOSS_FNS:
        raise InvalidInputError(
            "loss_fn", f"unknown loss function {loss_fn!r}; expected one of {list(LOSS_FNS)}"
        )
    return loss_fn  # type: ignore[return-value]


def check_loss_fn_config(loss_fn: str, config: Mapping[str, float] | None) -> dict[str, float]:
    """The loss's config with defaults filled in; unknown keys and non-numbers are refused."""
    defaults = LOSS_FN_CONFIG_DEFAULTS[check_loss_fn(loss_fn)]
    resolved = dict(defaults)
    for key, value in (config or {}).items():
        if key not in defaults:
            raise InvalidInputError(
                f"loss_fn_config.{key}",
                f"not a parameter of loss_fn {loss_fn!r}; it takes {sorted(defaults) or 'none'}",
            )
        if not _finite(value):
            raise InvalidInputError(f"loss_fn_config.{key}", f"not a finite number: {value!r}")
        resolved[key] = float(value)
    if "clip_low_threshold" in resolved and not (
        0 <= resolved["clip_low_threshold"] <= 1 <= resolved["clip_high_threshold"]
    ):
        raise InvalidInputError(
            "loss_fn_config", "needs 0 <= clip_low_threshold <= 1 <= clip_high_threshold"
        )
    if resolved.get("clip_high_threshold", 1.0) < 1:
        raise InvalidInputError("loss_fn_config.clip_high_threshold", "must be >= 1")
    if resolved.get("kl_coeff", 0.0) < 0:
        raise InvalidInputError("loss_fn_config.kl_coeff", "must be >= 0")
    return resolved


def check_batch(
    data: Sequence[Datum], loss_fn: str, *, max_seq_len: int, vocab_size: int
) -> LossFn:
    """Everything about a forward/backward request that the engine can check before torch runs."""
    loss_fn = check_loss_fn(loss_fn)
    if len(data) == 0:
        raise InvalidInputError("data", "must hold at least one datum")
    required, optional = REQUIRED_INPUTS[loss_fn], OPTIONAL_INPUTS[loss_fn]
    for i, datum in enumerate(data):
        if not isinstance(datum, Datum):
            raise InvalidInputError(f"data[{i}]", f"must be a Datum, got {type(datum).__name__}")
        if len(datum.model_input) > max_seq_len:
            raise InvalidInputError(
                f"data[{i}].model_input",
                f"sequence of {len(datum.model_input)} tokens exceeds max_seq_len {max_seq_len}",
            )
        for name in required:
            if name not in datum.loss_fn_inputs:
                raise InvalidInputError(
                    f"data[{i}].loss_fn_inputs.{name}", f"required by loss_fn {loss_fn!r}"
                )
        for name in datum.loss_fn_inputs:
            if name not in required and name not in optional:
                raise InvalidInputError(
                    f"data[{i}].loss_fn_inputs.{name}", f"not an input of loss_fn {loss_fn!r}"
                )
        check_token_range(datum.model_input, f"data[{i}].model_input", vocab_size)
        check_token_range(
            datum.loss_fn_inputs["target_tokens"],
            f"data[{i}].loss_fn_inputs.target_tokens",
            vocab_size,
        )
    return loss_fn


MAX_TOPK = 64  # top-k logprobs per position at most (a request is k x tokens numbers)


def check_prompt_scoring(tokens: list[int], scoring: PromptScoring | None, vocab_size: int) -> None:
    """The checks every sampler engine makes before scoring a prompt."""
    if not tokens:
        raise InvalidInputError("tokens", "must hold at least one token")
    check_token_range(tokens, "tokens", vocab_size)
    if scoring is None:
        return
    counts = {"topk_prompt_logprobs": scoring.top_k, "prompt_alt_tokens_k": scoring.alt_k}
    for name, k in counts.items():
        if not 0 <= k <= MAX_TOPK:
            raise InvalidInputError(name, f"must be in [0, {MAX_TOPK}], got {k}")
    if scoring.target_ids is not None:
        where = "target_prompt_logprobs"
        if len(scoring.target_ids) != len(tokens) - 1:
            raise InvalidInputError(
                where,
                f"has {len(scoring.target_ids)} rows, the prompt needs len(prompt) - 1 = "
                f"{len(tokens) - 1}",
            )
        widths = {len(row) for row in scoring.target_ids}
        if len(widths) > 1 or (widths and not 1 <= widths.pop() <= MAX_TOPK):
            raise InvalidInputError(where, f"rows must all hold K ids, 1 <= K <= {MAX_TOPK}")
        for i, row in enumerate(scoring.target_ids):
            for t in row:
                if not -1 <= t < vocab_size:
                    raise InvalidInputError(f"{where}[{i}]", f"token id {t} outside the vocabulary")


MAX_SAMPLES_PER_CALL = 1024  # a guard against a typo turning into an out-of-memory


def check_sample_request(
    prompt_tokens: Sequence[int],
    num_samples: int,
    params: SamplingParams,
    *,
    vocab_size: int,
    max_seq_len: int,
) -> list[int]:
    """The checks every sampler engine makes before sampling; returns the prompt as ints."""
    if not isinstance(params, SamplingParams):
        raise InvalidInputError("sampling_params", "must be a SamplingParams")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int):
        raise InvalidInputError("num_samples", f"must be an int, got {num_samples!r}")
    if not 1 <= num_samples <= MAX_SAMPLES_PER_CALL:
        raise InvalidInputError(
            "num_samples", f"must be in [1, {MAX_SAMPLES_PER_CALL}], got {num_samples}"
        )
    if isinstance(prompt_tokens, str | bytes) or not prompt_tokens:
        raise InvalidInputError("prompt_tokens", "must be a non-empty list of token ids")
    prompt = [int(t) for t in prompt_tokens]
    check_token_range(prompt, "prompt_tokens", vocab_size)
    if len(prompt) + params.max_tokens > max_seq_len:
        raise InvalidInputError(
            "max_tokens",
            f"prompt of {len(prompt)} tokens + max_tokens {params.max_tokens} exceeds "
            f"max_seq_len {max_seq_len}",
        )
    for i, s in enumerate(params.stop_token_ids):
        if not 0 <= s < vocab_size:
            raise InvalidInputError(f"stop[{i}]", f"token id {s} outside the vocabulary")
    return prompt


def check_token_range(tokens: Sequence[float], where: str, vocab_size: int) -> None:
    for t, token in enumerate(tokens):
        if token != IGNORE_INDEX and not 0 <= token < vocab_size:
            raise InvalidInputError(
                f"{where}[{t}]", f"token id {token} outside the vocabulary [0, {vocab_size})"
            )


def _check_tokens(tokens: object, where: str, *, allow_ignore: bool) -> None:
    if not isinstance(tokens, Sequence) or isinstance(tokens, str | bytes):
        raise InvalidInputError(where, "must be a list of token ids")
    for t, token in enumerate(tokens):
        # Targets may arrive as floats from a JSON array of numbers; 3.0 is fine, 3.5 is not.
        ok = (
            isinstance(token, int | float)
            and not isinstance(token, bool)
            and float(token).is_integer()
        )
        if not ok or (token < 0 and not (allow_ignore and token == IGNORE_INDEX)):
            raise InvalidInputError(f"{where}[{t}]", f"not a valid token id: {token!r}")


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
