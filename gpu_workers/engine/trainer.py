"""The trainer engine: forward/backward, AdamW steps, logprobs and checkpoints on an HF causal LM.

Kafka-free and synchronous: the trainer worker process calls these methods one at a time and turns
their results into events. Semantics follow the Tinker API: `forward_backward` accumulates
gradients (losses are sums), `optim_step` applies AdamW with that call's hyper-parameters and
zeroes the gradients.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import (
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from gpu_workers.deltas import (
    DEFAULT_CODEC,
    ChainHead,
    CheckpointType,
    Codec,
    chain_metadata,
    choose_checkpoint_type,
    state_digest,
    write_base_link,
    write_delta,
)
from gpu_workers.engine.model_io import (
    WEIGHTS_NAME,
    drop_tied,
    full_state_dict,
    load_causal_lm,
    load_weights_into,
    save_weights,
)
from gpu_workers.engine.resume import (
    DCP_FOLDER,
    STATE_FORMAT_V1,
    RngState,
    check_loader_state,
    load_dcp,
    param_groups_from_json,
    param_groups_to_json,
    read_trainer_state,
    save_dcp,
    write_trainer_state,
)
from gpu_workers.engine.types import (
    IGNORE_INDEX,
    AdamParams,
    Datum,
    ForwardBackwardOutput,
    InvalidInputError,
    LossFn,
    OptimStepOutput,
    check_batch,
    check_loss_fn_config,
    check_token_range,
)
from gpu_workers.manifest import Manifest, sha256_file, verify_folder, write_manifest

# Files of v1 trainer state folders (still loaded; v2 keeps tensors in dcp/, see resume.py).
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
OPTIMIZER_NAME = "optimizer.safetensors"
# Every linear layer of a Llama block, as LoRA recipes (and Tinker) adapt them all.
LORA_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class TrainerConfig:
    model_dir: Path  # HF model folder: the base model, or a full-weights checkpoint
    max_seq_len: int = 512  # longest model_input accepted, in tokens
    lora_rank: int = 0  # 0 = full fine-tuning; > 0 = peft LoRA of this rank on every linear
    lora_alpha: float = 32.0  # LoRA scale is alpha / rank
    seed: int = 0  # seeds the LoRA init (full fine-tuning has no randomness)
    device: str = "cpu"  # torch device; "cuda" on a GPU host


class TrainerEngine:
    def __init__(
        self,
        model_dir: str | os.PathLike[str],
        *,
        max_seq_len: int = 512,
        lora_rank: int = 0,
        lora_alpha: float = 32.0,
        seed: int = 0,
        device: str = "cpu",
    ) -> None:
        self.config = TrainerConfig(
            Path(model_dir), max_seq_len, lora_rank, lora_alpha, seed, device
        )
        if isinstance(lora_rank, bool) or not isinstance(lora_rank, int) or lora_rank < 0:
            raise InvalidInputError("lora_rank", f"must be an int >= 0, got {lora_rank!r}")
        model, self.tokenizer = load_causal_lm(model_dir, device=device)
        limit = getattr(model.config, "max_position_embeddings", None) or max_seq_len
        if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 1:
            raise InvalidInputError("max_seq_len", f"must be an int >= 1, got {max_seq_len!r}")
        if max_seq_len > limit:
            raise InvalidInputError(
                "max_seq_len", f"{max_seq_len} exceeds the model's max_position_embeddings {limit}"
            )
        self.base_model = model
        self.vocab_size: int = model.config.vocab_size
        if lora_rank > 0:
            from peft import LoraConfig, get_peft_model

            lora = LoraConfig(
                r=lora_rank,
                lora_alpha=lora_alpha,
                lora_dropout=0.0,  # dropout would make trainer logprobs differ from the sampler's
                target_modules=LORA_TARGET_MODULES,
                task_type="CAUSAL_LM",
            )
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                self.model = get_peft_model(model, lora)
        else:
            self.model = model
        self.model.eval()
        # name -> parameter, for the parameters the optimizer updates (all, or the LoRA ones).
        self.trainable = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        self.optimizer = torch.optim.AdamW(
            list(self.trainable.values()), **_torch_adam(AdamParams())
        )
        self.step = 0  # optimizer steps taken
        # The caller's data position that came with the last load_state (None: none saved).
        self.loader_state: dict[str, Any] | None = None
        # Last sampler save, kept so the next one can be a delta against it (one CPU copy).
        self.sampler_chain: ChainHead | None = None

    # ------------------------------------------------------------------ training

    def forward_backward(
        self,
        data: Sequence[Datum],
        loss_fn: LossFn | str,
        loss_fn_config: Mapping[str, float] | None = None,
    ) -> ForwardBackwardOutput:
        """Loss of `data` under `loss_fn`; its gradients are added to those already accumulated."""
        return self._run(data, loss_fn, loss_fn_config, backward=True)

    def forward(
        self,
        data: Sequence[Datum],
        loss_fn: LossFn | str,
        loss_fn_config: Mapping[str, float] | None = None,
    ) -> ForwardBackwardOutput:
        """Like forward_backward, without touching the gradients (e.g. for evaluation)."""
        return self._run(data, loss_fn, loss_fn_config, backward=False)

    def optim_step(self, params: AdamParams | None = None) -> OptimStepOutput:
        """One AdamW step with these hyper-parameters on the accumulated gradients; zero them."""
        params = params or AdamParams()
        for group in self.optimizer.param_groups:
            group.update(_torch_adam(params))
        grads = [p.grad for p in self.trainable.values() if p.grad is not None]
        if params.grad_clip_norm > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(
                list(self.trainable.values()), params.grad_clip_norm
            )
        elif grads:
            grad_norm = torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(g) for g in grads])
            )
        else:
            grad_norm = torch.tensor(0.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return OptimStepOutput(
            step=self.step,
            metrics={
                "grad_norm": float(grad_norm),
                "learning_rate": params.learning_rate,
                "params_with_grad": float(len(grads)),
            },
        )

    @torch.no_grad()
    def compute_logprobs(self, tokens: Sequence[int]) -> list[float | None]:
        """logp(tokens[t] | tokens[:t]) for every t; None for the first token (no context)."""
        tokens = list(tokens)
        if not tokens:
            raise InvalidInputError("tokens", "must hold at least one token")
        if len(tokens) > self.config.max_seq_len + 1:
            raise InvalidInputError(
                "tokens", f"{len(tokens)} tokens exceed max_seq_len {self.config.max_seq_len} + 1"
            )
        datum = Datum.from_tokens(tokens)
        check_token_range(tokens, "tokens", self.vocab_size)
        if len(tokens) == 1:
            return [None]
        logp_B_T, _ = self._target_logprobs([datum])
        return [None, *logp_B_T[0].tolist()]

    # ------------------------------------------------------------------ checkpoints

    def save_state(
        self, folder: str | os.PathLike[str], *, loader_state: Mapping[str, Any] | None = None
    ) -> Manifest:
        """Everything needed to resume bit for bit: the trainable weights (all, or the LoRA
        adapters) and AdamW moments as a torch distributed checkpoint, the step, torch's RNG
        states and `loader_state`, the caller's data position (JSON, at most 64 KiB), which
        `load_state` hands back as `self.loader_state`. Layout: gpu_workers/engine/resume.py."""
        loader_state = check_loader_state(loader_state)
        metadata = self._metadata()
        rng = RngState.capture()
        with _staged_folder(folder) as staging:
            tensors: dict[str, Any] = {"model": self._trainable_tensors()}
            optimizer = None
            # An AdamW that has not stepped has no state; get_optimizer_state_dict would create
            # it with a zero-lr step, changing the run being saved. Nothing to save then.
            if self.optimizer.state:
                optim = get_optimizer_state_dict(self.model, self.optimizer)
                tensors["optim"] = optim["state"]  # FQN -> {step, exp_avg, exp_avg_sq}
                optimizer = {"param_groups": param_groups_to_json(optim["param_groups"])}
            save_dcp(tensors, staging / DCP_FOLDER)
            write_trainer_state(
                staging,
                {
                    **metadata,
                    "optimizer": optimizer,
                    "rng": rng.to_json(),
                    "loader_state": loader_state,
                    "torch_version": torch.__version__,
                },
            )
            if self.config.lora_rank > 0:
                self.model.peft_config["default"].save_pretrained(str(staging))
            self._save_config_and_tokenizer(staging)
            return write_manifest(staging, kind="state", metadata=metadata)

    def load_state(self, folder: str | os.PathLike[str], *, optimizer: bool = True) -> Manifest:
        """Restore a `save_state` folder (v2, or v1 of older saves; verified against its manifest
        first) into this engine: weights, step, RNG states and `self.loader_state`; with
        `optimizer=False` the AdamW moments start afresh. Accumulated gradients are dropped."""
        folder = Path(folder)
        manifest = verify_folder(folder)
        if manifest.kind != "state":
            raise InvalidInputError(
                "checkpoint", f"a {manifest.kind!r} folder is not a trainer state"
            )
        state = read_trainer_state(folder)
        if state["lora_rank"] != self.config.lora_rank:
            raise InvalidInputError(
                "lora_rank",
                f"checkpoint has {state['lora_rank']}, engine has {self.config.lora_rank}",
            )
        if state["format"] == STATE_FORMAT_V1:
            self._load_v1_state(folder, optimizer=optimizer)
            self.loader_state = None
        else:
            rng = RngState.from_json(state["rng"])  # checked before anything changes
            self._load_dcp_state(folder, state, optimizer=optimizer)
            rng.restore()
            self.loader_state = state.get("loader_state")
        self.optimizer.zero_grad(set_to_none=True)
        self.step = int(state["step"])
        return manifest

    def save_weights_for_sampler(
        self,
        folder: str | os.PathLike[str],
        *,
        checkpoint_type: CheckpointType | None = None,
        uri: str = "",
        codec: Codec = DEFAULT_CODEC,
    ) -> Manifest:
        """The current weights (LoRA merged in) for the sampler: a `base` (a plain HF model
        folder) or a `delta` against the chain head (only the changed tensors, lossless).

        `checkpoint_type` None = base; "delta" needs a chain head; LoRA always saves a base. `uri`
        is where the caller stores the folder: the next delta names it as its parent.
        """
        kind = choose_checkpoint_type(
            checkpoint_type,
            has_chain_head=self.sampler_chain is not None,
            lora_rank=self.config.lora_rank,
        )
        # One CPU copy of the weights: what is written, and the bits the next delta is computed
        # against (the live weights move on with the next optim_step).
        state = {k: v.detach().to("cpu", copy=True) for k, v in self._merged_state_dict().items()}
        metadata = self._metadata()
        head = self.sampler_chain
        with _staged_folder(folder) as staging:
            if kind == "delta" and head is not None:
                manifest = write_delta(
                    staging, parent=head, state=state, codec=codec, metadata=metadata
                )
                position, base_digest = head.position + 1, head.base_digest
            else:
                with ThreadPoolExecutor(max_workers=1) as pool:
                    # The full-state digest (for chain.json) beside writing and hashing the file:
                    # sha256 releases the GIL.
                    digest = pool.submit(state_digest, state)
                    save_weights(state, staging / WEIGHTS_NAME)
                    hashed = {WEIGHTS_NAME: sha256_file(staging / WEIGHTS_NAME)}
                    self._save_config_and_tokenizer(staging)
                    link = write_base_link(staging, state, digest=digest.result())
                manifest = write_manifest(
                    staging,
                    kind="sampler_weights",
                    metadata={**metadata, **chain_metadata(link)},
                    hashed=hashed,
                )
                position, base_digest = 0, manifest.digest
        if self.config.lora_rank == 0:  # LoRA keeps no chain: every save is a base
            self.sampler_chain = ChainHead(
                state=state,
                folder_digest=manifest.digest,
                uri=uri,
                position=position,
                base_digest=base_digest,
            )
        return manifest

    def reset_delta_chain(self) -> None:
        """The next sampler save is a base (e.g. the store lost the chain, or a new sampler)."""
        self.sampler_chain = None

    # ------------------------------------------------------------------ internals

    def _run(
        self,
        data: Sequence[Datum],
        loss_fn: str,
        loss_fn_config: Mapping[str, float] | None,
        *,
        backward: bool,
    ) -> ForwardBackwardOutput:
        loss_fn = check_batch(
            data, loss_fn, max_seq_len=self.config.max_seq_len, vocab_size=self.vocab_size
        )
        config = check_loss_fn_config(loss_fn, loss_fn_config)
        with torch.set_grad_enabled(backward):
            logp_B_T, valid_B_T = self._target_logprobs(data)
            T = logp_B_T.shape[1]
            weights_B_T = self._pad_input(data, "weights", T, fill=1.0) * valid_B_T
            metrics: dict[str, float] = {}
            if loss_fn == "cross_entropy":
                loss = -(weights_B_T * logp_B_T).sum()
            else:  # the policy-gradient losses, on the ratio p_theta / q_sampler per token
                mask_B_T = valid_B_T * (weights_B_T > 0)
                sampler_logp_B_T = self._pad_input(data, "logprobs", T)
                advantages_B_T = self._pad_input(data, "advantages", T)
                ratio_B_T = torch.exp(logp_B_T - sampler_logp_B_T)
                if loss_fn == "gspo":
                    # The sequence's ratio is taken over sequence_ratio_mask, by default over
                    # the positions with an advantage (the sampled tokens).
                    default_B_T = (advantages_B_T != 0).float()
                    ratio_mask_B_T = self._pad_input(data, "sequence_ratio_mask", T, fill=-1.0)
                    ratio_mask_B_T = torch.where(ratio_mask_B_T < 0, default_B_T, ratio_mask_B_T)
                    objective_B_T = _gspo_objective(
                        config, logp_B_T, sampler_logp_B_T, advantages_B_T,
                        ratio_mask_B_T * mask_B_T,
                    )  # fmt: skip
                else:
                    objective_B_T = _policy_objective(
                        loss_fn, config, logp_B_T, sampler_logp_B_T, ratio_B_T, advantages_B_T
                    )
                loss = -(objective_B_T * mask_B_T).sum()
                n = mask_B_T.sum().clamp(min=1)
                gap = ((sampler_logp_B_T - logp_B_T.detach()).abs() * mask_B_T).sum() / n
                metrics["logprob_gap:mean"] = float(gap)
                metrics["ratio:mean"] = float((ratio_B_T.detach() * mask_B_T).sum() / n)
            if backward:
                loss.backward()
        lengths = [len(d.model_input) for d in data]
        logp_rows = logp_B_T.detach().tolist()
        loss = loss.detach()
        metrics["loss:sum"] = float(loss)
        metrics["tokens:sum"] = float(valid_B_T.sum())
        return ForwardBackwardOutput(
            loss=float(loss),
            loss_fn_outputs=[
                {"logprobs": row[:n]} for row, n in zip(logp_rows, lengths, strict=True)
            ],
            metrics=metrics,
        )

    def _target_logprobs(self, data: Sequence[Datum]) -> tuple[torch.Tensor, torch.Tensor]:
        """(logp of each target, 1.0 where the target counts), both (B, T); padding counts 0."""
        device = self.config.device
        T = max(len(d.model_input) for d in data)
        # Right padding needs no attention mask: causal attention never lets a real position see
        # the pad tokens after it, and the pad positions themselves are masked out of the loss.
        pad_id = self.tokenizer.pad_token_id or 0
        input_B_T = torch.tensor(
            [d.model_input + [pad_id] * (T - len(d.model_input)) for d in data], device=device
        )
        target_B_T = torch.tensor(
            [
                [int(t) for t in d.loss_fn_inputs["target_tokens"]]
                + [IGNORE_INDEX] * (T - len(d.model_input))
                for d in data
            ],
            device=device,
        )
        logits_B_T_V = self.model(input_ids=input_B_T, use_cache=False).logits.float()
        B, T, V = logits_B_T_V.shape
        # cross_entropy = -logp(target), without materializing a (B, T, V) log_softmax copy.
        logp_B_T = -F.cross_entropy(
            logits_B_T_V.view(B * T, V),
            target_B_T.view(B * T),
            ignore_index=IGNORE_INDEX,
            reduction="none",
        ).view(B, T)
        valid_B_T = (target_B_T != IGNORE_INDEX).float()
        return logp_B_T, valid_B_T

    def _pad_input(
        self, data: Sequence[Datum], name: str, T: int, fill: float = 0.0
    ) -> torch.Tensor:
        rows = []
        for d in data:
            values = d.loss_fn_inputs.get(name)
            row = [float(v) for v in values] if values is not None else [fill] * len(d.model_input)
            rows.append(row + [0.0] * (T - len(row)))
        return torch.tensor(rows, dtype=torch.float32, device=self.config.device)  # (B, T)

    def _merged_state_dict(self) -> dict[str, torch.Tensor]:
        if self.config.lora_rank == 0:
            return full_state_dict(self.model)
        from peft.tuners.lora import LoraLayer

        # W' = W + (alpha / r) * B @ A, computed out of place: merging into the live model and
        # unmerging afterwards would not give back W bit for bit.
        base = self.model.get_base_model()
        lora_layers = {name: m for name, m in base.named_modules() if isinstance(m, LoraLayer)}
        merged: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for key, tensor in base.state_dict().items():
                if ".lora_" in key:
                    continue
                if ".base_layer." in key:
                    module_name, _, param_name = key.partition(".base_layer.")
                    key = f"{module_name}.{param_name}"
                    if param_name == "weight":
                        tensor = tensor + lora_layers[module_name].get_delta_weight("default")
                merged[key] = tensor
        return drop_tied(base, merged)

    def _trainable_tensors(self) -> dict[str, torch.Tensor]:
        """FQN -> the live tensor of each trainable parameter (DCP saves them, loads into them)."""
        return {name: param.detach() for name, param in self.trainable.items()}

    def _load_dcp_state(self, folder: Path, state: Mapping[str, Any], *, optimizer: bool) -> None:
        tensors: dict[str, Any] = {"model": self._trainable_tensors()}
        saved = state.get("optimizer")
        had_moments = bool(self.optimizer.state)
        grads = {name: p.grad for name, p in self.trainable.items()}
        try:
            if optimizer and saved is not None:
                # The load template: AdamW's state with the right names, shapes and devices. On
                # a fresh AdamW, get_optimizer_state_dict makes it with a zero-lr step (weights
                # unchanged), and only when no gradient is held; the checkpoint's values
                # replace it below.
                self.optimizer.zero_grad(set_to_none=True)
                tensors["optim"] = get_optimizer_state_dict(self.model, self.optimizer)["state"]
            load_dcp(tensors, folder / DCP_FOLDER)
        except BaseException:  # a refused checkpoint leaves the engine as it was
            if not had_moments:
                self.optimizer.state.clear()
            for name, param in self.trainable.items():
                param.grad = grads[name]
            raise
        if "optim" in tensors:
            set_optimizer_state_dict(
                self.model,
                self.optimizer,
                {
                    "state": tensors["optim"],
                    "param_groups": param_groups_from_json(saved["param_groups"]),
                },
            )
        else:
            self.optimizer.state.clear()

    def _load_v1_state(self, folder: Path, *, optimizer: bool) -> None:
        """The safetensors layout of loopstream.trainer_state/v1."""
        if self.config.lora_rank > 0:
            from peft import set_peft_model_state_dict

            adapter = load_file(str(folder / ADAPTER_WEIGHTS_NAME), device=self.config.device)
            result = set_peft_model_state_dict(self.model, adapter)
            if result.unexpected_keys:
                raise InvalidInputError(
                    "checkpoint", f"adapter keys unknown: {result.unexpected_keys[:5]}"
                )
        else:
            load_weights_into(self.model, [folder / WEIGHTS_NAME])
        if optimizer:
            self._load_optimizer_tensors(
                load_file(str(folder / OPTIMIZER_NAME), device=self.config.device)
            )
        else:
            self.optimizer.state.clear()

    def _load_optimizer_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.optimizer.state.clear()
        for key, value in tensors.items():
            name, _, slot = key.rpartition("::")
            if name not in self.trainable:
                raise InvalidInputError(
                    "checkpoint", f"optimizer state for unknown parameter {name}"
                )
            param = self.trainable[name]
            # AdamW keeps `step` as a CPU float tensor unless capturable; moments live by the param.
            device = "cpu" if slot == "step" else param.device
            self.optimizer.state[param][slot] = value.to(device)

    def _save_config_and_tokenizer(self, folder: Path) -> None:
        self.base_model.config.save_pretrained(str(folder))
        self.tokenizer.save_pretrained(str(folder))

    def _metadata(self) -> dict[str, object]:
        return {
            "step": self.step,
            "lora_rank": self.config.lora_rank,
            "lora_alpha": self.config.lora_alpha,
            "max_seq_len": self.config.max_seq_len,
            "seed": self.config.seed,
        }


def _policy_objective(
    loss_fn: str,
    config: Mapping[str, float],
    logp_B_T: torch.Tensor,
    sampler_logp_B_T: torch.Tensor,
    ratio_B_T: torch.Tensor,
    advantages_B_T: torch.Tensor,
) -> torch.Tensor:
    """Per-token objective (to maximise) of each policy-gradient loss, as Tinker defines them."""
    if loss_fn == "importance_sampling":  # ratio * A
        return ratio_B_T * advantages_B_T
    if loss_fn == "ppo":  # min(ratio * A, clip(ratio) * A): never gains from leaving the clip
        clipped_B_T = ratio_B_T.clamp(config["clip_low_threshold"], config["clip_high_threshold"])
        return torch.minimum(ratio_B_T * advantages_B_T, clipped_B_T * advantages_B_T)
    if loss_fn == "cispo":  # sg(clip(ratio)) * logp * A: the clipped ratio only weighs tokens
        clipped_B_T = ratio_B_T.clamp(config["clip_low_threshold"], config["clip_high_threshold"])
        return clipped_B_T.detach() * logp_B_T * advantages_B_T
    if loss_fn == "dro":  # logp * A - beta / 2 * (logp - q)^2: a quadratic pull towards q
        return logp_B_T * advantages_B_T - 0.5 * config["beta"] * (logp_B_T - sampler_logp_B_T) ** 2
    if loss_fn == "stable_reinforce":
        # REINFORCE with a truncated importance weight sg(min(ratio, c)) * logp * A, which keeps
        # stale or numerically different sampler data from blowing up a step, minus kl_coeff
        # times the k3 estimate of KL(q || p_theta) on the sampled tokens:
        # exp(q - logp) - (q - logp) - 1 >= 0, zero where the two policies agree.
        weight_B_T = ratio_B_T.clamp(max=config["clip_high_threshold"]).detach()
        log_q_over_p_B_T = sampler_logp_B_T - logp_B_T
        kl_B_T = torch.exp(log_q_over_p_B_T) - log_q_over_p_B_T - 1
        return weight_B_T * logp_B_T * advantages_B_T - config["kl_coeff"] * kl_B_T
    raise InvalidInputError("loss_fn", f"not a policy-gradient loss: {loss_fn!r}")


def _gspo_objective(
    config: Mapping[str, float],
    logp_B_T: torch.Tensor,
    sampler_logp_B_T: torch.Tensor,
    advantages_B_T: torch.Tensor,
    ratio_mask_B_T: torch.Tensor,
) -> torch.Tensor:
    """GSPO (Zheng et al. 2025), token form: every token of a sequence shares the sequence's
    ratio s = exp(mean over the ratio mask of logp - q), and its gradient flows through the
    token's own logp: s_t = sg(s) * p_theta / sg(p_theta). Then min(s_t * A, clip(s_t) * A)."""
    n_B = ratio_mask_B_T.sum(dim=1).clamp(min=1)
    log_s_B = ((logp_B_T - sampler_logp_B_T) * ratio_mask_B_T).sum(dim=1) / n_B
    s_B_T = torch.exp(log_s_B.detach()[:, None] + logp_B_T - logp_B_T.detach())
    clipped_B_T = s_B_T.clamp(config["clip_low_threshold"], config["clip_high_threshold"])
    return torch.minimum(s_B_T * advantages_B_T, clipped_B_T * advantages_B_T)


def _torch_adam(params: AdamParams) -> dict[str, object]:
    return {
        "lr": params.learning_rate,
        "betas": (params.beta1, params.beta2),
        "eps": params.eps,
        "weight_decay": params.weight_decay,
    }


class _staged_folder:
    """Write a checkpoint beside its destination and rename it in: never half a folder."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.target = Path(folder)

    def __enter__(self) -> Path:
        if self.target.exists() and any(self.target.iterdir()):
            raise InvalidInputError("folder", f"{self.target} exists and is not empty")
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.staging = Path(
            tempfile.mkdtemp(prefix=f".{self.target.name}.", dir=self.target.parent)
        )
        return self.staging

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            if exc_type is None:
                if self.target.exists():
                    self.target.rmdir()  # empty, checked on entry
                self.staging.rename(self.target)
        finally:
            shutil.rmtree(self.staging, ignore_errors=True)
