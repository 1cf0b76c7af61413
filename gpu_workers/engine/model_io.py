"""Loading a Hugging Face causal LM folder and moving weights in and out of it.

One loader for every model: the project's tiny test model and a real model folder go through the
same `AutoModelForCausalLM.from_pretrained` call.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from gpu_workers.engine.types import InvalidInputError, PromptScores, PromptScoring, TopK

WEIGHTS_NAME = "model.safetensors"


def set_cpu_threads(num_threads: int | None = None) -> int:
    """Pick torch's intra-op thread count for a worker process; returns the count set.

    The default is 1: the tiny model's matmuls are too small to gain from threads (measured with
    benchmarks/engine_step.py: a train step takes 13 ms on 1 thread, 18 ms on 2), and CPU workers
    share their machine with the control plane. A real model on CPU should pass more.
    """
    n = num_threads or 1
    torch.set_num_threads(n)
    return n


def load_causal_lm(
    model_dir: str | os.PathLike[str], *, device: str = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise InvalidInputError("model_dir", f"{model_dir} is not a model folder (no config.json)")
    # Weight-loading progress bars are noise in a worker's log.
    hf_logging.disable_progress_bar()
    # float32 on CPU: the trainer's and the sampler's logprobs must agree to 1e-4.
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    # No dropout anywhere: the trainer's logprobs must be the sampler's, position for position.
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return model, tokenizer


def full_state_dict(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """The model's weights as saved by HF: a tied lm_head is left out (it is the embedding)."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    return drop_tied(model, state)


def drop_tied(model: PreTrainedModel, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    output = model.get_output_embeddings()
    if output is not None and output.weight is model.get_input_embeddings().weight:
        state = {k: v for k, v in state.items() if not k.endswith("lm_head.weight")}
    return state


def save_weights(state: dict[str, torch.Tensor], path: Path) -> None:
    tensors: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for name, tensor in sorted(state.items()):
        tensor = tensor.detach().to("cpu").contiguous()
        storage = tensor.untyped_storage().data_ptr()  # 0 for an empty tensor
        if storage and storage in storages:  # safetensors refuses tensors sharing memory
            tensor = tensor.clone()
        storages.add(storage)
        tensors[name] = tensor
    save_file(tensors, str(path), metadata={"format": "pt"})


def weight_files(file_names: list[str]) -> list[str]:
    """The model-weight shards of a folder: `model.safetensors` or `model-0000i-of-0000n...`."""
    return sorted(n for n in file_names if n.startswith("model") and n.endswith(".safetensors"))


def load_weights_into(model: PreTrainedModel, paths: list[Path]) -> None:
    """Copy safetensors shards into `model` in place (same parameter objects, new values).

    Every name and shape is checked before the first copy, so a bad checkpoint leaves the model
    as it was.
    """
    device = str(next(model.parameters()).device)
    state: dict[str, torch.Tensor] = {}
    for path in paths:
        state.update(load_file(str(path), device=device))
    copy_state_into(model, state)


def copy_state_into(
    model: PreTrainedModel, state: dict[str, torch.Tensor], *, partial: bool = False
) -> None:
    """Copy `state` into the model's parameters in place, after checking every name and shape.

    `partial`: `state` may hold a subset of the weights (a delta's changed tensors only).
    """
    expected = set(full_state_dict(model))
    missing = set() if partial else expected - set(state)
    unexpected = set(state) - expected
    if missing or unexpected:
        raise InvalidInputError(
            "weights",
            f"checkpoint does not fit the model: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}",
        )
    params = dict(model.state_dict())
    for name, tensor in state.items():
        if params[name].shape != tensor.shape:
            raise InvalidInputError(
                "weights", f"{name}: shape {tuple(tensor.shape)} != {tuple(params[name].shape)}"
            )
    with torch.no_grad():
        for name, tensor in state.items():
            if tensor.data_ptr() != params[name].data_ptr():  # unchanged views: nothing to copy
                params[name].copy_(tensor)


@torch.no_grad()
def prompt_scores(
    model: PreTrainedModel, tokens: list[int], scoring: PromptScoring | None = None
) -> PromptScores:
    """logp(tokens[t] | tokens[:t]) under `model` (temperature 1) and, as `scoring` asks, the
    most likely tokens, the logprobs of given ids, and tokens drawn at each position after the
    first (the first token has no context)."""
    scoring = scoring or PromptScoring()
    device = next(model.parameters()).device
    input_1_T = torch.tensor([tokens], device=device)
    logits_T_V = model(input_ids=input_1_T, use_cache=False).logits[0].float()
    logp_T_V = torch.log_softmax(logits_T_V[:-1], dim=-1)  # position t predicts token t + 1
    logp_T = logp_T_V.gather(1, input_1_T[0, 1:, None]).squeeze(1)
    topk: list[TopK | None] | None = None
    if scoring.top_k > 0:
        values_T_K, ids_T_K = logp_T_V.topk(min(scoring.top_k, logp_T_V.shape[-1]), dim=-1)
        topk = [None] + [
            list(zip(ids, values, strict=True))
            for ids, values in zip(ids_T_K.tolist(), values_T_K.tolist(), strict=True)
        ]
    target_logprobs = None
    if scoring.target_ids is not None:
        ids_T_K = torch.tensor(scoring.target_ids, dtype=torch.long, device=device)
        scored_T_K = logp_T_V.gather(1, ids_T_K.clamp(min=0))
        target_logprobs = scored_T_K.masked_fill(ids_T_K < 0, 0.0).tolist()
    alt_tokens = alt_logprobs = None
    if scoring.alt_k > 0:
        generator = torch.Generator(device=device)
        if scoring.seed is not None:
            generator.manual_seed(scoring.seed)
        else:
            generator.seed()
        if scoring.temperature == 0:
            drawn_T_K = logits_T_V[:-1].argmax(dim=-1, keepdim=True).expand(-1, scoring.alt_k)
        else:
            probs_T_V = torch.softmax(logits_T_V[:-1] / scoring.temperature, dim=-1)
            drawn_T_K = torch.multinomial(
                probs_T_V, scoring.alt_k, replacement=True, generator=generator
            )
        alt_tokens = drawn_T_K.tolist()
        alt_logprobs = logp_T_V.gather(1, drawn_T_K).tolist()
    return PromptScores(
        logprobs=[None, *logp_T.tolist()],
        topk=topk,
        target_logprobs=target_logprobs,
        alt_tokens=alt_tokens,
        alt_logprobs=alt_logprobs,
    )


@torch.no_grad()
def sequence_logprobs(model: PreTrainedModel, tokens: list[int]) -> list[float | None]:
    """logp(tokens[t] | tokens[:t]) under `model`; None for the first token."""
    device = next(model.parameters()).device
    input_1_T = torch.tensor([tokens], device=device)
    logits_T_V = model(input_ids=input_1_T, use_cache=False).logits[0].float()
    logp_T_V = torch.log_softmax(logits_T_V[:-1], dim=-1)  # position t predicts token t + 1
    logp_T = logp_T_V.gather(1, input_1_T[0, 1:, None]).squeeze(1)
    return [None, *logp_T.tolist()]
