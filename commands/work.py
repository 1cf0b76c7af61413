"""Work requests for the GPU workers: training calls on a run, sampling calls on a sampler.

They travel in the same `CommandEnvelope` as aggregate commands (command_id = the client's
idempotency key, aggregate_id = run_id or sampler_id) on the `trainer-requests` and
`sampler-requests` topics, and are answered with a `CommandResult` whose `output` holds the
result (loss, metrics, tokens, ...). The REST API, the SDK and the workers share these models,
so a bad value is refused with the same message (naming the field) wherever it is caught.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from commands.loops import CHECKPOINT_NAME, CHECKPOINT_URI, HotloadOptions
from events.limits import (
    MAX_COUNT,
    MAX_NEW_TOKENS,
    MAX_TOKEN_ID,
    FiniteFloat,
    JsonObject,
    PositiveInt64,
    PromptText,
    Seed,
    Text,
    TokenId,
    TtlSeconds,
    UserMetadata,
)

LossFn = Literal[
    "cross_entropy", "importance_sampling", "ppo", "cispo", "dro", "gspo", "stable_reinforce"
]
# The loss_fn_config keys each loss takes (gpu_workers.engine.types has their defaults).
LOSS_FN_CONFIG_KEYS: dict[str, tuple[str, ...]] = {
    "cross_entropy": (),
    "importance_sampling": (),
    "ppo": ("clip_low_threshold", "clip_high_threshold"),
    "cispo": ("clip_low_threshold", "clip_high_threshold"),
    "dro": ("beta",),
    "gspo": ("clip_low_threshold", "clip_high_threshold"),
    "stable_reinforce": ("clip_high_threshold", "kl_coeff"),
}
# Losses that train on what a sampler recorded: each datum names the sampled sequences behind
# its targets (provenance spans) and the API fills `logprobs` in from the sampler's record.
RECORDED_LOSSES = ("stable_reinforce",)
MAX_SPANS = 4096
MAX_TOPK = 64  # top-k logprobs per position (gpu_workers.engine.types.MAX_TOPK)
IGNORE_INDEX = -100  # cross_entropy ignores target positions marked with it
TargetToken = Annotated[int, Field(ge=IGNORE_INDEX, le=MAX_TOKEN_ID)]
# How a delta checkpoint is encoded (gpu_workers/deltas.py): lossless all three.
CompressionFormat = Literal["raw", "zstd", "xor_zstd"]
DEFAULT_COMPRESSION_FORMAT: CompressionFormat = "xor_zstd"


class WorkRequest(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)
    schema_version: int = 1


class LossFnInputs(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    target_tokens: list[TargetToken] = Field(min_length=1)
    weights: list[FiniteFloat] | None = None  # cross_entropy
    logprobs: list[FiniteFloat] | None = None  # policy-gradient losses: the sampler's logprobs
    advantages: list[FiniteFloat] | None = None  # policy-gradient losses
    # gspo: the positions its sequence-level ratio averages over (default: where advantages != 0)
    sequence_ratio_mask: list[FiniteFloat] | None = None


class ProvenanceSpan(BaseModel):
    """`length` consecutive positions that come from a sampled sequence (Tinker's provenance
    spans): its prompt (`prompt`) or its generated tokens (`sampled`), from `offset` on."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["prompt", "sampled"]
    sequence_id: Text = Field(min_length=1)
    offset: int = Field(default=0, ge=0, le=MAX_NEW_TOKENS * 64)
    length: int = Field(ge=0, le=MAX_NEW_TOKENS * 64)


class Datum(BaseModel):
    """One training example: input tokens and per-position loss inputs (Tinker's Datum)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    model_input: list[TokenId] = Field(min_length=1, description="input token ids")
    loss_fn_inputs: LossFnInputs
    # Where each target position came from, in order, covering every position (stable_reinforce).
    loss_fn_input_spans: list[ProvenanceSpan] | None = Field(default=None, max_length=MAX_SPANS)

    @model_validator(mode="after")
    def _same_lengths(self) -> Datum:
        n = len(self.model_input)
        inputs = self.loss_fn_inputs
        for name in ("target_tokens", "weights", "logprobs", "advantages", "sequence_ratio_mask"):
            values = getattr(inputs, name)
            if values is not None and len(values) != n:
                raise ValueError(
                    f"loss_fn_inputs.{name} has {len(values)} entries, model_input has {n}"
                )
        spans = self.loss_fn_input_spans
        if spans is not None and sum(span.length for span in spans) != n:
            raise ValueError(
                f"loss_fn_input_spans cover {sum(span.length for span in spans)} positions, "
                f"model_input has {n}"
            )
        return self


class ForwardBackward(WorkRequest):
    data: list[Datum] = Field(min_length=1)
    loss_fn: LossFn = "cross_entropy"
    # Per-loss parameters (ppo/cispo: clip_low_threshold, clip_high_threshold; dro: beta).
    loss_fn_config: dict[Text, FiniteFloat] | None = None

    @model_validator(mode="after")
    def _inputs_for_loss(self) -> ForwardBackward:
        for key in self.loss_fn_config or {}:
            if key not in LOSS_FN_CONFIG_KEYS[self.loss_fn]:
                raise ValueError(
                    f"loss_fn_config.{key} is not a parameter of {self.loss_fn}; it takes "
                    f"{list(LOSS_FN_CONFIG_KEYS[self.loss_fn]) or 'none'}"
                )
        # cross_entropy without weights would be a silent weight of 1 everywhere in Tinker; the
        # loops API asks for them explicitly (the Tinker front door fills in ones).
        needed = ("weights",) if self.loss_fn == "cross_entropy" else ("logprobs", "advantages")
        if self.loss_fn in RECORDED_LOSSES:
            needed = ("advantages",)  # logprobs: the sampler's record, filled in by the API
        for i, datum in enumerate(self.data):
            for name in needed:
                if getattr(datum.loss_fn_inputs, name) is None:
                    raise ValueError(
                        f"data.{i}.loss_fn_inputs.{name} is required by {self.loss_fn}"
                    )
            if self.loss_fn in RECORDED_LOSSES and datum.loss_fn_input_spans is None:
                raise ValueError(
                    f"data.{i}.loss_fn_input_spans is required by {self.loss_fn}: name the "
                    "sampled sequence (sequence_id, sampled with record_stability_info) behind "
                    "the targets"
                )
            if self.loss_fn != "gspo" and datum.loss_fn_inputs.sequence_ratio_mask is not None:
                raise ValueError(f"data.{i}.loss_fn_inputs.sequence_ratio_mask is for gspo only")
        return self


class Forward(ForwardBackward):
    """The loss and logprobs of a batch without touching the gradients (evaluation)."""


class AdamParams(BaseModel):
    """AdamW hyper-parameters of one optimizer step; defaults as Tinker's AdamParams."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    learning_rate: float = Field(default=1e-4, ge=0)
    beta1: float = Field(default=0.9, ge=0, lt=1)
    beta2: float = Field(default=0.95, ge=0, lt=1)
    eps: float = Field(default=1e-12, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    grad_clip_norm: float = Field(default=0.0, ge=0, description="0 = no clipping")


class OptimStep(WorkRequest):
    adam_params: AdamParams = Field(default_factory=AdamParams)


class ComputeLogprobs(WorkRequest):
    sequences: list[list[TokenId]] = Field(min_length=1)


class SaveWeights(WorkRequest):
    """`weights`: full training state (resumable, optimizer included); `sampler_weights`: the
    weights a sampler loads. Saving sampler weights also syncs them to the run's sampler, unless
    `hotload` is null (save only; `HotloadWeights` syncs the snapshot later)."""

    name: str = Field(pattern=CHECKPOINT_NAME)
    kind: Literal["weights", "sampler_weights"] = "sampler_weights"
    ttl_seconds: TtlSeconds | None = None
    # Sampler weights: a full `base`, or a `delta` against the last sampler save (only changed
    # tensors, lossless). None = base; LoRA runs always save a base.
    checkpoint_type: Literal["base", "delta"] | None = None
    compression_format: CompressionFormat = DEFAULT_COMPRESSION_FORMAT  # of a delta
    hotload: HotloadOptions | None = Field(default_factory=HotloadOptions)
    # Full-state saves: the caller's data position (epoch, batch, ...), handed back on load.
    loader_state: JsonObject | None = None
    # An export (Tinker's save_weights_external): a complete Hugging Face folder another tool
    # can load, so a base, and not synced to the sampler.
    export: bool = False
    # The user's labels on the checkpoint (Tinker's user_metadata on save_state and
    # save_weights_for_sampler), kept on its record and returned with it.
    user_metadata: UserMetadata | None = None

    @model_validator(mode="after")
    def _fields_for_the_kind(self) -> SaveWeights:
        # compression_format and hotload have defaults that a state save simply ignores; a value
        # that only makes sense for the other kind is refused.
        if self.checkpoint_type is not None and self.kind != "sampler_weights":
            raise ValueError("checkpoint_type applies to sampler_weights saves only")
        if self.loader_state is not None and self.kind != "weights":
            raise ValueError("loader_state applies to weights (full state) saves only")
        if self.export and (
            self.kind != "sampler_weights" or self.checkpoint_type != "base" or self.hotload
        ):
            raise ValueError(
                "an export is a sampler_weights save with checkpoint_type base and hotload null"
            )
        return self


class Sample(WorkRequest):
    prompt_tokens: list[TokenId] | None = Field(default=None, min_length=1)
    prompt: PromptText | None = None
    num_samples: int = Field(default=1, ge=1, le=128)
    max_tokens: int = Field(default=16, ge=1, le=MAX_NEW_TOKENS)
    temperature: float = Field(default=1.0, ge=0, le=10)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(
        default=-1, ge=-1, le=MAX_COUNT, description="-1 = off; else the k most likely tokens"
    )
    seed: Seed | None = None
    stop: list[Text] | None = Field(default=None, max_length=64)
    # Also answer logp(prompt[t] | prompt[:t]) for every prompt position (None for the first).
    prompt_logprobs: bool = False
    # ... only for the last N prompt tokens (earlier entries None); needs prompt_logprobs.
    prompt_logprobs_last_n: int | None = Field(default=None, ge=1, le=MAX_NEW_TOKENS * 64)
    # The k most likely tokens (temperature-1 logprobs) at every prompt / generated position.
    topk_prompt_logprobs: int = Field(default=0, ge=0, le=MAX_TOPK)
    topk_sample_logprobs: int = Field(default=0, ge=0, le=MAX_TOPK)
    # Logprobs of chosen ids at every prompt position after the first: (len(prompt) - 1, K)
    # token ids, -1 = nothing asked in that cell.
    target_prompt_logprobs: list[list[Annotated[int, Field(ge=-1, le=MAX_TOKEN_ID)]]] | None = (
        Field(default=None, max_length=MAX_NEW_TOKENS * 64)
    )
    # Tokens drawn (at `temperature`, with `seed`) at every prompt position after the first.
    prompt_alt_tokens_k: int = Field(default=0, ge=0, le=MAX_TOPK)
    # Keep what stable_reinforce trains on: each sequence is then named by
    # `<request id>:<index>` (its sequence_id) in training requests.
    record_stability_info: bool = False
    # Pinned to one checkpoint, or None to follow the latest weights the sampler has.
    checkpoint_uri: Text | None = None
    # Serve only with weights from sync N or later (`weights_version` in every answer); the
    # sampler waits up to `min_weights_wait_s` for that sync to land, then refuses.
    min_weights_version: PositiveInt64 | None = None
    min_weights_wait_s: float = Field(default=60.0, gt=0, le=3600)

    @model_validator(mode="after")
    def _one_prompt(self) -> Sample:
        if self.top_k == 0:
            raise ValueError("top_k must be -1 (off) or >= 1")
        targets = self.target_prompt_logprobs
        if targets is not None and self.prompt_tokens is not None:
            if len(targets) != len(self.prompt_tokens) - 1:
                raise ValueError(
                    f"target_prompt_logprobs has {len(targets)} rows; the prompt needs "
                    f"len(prompt) - 1 = {len(self.prompt_tokens) - 1}"
                )
            if len({len(row) for row in targets}) > 1 or any(
                not 1 <= len(row) <= MAX_TOPK for row in targets
            ):
                raise ValueError(f"target_prompt_logprobs rows must all hold K ids, 1..{MAX_TOPK}")
        if self.prompt_logprobs_last_n is not None:
            if not self.prompt_logprobs:
                raise ValueError("prompt_logprobs_last_n needs prompt_logprobs")
            if self.prompt_tokens is not None and self.prompt_logprobs_last_n >= len(
                self.prompt_tokens
            ):
                raise ValueError(
                    f"prompt_logprobs_last_n must be between 1 and len(prompt) - 1 "
                    f"({len(self.prompt_tokens) - 1})"
                )
        if self.min_weights_version is not None and self.checkpoint_uri is not None:
            raise ValueError("give checkpoint_uri or min_weights_version, not both")
        if (self.prompt_tokens is None) == (self.prompt is None):
            raise ValueError("give exactly one of prompt_tokens or prompt")
        if self.checkpoint_uri is not None and not CHECKPOINT_URI.match(self.checkpoint_uri):
            raise ValueError("checkpoint_uri must look like bt://loops:<run_id>/<kind>/<name>")
        return self


class LoadState(WorkRequest):
    """Load a `weights` (full state) checkpoint into the run: its weights, and its AdamW state
    and step too when `optimizer` is set (else the optimizer starts afresh)."""

    checkpoint_uri: Text
    optimizer: bool = True

    @model_validator(mode="after")
    def _uri(self) -> LoadState:
        if not CHECKPOINT_URI.match(self.checkpoint_uri):
            raise ValueError("checkpoint_uri must look like bt://loops:<run_id>/weights/<name>")
        return self


TRAINER_REQUESTS: tuple[type[WorkRequest], ...] = (
    ForwardBackward,
    Forward,
    LoadState,
    OptimStep,
    ComputeLogprobs,
    SaveWeights,
)
SAMPLER_REQUESTS: tuple[type[WorkRequest], ...] = (Sample,)
