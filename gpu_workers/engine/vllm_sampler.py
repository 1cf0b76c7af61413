"""`SamplerEngineProtocol` on vLLM, for GPU hosts (install the `gpu` extra: `pip install .[gpu]`).

vLLM is imported lazily: this module imports fine without it, and constructing the engine without
it fails with a message that says what to install. Written against vLLM's documented offline API
(`vllm.LLM`, `vllm.SamplingParams`, `vllm.inputs.TokensPrompt`, `LLM.collective_rpc` with a
`worker_extension_cls`, `LLM.reset_prefix_cache`); it is not exercised by the CPU test suite.

Weight swaps follow vLLM's RLHF examples: a worker extension class is mixed into every vLLM
worker, and `collective_rpc` asks each worker to read the checkpoint's safetensors and feed them
to `model.load_weights`, which handles vLLM's fused/sharded parameter layout.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gpu_workers.engine.model_io import weight_files
from gpu_workers.engine.types import (
    InvalidInputError,
    SampledSequence,
    SamplingParams,
    WeightsVersion,
)
from gpu_workers.manifest import MANIFEST_NAME, build_manifest, verify_folder

WORKER_EXTENSION = "gpu_workers.engine.vllm_sampler.WeightReloadExtension"


class VllmNotInstalledError(RuntimeError):
    pass


def _import_vllm() -> Any:
    try:
        import vllm
    except ImportError as exc:
        raise VllmNotInstalledError(
            "the vLLM sampler needs vllm, which is not installed: install the GPU extra "
            "(`uv pip install -e '.[gpu]'`) on a CUDA host, or use "
            "gpu_workers.engine.sampler.SamplerEngine (torch) instead"
        ) from exc
    return vllm


class WeightReloadExtension:
    """Mixed into each vLLM worker (via `worker_extension_cls`); `self` is the worker."""

    def reload_weights_from_folder(self, folder: str, shard_names: list[str]) -> int:
        from safetensors.torch import safe_open

        model = self.model_runner.model  # type: ignore[attr-defined]
        loaded = 0
        for name in shard_names:
            # Stream tensor by tensor: the whole checkpoint never sits in host memory at once.
            with safe_open(os.path.join(folder, name), framework="pt", device="cpu") as fh:
                for key in fh.keys():  # noqa: SIM118 (safe_open is not a dict)
                    model.load_weights(weights=[(key, fh.get_tensor(key))])
                    loaded += 1
        return loaded


class VllmSamplerEngine:
    def __init__(
        self,
        model_dir: str | os.PathLike[str],
        *,
        max_seq_len: int | None = None,
        seed: int = 0,
        checkpoint_id: str = "base",
        gpu_memory_utilization: float = 0.85,
        tensor_parallel_size: int = 1,
        enable_prefix_caching: bool = True,
    ) -> None:
        vllm = _import_vllm()
        model_dir = Path(model_dir)
        manifest = (
            verify_folder(model_dir, allow_extra=True)
            if (model_dir / MANIFEST_NAME).is_file()
            else build_manifest(model_dir, kind="base_model")
        )
        self._vllm = vllm
        self.llm = vllm.LLM(
            model=str(model_dir),
            tokenizer=str(model_dir),
            dtype="auto",
            seed=seed,
            max_model_len=max_seq_len,
            gpu_memory_utilization=gpu_memory_utilization,
            tensor_parallel_size=tensor_parallel_size,
            enable_prefix_caching=enable_prefix_caching,
            worker_extension_cls=WORKER_EXTENSION,
            # The logprobs returned are the model's own (before temperature/top_p), to match the
            # trainer's compute_logprobs. This is vLLM's default; saying it guards against a
            # changed default.
            logprobs_mode="raw_logprobs",
        )
        self.tokenizer = self.llm.get_tokenizer()
        self.max_seq_len = int(self.llm.llm_engine.model_config.max_model_len)
        self._version = WeightsVersion(checkpoint_id, manifest.digest)

    @property
    def weights_version(self) -> WeightsVersion:
        return self._version

    def sample(
        self, prompt_tokens: Sequence[int], num_samples: int, params: SamplingParams
    ) -> list[SampledSequence]:
        from vllm.inputs import TokensPrompt

        prompt = [int(t) for t in prompt_tokens]
        if not prompt:
            raise InvalidInputError("prompt_tokens", "must be a non-empty list of token ids")
        if num_samples < 1:
            raise InvalidInputError("num_samples", f"must be >= 1, got {num_samples}")
        if len(prompt) + params.max_tokens > self.max_seq_len:
            raise InvalidInputError(
                "max_tokens",
                f"prompt of {len(prompt)} tokens + max_tokens {params.max_tokens} exceeds "
                f"max_seq_len {self.max_seq_len}",
            )
        version = self._version
        vllm_params = self._vllm.SamplingParams(
            n=num_samples,
            max_tokens=params.max_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,
            seed=params.seed,
            stop=params.stop_strings or None,
            stop_token_ids=params.stop_token_ids or None,
            ignore_eos=not params.stop_at_eos,
            logprobs=0,  # 0 = only the sampled token's logprob
            # Token ids keep the stop token; the text leaves a matched stop string out, as the
            # torch engine does.
            include_stop_str_in_output=False,
        )
        (request,) = self.llm.generate(
            [TokensPrompt(prompt_token_ids=prompt)], vllm_params, use_tqdm=False
        )
        results = []
        for completion in request.outputs:
            token_ids = list(completion.token_ids)
            logprobs = [
                float(step[token].logprob)
                for step, token in zip(completion.logprobs or [], token_ids, strict=True)
            ]
            results.append(
                SampledSequence(
                    tokens=token_ids,
                    text=completion.text,
                    logprobs=logprobs,
                    stop_reason="stop" if completion.finish_reason == "stop" else "length",
                    weights_version=version,
                )
            )
        return results

    def compute_logprobs(self, tokens: Sequence[int]) -> list[float | None]:
        from vllm.inputs import TokensPrompt

        tokens = [int(t) for t in tokens]
        # prompt_logprobs=0: the logprob of each prompt token itself; max_tokens=1 is the least
        # vLLM will generate.
        params = self._vllm.SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
        (request,) = self.llm.generate(
            [TokensPrompt(prompt_token_ids=tokens)], params, use_tqdm=False
        )
        out: list[float | None] = []
        for step, token in zip(request.prompt_logprobs or [], tokens, strict=True):
            out.append(None if step is None else float(step[token].logprob))
        return out

    def load_weights(self, folder: str | os.PathLike[str], *, checkpoint_id: str) -> WeightsVersion:
        folder = Path(folder)
        manifest = verify_folder(folder)
        shards = weight_files([f.path for f in manifest.files])
        if not shards:
            raise InvalidInputError("checkpoint", f"{folder} holds no model*.safetensors weights")
        # LLM.generate is synchronous, so no request is in flight while the workers reload.
        self.llm.collective_rpc("reload_weights_from_folder", args=(str(folder), shards))
        # Cached prefixes were computed with the old weights.
        self.llm.reset_prefix_cache()
        self._version = WeightsVersion(checkpoint_id, manifest.digest)
        return self._version
