"""`SamplerEngineProtocol` on vLLM, for GPU hosts: install the `gpu` extra (`uv pip install -e
'.[gpu]'`), which pins vllm==0.33.0.

vLLM is imported lazily: this module imports fine without it, and constructing the engine without
it raises `VllmNotInstalledError`, which says what to install. Nothing here has run on a GPU yet:
the CPU test suite covers the pure helpers and the folder streaming only (docs/vllm.md).

Checked against the source of the vllm 0.33.0 wheel (the pinned version):
- `vllm/entrypoints/llm.py`: `LLM(model, *, tokenizer, dtype, seed, gpu_memory_utilization,
  tensor_parallel_size, enforce_eager, **kwargs)`, the kwargs going to `EngineArgs`
  (`vllm/engine/arg_utils.py`: `max_model_len`, `enable_prefix_caching`, `worker_extension_cls`,
  `logprobs_mode`); `generate(prompts, sampling_params, *, use_tqdm)` returns one `RequestOutput`
  per prompt, in prompt order (`entrypoints/common/offline.py` sorts by request id, and sets
  `FINAL_ONLY` so the n samples of a prompt come together, ordered by index);
  `collective_rpc(method, timeout=None, args=(), kwargs=None)` returns one result per worker;
  `reset_prefix_cache(reset_running_requests=False, reset_connector=False) -> bool`.
- `vllm/v1/worker/worker_base.py` (`WorkerWrapperBase.init_worker`): the class named by
  `worker_extension_cls` (a qualified name, imported in the worker process) is appended to the
  worker class's bases, and none of its attribute names may exist on the worker already.
- `vllm/v1/worker/gpu_worker.py`, `gpu_model_runner.py`, `gpu/model_runner.py`: the worker holds
  `self.model_runner`; `model_runner.get_model()` returns the model (unwrapping the CUDA-graph
  wrapper that the V1 runner's `.model` may be), in both model runners.
- `vllm/model_executor/models/llama.py`: `load_weights(weights: Iterable[tuple[str, Tensor]]) ->
  set[str]` takes Hugging Face checkpoint names and does the q/k/v and gate/up fusing and the
  tensor-parallel sharding itself; a tied lm_head needs no tensor of its own.
- `vllm/sampling_params.py`: `n`, `temperature` (in [0, 2]; 0 = greedy, and greedy refuses
  n > 1), `top_p`, `top_k` (0 or -1 = off), `seed` (sample i of n gets seed + i:
  `v1/engine/parallel_sampling.py`), `stop`, `stop_token_ids`, `ignore_eos`, `logprobs` (0 = the
  sampled token's only), `prompt_logprobs`, `include_stop_str_in_output`.
- `vllm/outputs.py`, `vllm/logprobs.py`, `v1/engine/detokenizer.py`: `CompletionOutput.token_ids`
  keep a stop token; `.logprobs` is `list[dict[int, Logprob]]` (or `FlatLogprobs`, indexed the
  same way), one entry per token, trimmed with the tokens after a stop string;
  `.finish_reason` is "stop" | "length" | "abort" | "error" | "repetition";
  `RequestOutput.prompt_logprobs` is None for the first token, then one dict per token.
- `vllm/config/model.py`: `logprobs_mode` "raw_logprobs" (the default) reports the model's own
  logprobs, before temperature/top-k/top-p: the temperature-1 policy that the trainer computes.
- `vllm/inputs/llm.py`: `TokensPrompt(prompt_token_ids=[...])`.
- `vllm/config/cache.py`, `v1/worker/utils.py` (`request_memory`): `gpu_memory_utilization` is the
  fraction of the whole GPU this one engine reserves, checked against the memory free when it
  starts: two engines on one GPU need fractions that add up to less than 1.
- `vllm/config/model.py` (`_get_and_verify_max_len`): a `max_model_len` above the model's own
  (`max_position_embeddings`, capped by the tokenizer's `model_max_length`) is a ValueError at
  start; (`_get_and_verify_dtype`, `_resolve_auto_dtype`): `dtype="auto"` serves an fp32
  checkpoint as bf16 (or fp16), so the engine names the checkpoint's own dtype instead.
- `vllm/config/vllm.py`: `set_current_vllm_config(vllm_config)`, which the worker enters around
  its own `load_model` and `reload_weights`; custom ops and weight loaders read it.
- `vllm/entrypoints/llm.py`, `v1/engine/llm_engine.py`, `v1/engine/core_client.py`: `LLM` has no
  shutdown of its own; `llm.llm_engine.engine_core.shutdown()` stops the engine-core process
  (multiprocess mode, the default) or the in-process executor, and is idempotent.
- `v1/attention/ops/triton_unified_attention.py`: `tl.dot` with the default input precision,
  which Triton takes from `TRITON_F32_DEFAULT` (TF32 on NVIDIA unless it says "ieee");
  `distributed/kv_transfer/kv_connector/utils.py`: `get_current_attn_backends(vllm_config)`.

Weight swaps (`load_chain`): the worker extension below is mixed into every vLLM worker, and
`collective_rpc` asks each worker to stream a folder's safetensors into `model.load_weights`,
which copies into the live parameters (CUDA graphs keep pointing at them); then the prefix cache,
computed with the old weights, is dropped. 0.33.0 also has `Worker.reload_weights(
weights_iterator=...)` (`model_executor/model_loader/reload/inplace.py`): it wraps the same
`load_weights` with layer-wise re-processing for quantized layers, but a layer that receives only
some of its tensors is re-materialized from uninitialized memory, so it cannot take a delta's
changed tensors alone. This engine therefore refuses quantized models and calls `load_weights`.

A delta folder is decoded on the host, as the torch engine does: the engine keeps a CPU copy of
the weights it serves (Hugging Face names; one model's worth of host memory), applies the chain
onto it with `gpu_workers.deltas` (which verifies every file and the resulting weights' digest),
and only then writes the changed tensors to a staging folder (in /dev/shm when there is one) for
the workers to stream. Every name and shape is checked before the first tensor moves.

Precision: the engine serves the checkpoint's own dtype unless told otherwise (an fp32 policy
served as bf16 gives logprobs ~1e-2 off the trainer's, noise in every importance ratio); the
workers cast each streamed tensor to the served dtype before `load_weights`. Serving fp32, it
sets `TRITON_F32_DEFAULT=ieee` before vLLM starts, so Triton attention does not round to TF32.

Lifetime: `close()` shuts the engine core down and frees the GPU memory it reserved; the sampler
worker calls it when it stops hosting a sampler. The engine also works as a context manager.
"""

from __future__ import annotations

import gc
import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Protocol

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from gpu_workers.deltas import apply_chain
from gpu_workers.engine.chain import open_chain
from gpu_workers.engine.model_io import WEIGHTS_NAME, weight_files
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

PINNED_VLLM_VERSION = "0.33.0"  # the version this module was checked against (pyproject `gpu`)
WORKER_EXTENSION = "gpu_workers.engine.vllm_sampler.WeightReloadExtension"
LOAD_FOLDER_RPC = "loopstream_load_folder"  # the extension's methods, called by collective_rpc
ATTENTION_BACKENDS_RPC = "loopstream_attention_backends"
# "checkpoint": the dtype the checkpoint's weights are stored in (what the trainer computes in);
# "auto": vLLM's choice (an fp32 checkpoint as bf16); or one dtype by name.
VllmDtype = Literal["checkpoint", "auto", "float32", "bfloat16", "float16"]
SERVED_DTYPES = ("float32", "bfloat16", "float16")  # the dtypes vLLM serves (config/model.py)
_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
# Triton's default precision for fp32 `tl.dot` (its attention kernels): "tf32" unless told.
TRITON_F32_ENV = "TRITON_F32_DEFAULT"
VLLM_MAX_TEMPERATURE = 2.0  # vllm.SamplingParams refuses temperature > 2
_SEED_MODULUS = 1 << 62  # seeds fold into [0, 2**62): vLLM adds the sample index to the seed
_UNKNOWN = WeightsVersion("unknown", "")  # after a failed push: no delta can apply onto it
log = logging.getLogger(__name__)


class VllmNotInstalledError(RuntimeError):
    pass


class WeightPushError(RuntimeError):
    """vLLM failed while taking new weights: the served weights are undefined until a base loads."""


class EngineClosedError(RuntimeError):
    """The engine was closed: its vLLM engine is shut down and its GPU memory given back."""


def _import_vllm() -> Any:
    try:
        import vllm
    except ImportError as exc:
        raise VllmNotInstalledError(
            "the vLLM sampler needs vllm, which is not installed: install the GPU extra "
            "(`uv pip install -e '.[gpu]'`, vllm==" + PINNED_VLLM_VERSION + ") on a CUDA host, "
            "or use gpu_workers.engine.sampler.SamplerEngine (torch) instead"
        ) from exc
    try:
        installed = importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:  # a source tree on sys.path
        installed = getattr(vllm, "__version__", "unknown")
    if installed != PINNED_VLLM_VERSION:
        log.warning(
            "vllm %s is installed; the vLLM sampler was checked against %s only",
            installed,
            PINNED_VLLM_VERSION,
        )
    return vllm


# ---------------------------------------------------------------------------------- workers


class SupportsLoadWeights(Protocol):
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> object: ...


def iter_folder_tensors(
    folder: str | os.PathLike[str], shard_names: Sequence[str]
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, CPU tensor) for each tensor of the shards, one tensor in host memory at a time."""
    for shard in shard_names:
        with safe_open(os.path.join(folder, shard), framework="pt", device="cpu") as fh:
            for name in fh.keys():  # noqa: SIM118 (safe_open is not a dict)
                yield name, fh.get_tensor(name)


def feed_folder(
    model: SupportsLoadWeights,
    folder: str | os.PathLike[str],
    shard_names: Sequence[str],
    *,
    dtype: torch.dtype | None = None,
) -> int:
    """Stream every tensor of the folder's shards through one `model.load_weights` call, each
    floating-point tensor cast to `dtype` (the served one) first; returns how many tensors the
    model consumed."""
    consumed = 0

    def counted() -> Iterator[tuple[str, torch.Tensor]]:
        nonlocal consumed
        for name, tensor in iter_folder_tensors(folder, shard_names):
            consumed += 1
            if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
                tensor = tensor.to(dtype)
            yield name, tensor

    with torch.no_grad():
        model.load_weights(counted())
    return consumed


class WeightReloadExtension:
    """Mixed into each vLLM worker class (`LLM(worker_extension_cls=WORKER_EXTENSION)`): `self`
    is the worker (it has `vllm_config` and `model_runner`). Its method names must not clash with
    any attribute of vLLM's worker: they all start with `loopstream_`."""

    def loopstream_load_folder(self, folder: str, shard_names: list[str]) -> int:
        from vllm.config import set_current_vllm_config

        vllm_config = self.vllm_config  # type: ignore[attr-defined]
        model = self.model_runner.get_model()  # type: ignore[attr-defined]
        # As vLLM's own load_model and reload_weights: weight loaders and custom ops may read
        # the current config.
        with set_current_vllm_config(vllm_config):
            consumed = feed_folder(model, folder, shard_names, dtype=vllm_config.model_config.dtype)
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the copies are done when the RPC returns
        return consumed

    def loopstream_attention_backends(self) -> list[str]:
        """The attention backends this worker's layers run (logged at start: fp32 parity
        depends on it)."""
        from vllm.distributed.kv_transfer.kv_connector.utils import get_current_attn_backends

        backends = get_current_attn_backends(self.vllm_config)  # type: ignore[attr-defined]
        return sorted({backend.get_name() for backend in backends})


# ---------------------------------------------------------------------------------- helpers


def vllm_sampling_kwargs(params: SamplingParams, *, n: int) -> dict[str, Any]:
    """Keyword arguments of `vllm.SamplingParams` for our params, n samples per prompt."""
    return {
        "n": n,
        "max_tokens": params.max_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k,  # -1 = off in both
        "seed": None if params.seed is None else params.seed % _SEED_MODULUS,
        "stop": params.stop_strings or None,
        "stop_token_ids": params.stop_token_ids or None,
        "ignore_eos": not params.stop_at_eos,
        # 0 = the sampled token's logprob only; k = also the k most likely tokens at each step
        "logprobs": params.topk_logprobs,
        # The text leaves a matched stop string out, as the torch engine's does; token ids keep
        # the token that completed it.
        "include_stop_str_in_output": False,
    }


def sampled_logprobs(
    token_ids: Sequence[int], steps: Sequence[Mapping[int, Any] | None] | None
) -> list[float]:
    """The logprob of each generated token, from vLLM's per-token {token_id: Logprob} entries."""
    if steps is None or len(steps) != len(token_ids):
        got = "none" if steps is None else str(len(steps))
        raise RuntimeError(f"vLLM returned {got} logprob entries for {len(token_ids)} tokens")
    out = []
    for t, (step, token) in enumerate(zip(steps, token_ids, strict=True)):
        if step is None or token not in step:
            raise RuntimeError(f"vLLM returned no logprob for generated token {t} ({token})")
        out.append(float(step[token].logprob))
    return out


def prompt_token_logprobs(
    tokens: Sequence[int], steps: Sequence[Mapping[int, Any] | None] | None
) -> list[float | None]:
    """logp(tokens[t] | tokens[:t]) from vLLM's prompt_logprobs; None for the first token."""
    if steps is None or len(steps) != len(tokens):
        got = "none" if steps is None else str(len(steps))
        raise RuntimeError(f"vLLM returned {got} prompt logprob entries for {len(tokens)} tokens")
    out: list[float | None] = [None]
    for t in range(1, len(tokens)):
        step = steps[t]
        if step is None or tokens[t] not in step:
            raise RuntimeError(f"vLLM returned no logprob for prompt token {t} ({tokens[t]})")
        out.append(float(step[tokens[t]].logprob))
    return out


def topk_of(step: Mapping[int, Any] | None, k: int) -> TopK | None:
    """The k most likely (token id, logprob) of one vLLM {token_id: Logprob} entry, which also
    holds the sampled (or prompt) token whether it ranks in the top k or not."""
    if step is None:
        return None
    ranked = sorted(((int(t), float(lp.logprob)) for t, lp in step.items()), key=lambda e: -e[1])
    return ranked[:k]


def stop_reason_of(finish_reason: str | None) -> StopReason:
    if finish_reason in ("stop", "length"):
        return finish_reason  # type: ignore[return-value]
    raise RuntimeError(f"vLLM request did not complete: finish_reason={finish_reason!r}")


def check_layout(
    new: Mapping[str, torch.Tensor], current: Mapping[str, torch.Tensor], *, partial: bool
) -> None:
    """Refuse weights whose names or shapes do not fit the model (as the torch engine does)."""
    missing = set() if partial else set(current) - set(new)
    unexpected = set(new) - set(current)
    if missing or unexpected:
        raise InvalidInputError(
            "weights",
            f"checkpoint does not fit the model: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}",
        )
    for name, tensor in new.items():
        if tensor.shape != current[name].shape:
            raise InvalidInputError(
                "weights",
                f"{name}: shape {tuple(tensor.shape)} != {tuple(current[name].shape)}",
            )


def checkpoint_dtype(model_dir: Path, shard_names: Sequence[str]) -> str:
    """The dtype the checkpoint is stored in: config.json's `dtype` (`torch_dtype` before
    transformers 5), else the one floating dtype of its safetensors."""
    config = _read_json(model_dir / "config.json")
    named = config.get("dtype") or config.get("torch_dtype")
    if isinstance(named, str):
        named = named.removeprefix("torch.")
        if named not in SERVED_DTYPES:
            raise InvalidInputError(
                "dtype", f"the checkpoint is {named}, which vLLM does not serve: name one of "
                f"{', '.join(SERVED_DTYPES)}"
            )  # fmt: skip
        return named
    found = set()
    for shard in shard_names:
        with safe_open(str(model_dir / shard), framework="pt", device="cpu") as fh:
            for name in fh.keys():  # noqa: SIM118 (safe_open is not a dict)
                stored = fh.get_slice(name).get_dtype()
                if stored in _SAFETENSORS_DTYPES:
                    found.add(_SAFETENSORS_DTYPES[stored])
    if len(found) != 1:
        raise InvalidInputError(
            "dtype", f"config.json names no dtype and the weights hold {sorted(found) or 'none'}: "
            f"name one of {', '.join(SERVED_DTYPES)}"
        )  # fmt: skip
    return found.pop()


def served_dtype(requested: str, model_dir: Path, shard_names: Sequence[str]) -> str:
    """What to pass as vLLM's `dtype`: the checkpoint's own for "checkpoint"."""
    if requested == "checkpoint":
        return checkpoint_dtype(model_dir, shard_names)
    if requested != "auto" and requested not in SERVED_DTYPES:
        raise InvalidInputError(
            "dtype", f"{requested!r}: one of checkpoint, auto, {', '.join(SERVED_DTYPES)}"
        )
    return requested


def model_max_len(model_dir: Path) -> int | None:
    """The longest sequence the model takes, as vLLM derives it for a plain Llama-like config:
    config.json's `max_position_embeddings`, capped by the tokenizer's `model_max_length`. None
    when the config does not say (vLLM then decides by itself)."""
    limit = _read_json(model_dir / "config.json").get("max_position_embeddings")
    if not isinstance(limit, int) or limit <= 0:
        return None
    tokenizer_limit = _read_json(model_dir / "tokenizer_config.json").get("model_max_length")
    if isinstance(tokenizer_limit, int) and 0 < tokenizer_limit < limit:
        limit = tokenizer_limit
    return limit


def fit_max_seq_len(requested: int | None, model_limit: int | None) -> int | None:
    """The run's max_seq_len, clamped to the model's own limit as the torch engine does (vLLM
    refuses to start above it), with a log line saying so."""
    if requested is None or model_limit is None or requested <= model_limit:
        return requested
    log.warning(
        "max_seq_len %d is above the model's limit %d (max_position_embeddings): the vLLM "
        "engine serves %d tokens at most; longer requests are refused",
        requested, model_limit, model_limit,
    )  # fmt: skip
    return model_limit


def pin_fp32_precision(dtype: str) -> None:
    """Serving fp32, make Triton's fp32 matmuls (its attention kernels) full precision: Triton
    rounds them to TF32 by default, ~1e-3 off the torch engine. Set before vLLM starts: the
    engine-core process inherits the environment."""
    if dtype != "float32":
        return
    current = os.environ.setdefault(TRITON_F32_ENV, "ieee")
    if current != "ieee":
        log.warning(
            "%s=%s is set: vLLM's Triton attention will not compute in full fp32, and its "
            "logprobs will drift from the trainer's",
            TRITON_F32_ENV, current,
        )  # fmt: skip


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    return data if isinstance(data, dict) else {}


def read_state(folder: Path, shard_names: Sequence[str]) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for shard in shard_names:
        state.update(load_file(str(folder / shard), device="cpu"))
    return state


# ---------------------------------------------------------------------------------- engine


class VllmSamplerEngine:
    def __init__(
        self,
        model_dir: str | os.PathLike[str],
        *,
        # The fraction of the whole GPU this engine reserves (weights + KV cache). No default:
        # whoever starts engines knows how many share the GPU (vLLM refuses one that does not
        # fit in the memory free at its start).
        gpu_memory_utilization: float,
        max_seq_len: int | None = None,  # clamped to the model's own limit (logged)
        seed: int = 0,
        checkpoint_id: str = "base",
        dtype: VllmDtype | str = "checkpoint",  # the checkpoint's own, as the trainer computes
        tensor_parallel_size: int = 1,
        enable_prefix_caching: bool = True,
        enforce_eager: bool = False,
    ) -> None:
        if not 0 < gpu_memory_utilization <= 1:
            raise InvalidInputError(
                "gpu_memory_utilization", f"a fraction in (0, 1], got {gpu_memory_utilization}"
            )
        vllm = _import_vllm()
        from transformers import AutoTokenizer

        model_dir = Path(model_dir)
        manifest = _verified_or_built_manifest(model_dir)
        shards = weight_files([f.path for f in manifest.files])
        if not shards:
            raise InvalidInputError("model_dir", f"{model_dir} holds no model*.safetensors weights")
        self.dtype = served_dtype(dtype, model_dir, shards)
        max_model_len = fit_max_seq_len(max_seq_len, model_max_len(model_dir))
        pin_fp32_precision(self.dtype)
        self._vllm = vllm
        # One request or weight swap at a time: a swap never lands in the middle of a sample.
        self._lock = threading.Lock()
        self._host_state: dict[str, torch.Tensor] = {}
        self.llm: Any = vllm.LLM(
            model=str(model_dir),
            tokenizer=str(model_dir),
            dtype=self.dtype,
            seed=seed,
            max_model_len=max_model_len,
            gpu_memory_utilization=gpu_memory_utilization,
            tensor_parallel_size=tensor_parallel_size,
            enable_prefix_caching=enable_prefix_caching,
            enforce_eager=enforce_eager,
            worker_extension_cls=WORKER_EXTENSION,
            # The model's own logprobs (before temperature/top_p), as the trainer computes them.
            # It is vLLM's default; saying it guards against a changed default.
            logprobs_mode="raw_logprobs",
        )
        try:
            model_config = self.llm.llm_engine.model_config
            if model_config.quantization is not None:
                raise InvalidInputError(
                    "model_dir",
                    f"quantized models ({model_config.quantization}) are not supported: the "
                    "weight swap feeds checkpoint tensors straight to load_weights",
                )
            self.attention_backends = self._attention_backends()
        except BaseException:
            try:
                self.close()  # its share of the GPU must not stay reserved
            except Exception:
                log.exception("shutting down a vLLM engine that failed to start failed too")
            raise
        log.info(
            "vLLM engine started",
            extra={"model_dir": str(model_dir), "dtype": self.dtype,
                   "attention_backends": self.attention_backends,
                   "gpu_memory_utilization": gpu_memory_utilization,
                   "max_model_len": int(model_config.max_model_len),
                   TRITON_F32_ENV: os.environ.get(TRITON_F32_ENV)},
        )  # fmt: skip
        # The same tokenizer as the torch engine's, so the worker encodes prompts identically.
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.max_seq_len = int(model_config.max_model_len)
        self.vocab_size = int(model_config.get_vocab_size())
        self._world_size = tensor_parallel_size
        # The weights being served, on the host, in checkpoint names: deltas apply onto these.
        self._host_state = read_state(model_dir, shards)
        self._version = WeightsVersion(checkpoint_id, manifest.digest)

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        """Shut the vLLM engine down and give its GPU memory back; later calls raise
        `EngineClosedError`. Closing twice does nothing.

        vLLM 0.33 has no `LLM.shutdown`: the engine-core client's `shutdown` stops the
        engine-core process (multiprocess mode, the default) or the in-process executor. Then
        the last reference to the `LLM` goes, and the CUDA caching allocator is emptied (what
        an in-process engine held)."""
        with self._lock:
            llm, self.llm = self.llm, None
            self._host_state = {}
        if llm is None:
            return
        try:
            llm.llm_engine.engine_core.shutdown()
        finally:
            del llm
            gc.collect()
            if torch.cuda.is_initialized():
                torch.cuda.empty_cache()
        log.info("vLLM engine closed")

    @property
    def closed(self) -> bool:
        return self.llm is None

    def __enter__(self) -> VllmSamplerEngine:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def weights_version(self) -> WeightsVersion:
        return self._version

    # ------------------------------------------------------------------ sampling

    def sample(
        self, prompt_tokens: Sequence[int], num_samples: int, params: SamplingParams
    ) -> list[SampledSequence]:
        from vllm.inputs import TokensPrompt

        prompt = self._check_request(prompt_tokens, num_samples, params)
        if params.temperature == 0:
            # vLLM refuses n > 1 when greedy: n copies of the prompt, one sample each.
            prompts = [TokensPrompt(prompt_token_ids=list(prompt)) for _ in range(num_samples)]
            n = 1
        else:
            prompts, n = [TokensPrompt(prompt_token_ids=prompt)], num_samples
        vllm_params = self._vllm.SamplingParams(**vllm_sampling_kwargs(params, n=n))
        with self._lock:
            version = self._version
            requests = self._live().generate(prompts, vllm_params, use_tqdm=False)
        k = params.topk_logprobs
        return [
            SampledSequence(
                tokens=list(c.token_ids),
                text=c.text,
                logprobs=sampled_logprobs(c.token_ids, c.logprobs),
                stop_reason=stop_reason_of(c.finish_reason),
                weights_version=version,
                topk_logprobs=[topk_of(step, k) or [] for step in c.logprobs] if k else None,
                prompt_cache_hit_tokens=int(getattr(request, "num_cached_tokens", 0) or 0),
            )
            for request in requests
            for c in request.outputs
        ]

    def compute_logprobs(self, tokens: Sequence[int]) -> list[float | None]:
        from vllm.inputs import TokensPrompt

        tokens = [int(t) for t in tokens]
        if not tokens:
            raise InvalidInputError("tokens", "must hold at least one token")
        if len(tokens) >= self.max_seq_len:  # vLLM generates one token after the prompt
            raise InvalidInputError(
                "tokens", f"{len(tokens)} tokens + 1 exceed max_seq_len {self.max_seq_len}"
            )
        check_token_range(tokens, "tokens", self.vocab_size)
        # prompt_logprobs=0: each prompt token's own logprob; max_tokens=1 is the least vLLM
        # generates. vLLM skips the prefix cache for prompt-logprob requests by itself.
        params = self._vllm.SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
        with self._lock:
            (request,) = self._live().generate(
                [TokensPrompt(prompt_token_ids=tokens)], params, use_tqdm=False
            )
        return prompt_token_logprobs(tokens, request.prompt_logprobs)

    def score_prompt(
        self, tokens: Sequence[int], scoring: PromptScoring | None = None
    ) -> PromptScores:
        from vllm.inputs import TokensPrompt

        tokens = [int(t) for t in tokens]
        if len(tokens) >= self.max_seq_len:
            raise InvalidInputError(
                "tokens", f"{len(tokens)} tokens + 1 exceed max_seq_len {self.max_seq_len}"
            )
        check_prompt_scoring(tokens, scoring, self.vocab_size)
        scoring = scoring or PromptScoring()
        # vLLM's prompt_logprobs answer the top k and the prompt token at each position, not
        # arbitrary ids nor draws: those two need the torch engine.
        if scoring.target_ids is not None:
            raise InvalidInputError("target_prompt_logprobs", "not served by the vLLM engine")
        if scoring.alt_k:
            raise InvalidInputError("prompt_alt_tokens_k", "not served by the vLLM engine")
        params = self._vllm.SamplingParams(
            max_tokens=1, prompt_logprobs=scoring.top_k, temperature=0.0
        )
        with self._lock:
            (request,) = self._live().generate(
                [TokensPrompt(prompt_token_ids=tokens)], params, use_tqdm=False
            )
        steps = request.prompt_logprobs
        topk = [topk_of(step, scoring.top_k) for step in steps] if scoring.top_k else None
        return PromptScores(logprobs=prompt_token_logprobs(tokens, steps), topk=topk)

    # ------------------------------------------------------------------ weight sync

    def load_weights(self, folder: str | os.PathLike[str], *, checkpoint_id: str) -> WeightsVersion:
        """Swap in a checkpoint folder's weights in place, after verifying every file. A base
        replaces every weight; a delta applies onto the weights served now (its parent)."""
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
        onto the weights served now. Every file's sha256, every parent link, the digest of the
        resulting weights, and every name and shape are checked before a single weight moves.
        The prefix cache is reset unless `keep_prompt_cache` (the caller then resets it)."""
        self._live()
        chain = open_chain(folders, verified=verified)
        if chain.base is not None:
            start = read_state(chain.base, chain.base_shards)
            check_layout(start, self._host_state, partial=False)
            parent = chain.base_digest
        else:
            start, parent = self._host_state, self._version.digest
        state = apply_chain(start, chain.deltas, parent_digest=parent, verified=True)
        # apply_chain hands back the tensors no delta changed as the same objects.
        changed = {k for k, v in state.items() if v is not start[k]}
        with self._lock:
            try:
                if chain.base is not None:
                    self._push_folder(chain.base, list(chain.base_shards))
                if changed:
                    self._push_tensors({k: state[k] for k in sorted(changed)})
                if not keep_prompt_cache:
                    self.reset_prompt_cache()
            except Exception as exc:
                self._version = _UNKNOWN
                raise WeightPushError(
                    f"vLLM failed while taking {checkpoint_id}: the weights it serves are "
                    "undefined until a base checkpoint loads"
                ) from exc
            self._host_state = state
            self._version = WeightsVersion(checkpoint_id, chain.digest)
        return self._version

    def reset_prompt_cache(self) -> int | None:
        """Drop cached prompt prefixes (KV computed with the weights served before). vLLM does
        not say how many there were: None."""
        if not self._live().reset_prefix_cache():
            raise RuntimeError("vLLM did not reset its prefix cache (requests still running?)")
        return None

    # ------------------------------------------------------------------ internals

    def _live(self) -> Any:
        llm = self.llm
        if llm is None:
            raise EngineClosedError("the vLLM engine was closed: start a new one")
        return llm

    def _attention_backends(self) -> list[str]:
        """Logged at start: with fp32 weights, parity with the torch engine depends on the
        backend (Triton attention needs TRITON_F32_DEFAULT=ieee, set before the start)."""
        try:
            per_worker = self._live().collective_rpc(ATTENTION_BACKENDS_RPC)
        except Exception as exc:  # only a log line depends on it
            return [f"unknown ({type(exc).__name__}: {exc})"]
        return sorted({name for names in per_worker for name in names})

    def _push_folder(self, folder: Path, shard_names: list[str]) -> None:
        expected = 0
        for shard in shard_names:
            with safe_open(str(folder / shard), framework="pt", device="cpu") as fh:
                expected += len(list(fh.keys()))
        counts = self._live().collective_rpc(LOAD_FOLDER_RPC, args=(str(folder), shard_names))
        if len(counts) != self._world_size or any(c != expected for c in counts):
            raise RuntimeError(f"workers loaded {counts} tensors, expected {expected} each")

    def _push_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        # The workers run in other processes: the tensors travel as a safetensors file, in RAM
        # when /dev/shm exists (collective_rpc is meant for control messages, not bulk data).
        shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
        staging = Path(tempfile.mkdtemp(prefix="loopstream-vllm-", dir=shm))
        try:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(staging / WEIGHTS_NAME))
            self._push_folder(staging, [WEIGHTS_NAME])
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _check_request(
        self, prompt_tokens: Sequence[int], num_samples: int, params: SamplingParams
    ) -> list[int]:
        if params.temperature > VLLM_MAX_TEMPERATURE:
            raise InvalidInputError(
                "temperature", f"vLLM samples at temperature <= 2, got {params.temperature}"
            )
        return check_sample_request(
            prompt_tokens, num_samples, params, vocab_size=self.vocab_size,
            max_seq_len=self.max_seq_len,
        )  # fmt: skip


def _verified_or_built_manifest(model_dir: Path) -> Manifest:
    # As the torch engine: a folder loopstream wrote is verified against its manifest; a foreign
    # model folder has none, and its digest is computed from its bytes.
    if (model_dir / MANIFEST_NAME).is_file():
        return verify_folder(model_dir, allow_extra=True)
    return build_manifest(model_dir, kind="base_model")
