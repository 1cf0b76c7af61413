"""The vLLM sampler without vLLM: the install hint, the folder streaming its worker extension
does, the conversions of vLLM's outputs, and the weight-swap logic against a stand-in `vllm`
module (the real engine needs a GPU; docs/vllm.md says what was verified where)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from gpu_workers.engine import vllm_sampler
from gpu_workers.engine.model_io import full_state_dict
from gpu_workers.engine.trainer import TrainerEngine
from gpu_workers.engine.types import AdamParams, Datum, InvalidInputError, SamplingParams
from gpu_workers.engine.vllm_sampler import (
    ATTENTION_BACKENDS_RPC,
    LOAD_FOLDER_RPC,
    PINNED_VLLM_VERSION,
    TRITON_F32_ENV,
    WORKER_EXTENSION,
    EngineClosedError,
    VllmNotInstalledError,
    VllmSamplerEngine,
    WeightPushError,
    WeightReloadExtension,
    check_layout,
    checkpoint_dtype,
    feed_folder,
    prompt_token_logprobs,
    sampled_logprobs,
    stop_reason_of,
    vllm_sampling_kwargs,
)
from gpu_workers.manifest import ChecksumMismatchError, read_manifest
from gpu_workers.tiny_model import BOS_ID, ensure_tiny_model

torch.set_num_threads(1)


def lp(value: float) -> types.SimpleNamespace:
    """A stand-in for vllm.logprobs.Logprob."""
    return types.SimpleNamespace(logprob=value, rank=1, decoded_token=None)


class RecordingModel:
    """Stands in for a vLLM model: `load_weights` keeps what it is fed, by checkpoint name, and
    the vLLM config that was current while it ran."""

    def __init__(self, *, stop_after: int | None = None) -> None:
        self.weights: dict[str, torch.Tensor] = {}
        self.calls = 0
        self.stop_after = stop_after
        self.configs_seen: list[Any] = []

    def load_weights(self, weights: Any) -> set[str]:
        self.calls += 1
        self.configs_seen.append(CURRENT_VLLM_CONFIG[-1] if CURRENT_VLLM_CONFIG else None)
        for i, (name, tensor) in enumerate(weights):
            self.weights[name] = tensor.clone()
            if self.stop_after is not None and i + 1 >= self.stop_after:
                break
        return set(self.weights)


# What `vllm.config.set_current_vllm_config` of the stand-in module has entered, innermost last.
CURRENT_VLLM_CONFIG: list[Any] = []


@contextlib.contextmanager
def set_current_vllm_config(vllm_config: Any) -> Iterator[None]:
    CURRENT_VLLM_CONFIG.append(vllm_config)
    try:
        yield
    finally:
        CURRENT_VLLM_CONFIG.pop()


def vllm_config_of(dtype: torch.dtype) -> types.SimpleNamespace:
    return types.SimpleNamespace(model_config=types.SimpleNamespace(dtype=dtype))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


# ---------------------------------------------------------------------------------- import


def test_module_imports_without_vllm_and_pins_one_version() -> None:
    assert vllm_sampler.VllmSamplerEngine is VllmSamplerEngine
    assert WORKER_EXTENSION == "gpu_workers.engine.vllm_sampler.WeightReloadExtension"
    pyproject = (Path(__file__).parents[2] / "pyproject.toml").read_text()
    assert f'gpu = ["vllm=={PINNED_VLLM_VERSION}"]' in pyproject


def test_constructing_without_vllm_names_the_gpu_extra(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError

    with pytest.raises(VllmNotInstalledError, match=r"\.\[gpu\]") as err:
        VllmSamplerEngine(model_dir, gpu_memory_utilization=0.5)

    assert PINNED_VLLM_VERSION in str(err.value)
    assert "SamplerEngine" in str(err.value)  # and what to use instead


# ---------------------------------------------------------------------------------- workers


def write_shards(folder: Path) -> dict[str, torch.Tensor]:
    folder.mkdir(parents=True, exist_ok=True)
    first = {"model.embed_tokens.weight": torch.randn(6, 4), "model.norm.weight": torch.ones(4)}
    second = {"model.layers.0.mlp.up_proj.weight": torch.randn(8, 4)}
    save_file(first, str(folder / "model-00001-of-00002.safetensors"))
    save_file(second, str(folder / "model-00002-of-00002.safetensors"))
    return {**first, **second}


def test_feed_folder_streams_every_tensor_of_every_shard_in_one_call(tmp_path: Path) -> None:
    expected = write_shards(tmp_path)
    model = RecordingModel()

    fed = feed_folder(
        model, tmp_path, ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    )

    assert fed == 3
    assert model.calls == 1
    assert set(model.weights) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(model.weights[name], tensor)


def test_feed_folder_counts_only_what_the_model_consumed(tmp_path: Path) -> None:
    write_shards(tmp_path)

    fed = feed_folder(
        RecordingModel(stop_after=1),
        tmp_path,
        ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"],
    )

    assert fed == 1  # the engine compares this with the folder's tensor count


def test_worker_extension_loads_into_the_model_runners_model_under_the_vllm_config(
    tmp_path: Path, fake_vllm: types.ModuleType
) -> None:
    expected = write_shards(tmp_path)
    model = RecordingModel()
    config = vllm_config_of(torch.float32)

    class FakeWorker(WeightReloadExtension):  # what vLLM does: the worker class gains the mixin
        vllm_config = config
        model_runner = types.SimpleNamespace(get_model=lambda: model)

    fed = getattr(FakeWorker(), LOAD_FOLDER_RPC)(
        str(tmp_path), ["model-00002-of-00002.safetensors"]
    )

    assert fed == 1
    assert set(model.weights) == {"model.layers.0.mlp.up_proj.weight"}
    assert torch.equal(model.weights["model.layers.0.mlp.up_proj.weight"], expected[
        "model.layers.0.mlp.up_proj.weight"
    ])  # fmt: skip
    # As vLLM's own load_model: weight loaders and custom ops may read the current config.
    assert model.configs_seen == [config] and CURRENT_VLLM_CONFIG == []
    # vLLM refuses an extension whose attribute names clash with the worker's: all prefixed.
    names = [a for a in dir(WeightReloadExtension) if not a.startswith("__")]
    assert sorted(names) == sorted([LOAD_FOLDER_RPC, ATTENTION_BACKENDS_RPC])
    assert all(name.startswith("loopstream_") for name in names)


def test_worker_extension_casts_tensors_to_the_served_dtype_before_load_weights(
    tmp_path: Path, fake_vllm: types.ModuleType
) -> None:
    expected = write_shards(tmp_path)
    save_file(
        {"step": torch.tensor([3], dtype=torch.int64)}, str(tmp_path / "model-extra.safetensors")
    )
    model = RecordingModel()

    class FakeWorker(WeightReloadExtension):
        vllm_config = vllm_config_of(torch.bfloat16)  # an fp32 checkpoint served as bf16
        model_runner = types.SimpleNamespace(get_model=lambda: model)

    getattr(FakeWorker(), LOAD_FOLDER_RPC)(
        str(tmp_path), ["model-00001-of-00002.safetensors", "model-extra.safetensors"]
    )

    embed = model.weights["model.embed_tokens.weight"]
    assert embed.dtype == torch.bfloat16
    assert torch.equal(embed, expected["model.embed_tokens.weight"].to(torch.bfloat16))
    assert model.weights["step"].dtype == torch.int64  # only floating-point tensors are cast


# ---------------------------------------------------------------------------------- helpers


def test_sampling_params_map_onto_vllms_names() -> None:
    params = SamplingParams(max_tokens=7, temperature=0.7, top_p=0.9, top_k=5, seed=-3,
                            stop=["\n\n"], stop_at_eos=False)  # fmt: skip

    kwargs = vllm_sampling_kwargs(params, n=4)

    assert kwargs == {
        "n": 4,
        "max_tokens": 7,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 5,
        "seed": (-3) % (1 << 62),  # vLLM seeds must be >= 0 and leave room for + sample index
        "stop": ["\n\n"],
        "stop_token_ids": None,
        "ignore_eos": True,
        "logprobs": 0,
        "include_stop_str_in_output": False,
    }
    token_stops = vllm_sampling_kwargs(SamplingParams(stop=[3, 9]), n=1)
    assert (token_stops["stop"], token_stops["stop_token_ids"]) == (None, [3, 9])
    assert token_stops["seed"] is None and token_stops["ignore_eos"] is False


def test_sampled_logprobs_picks_each_generated_tokens_entry() -> None:
    # logprobs=0 gives the sampled token; vLLM may add top-k entries beside it.
    steps = [{5: lp(-0.5)}, {7: lp(-1.25), 2: lp(-0.1)}]

    assert sampled_logprobs([5, 7], steps) == [-0.5, -1.25]
    with pytest.raises(RuntimeError, match="1 logprob entries for 2 tokens"):
        sampled_logprobs([5, 7], steps[:1])
    with pytest.raises(RuntimeError, match="none"):
        sampled_logprobs([5], None)
    with pytest.raises(RuntimeError, match="generated token 1"):
        sampled_logprobs([5, 8], steps)


def test_prompt_logprobs_are_none_first_then_each_tokens_own() -> None:
    steps = [None, {65: lp(-2.0), 66: lp(-0.3)}, {66: lp(-4.5)}]

    assert prompt_token_logprobs([BOS_ID, 65, 66], steps) == [None, -2.0, -4.5]
    with pytest.raises(RuntimeError, match="prompt token 2"):
        prompt_token_logprobs([BOS_ID, 65, 67], steps)


def test_finish_reasons_map_to_stop_or_length_and_others_fail() -> None:
    assert stop_reason_of("stop") == "stop"
    assert stop_reason_of("length") == "length"
    for reason in ("abort", "error", None):
        with pytest.raises(RuntimeError, match="did not complete"):
            stop_reason_of(reason)


def test_layout_check_names_missing_unexpected_and_reshaped_tensors() -> None:
    current = {"a": torch.zeros(2, 3), "b": torch.zeros(4)}

    check_layout({"a": torch.ones(2, 3)}, current, partial=True)
    with pytest.raises(InvalidInputError, match=r"missing \['b'\]"):
        check_layout({"a": torch.ones(2, 3)}, current, partial=False)
    with pytest.raises(InvalidInputError, match=r"unexpected \['c'\]"):
        check_layout({**current, "c": torch.zeros(1)}, current, partial=False)
    with pytest.raises(InvalidInputError, match=r"a: shape \(3, 2\)"):
        check_layout({"a": torch.zeros(3, 2), "b": torch.zeros(4)}, current, partial=False)


# ---------------------------------------------------------------------------------- engine


class FakeLLM:
    """`vllm.LLM` reduced to what the engine calls; one worker that has the extension mixed in."""

    instances: list[FakeLLM] = []
    quantization: str | None = None  # what the next instance's model config says

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs
        self.environ = dict(os.environ)  # what the engine-core process would inherit
        self.model = RecordingModel()
        self.resets = 0
        self.shutdowns = 0
        self.generated: list[tuple[list[Any], Any]] = []
        self.fail_rpc = False
        self.llm_engine = types.SimpleNamespace(
            model_config=types.SimpleNamespace(
                quantization=FakeLLM.quantization, max_model_len=64, get_vocab_size=lambda: 260
            ),
            engine_core=types.SimpleNamespace(shutdown=self._shutdown),
        )
        model = self.model
        served = {"float32": torch.float32, "bfloat16": torch.bfloat16}[kwargs["dtype"]]

        class Worker(WeightReloadExtension):
            vllm_config = vllm_config_of(served)
            model_runner = types.SimpleNamespace(get_model=lambda: model)

        self.worker = Worker()
        FakeLLM.instances.append(self)

    def _shutdown(self, timeout: float | None = None) -> None:
        self.shutdowns += 1

    def collective_rpc(self, method: str, timeout: float | None = None, args: tuple = (),
                       kwargs: dict[str, Any] | None = None) -> list[Any]:  # fmt: skip
        if self.fail_rpc:
            raise RuntimeError("worker died")
        return [getattr(self.worker, method)(*args, **(kwargs or {}))]

    def reset_prefix_cache(self) -> bool:
        self.resets += 1
        return True

    def generate(self, prompts: list[Any], params: Any, *, use_tqdm: bool) -> list[Any]:
        self.generated.append((prompts, params))
        completion = types.SimpleNamespace(
            token_ids=[72, 105], text="Hi", logprobs=[{72: lp(-1.0)}, {105: lp(-2.0)}],
            finish_reason="length",
        )  # fmt: skip
        prompt_steps = [None, *({t: lp(-0.5)} for t in prompts[0]["prompt_token_ids"][1:])]
        return [
            types.SimpleNamespace(outputs=[completion] * params.n, prompt_logprobs=prompt_steps)
            for _ in prompts
        ]


@pytest.fixture
def fake_vllm(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    fake = types.ModuleType("vllm")
    fake.__version__ = PINNED_VLLM_VERSION  # type: ignore[attr-defined]
    fake.LLM = FakeLLM  # type: ignore[attr-defined]
    fake.SamplingParams = lambda **kw: types.SimpleNamespace(**{"n": 1, **kw})  # type: ignore[attr-defined]
    inputs = types.ModuleType("vllm.inputs")
    inputs.TokensPrompt = lambda *, prompt_token_ids: {"prompt_token_ids": prompt_token_ids}  # type: ignore[attr-defined]
    config = types.ModuleType("vllm.config")
    config.set_current_vllm_config = set_current_vllm_config  # type: ignore[attr-defined]
    kv_utils = types.ModuleType("vllm.distributed.kv_transfer.kv_connector.utils")
    triton_attn = types.SimpleNamespace(get_name=lambda: "TRITON_ATTN")
    kv_utils.get_current_attn_backends = lambda vllm_config: [triton_attn]  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setitem(sys.modules, "vllm.inputs", inputs)
    monkeypatch.setitem(sys.modules, "vllm.config", config)
    monkeypatch.setitem(sys.modules, kv_utils.__name__, kv_utils)
    # The engine sets it for fp32: start every test without it, and leave none behind.
    monkeypatch.delenv(TRITON_F32_ENV, raising=False)
    FakeLLM.instances.clear()
    FakeLLM.quantization = None
    return fake


def start(model_dir: Path, **kwargs: Any) -> VllmSamplerEngine:
    return VllmSamplerEngine(model_dir, **{"gpu_memory_utilization": 0.4, **kwargs})


@pytest.fixture(scope="module")
def chain(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A base and a delta saved by the trainer, with the full weights each one leads to."""
    tmp = tmp_path_factory.mktemp("chain")
    trainer = TrainerEngine(model_dir, max_seq_len=64)
    step = [Datum.from_tokens([BOS_ID, *b"zzzzzzzz"])]
    trainer.forward_backward(step, "cross_entropy")
    trainer.optim_step(AdamParams(learning_rate=1e-2))
    trainer.save_weights_for_sampler(tmp / "base")
    base_state = {k: v.clone() for k, v in full_state_dict(trainer.model).items()}
    trainer.forward_backward(step, "cross_entropy")
    trainer.optim_step(AdamParams(learning_rate=1e-2))
    trainer.save_weights_for_sampler(tmp / "delta", checkpoint_type="delta")
    delta_state = {k: v.clone() for k, v in full_state_dict(trainer.model).items()}
    return {"base": tmp / "base", "delta": tmp / "delta",
            "base_state": base_state, "delta_state": delta_state}  # fmt: skip


def served_equals(llm: FakeLLM, state: dict[str, torch.Tensor]) -> bool:
    return set(llm.model.weights) == set(state) and all(
        torch.equal(llm.model.weights[k], v) for k, v in state.items()
    )


def test_engine_starts_vllm_with_the_extension_and_raw_logprobs(
    fake_vllm: types.ModuleType, model_dir: Path
) -> None:
    engine = start(model_dir, seed=3)

    (llm,) = FakeLLM.instances
    assert llm.kwargs["worker_extension_cls"] == WORKER_EXTENSION
    assert llm.kwargs["logprobs_mode"] == "raw_logprobs"
    assert llm.kwargs["model"] == str(model_dir) and llm.kwargs["seed"] == 3
    assert engine.weights_version.digest == read_manifest(model_dir).digest
    assert (engine.max_seq_len, engine.vocab_size) == (64, 260)


def test_base_then_delta_serve_the_trainers_weights_bit_for_bit(
    fake_vllm: types.ModuleType, model_dir: Path, chain: dict[str, Any]
) -> None:
    engine = start(model_dir)
    (llm,) = FakeLLM.instances

    base_version = engine.load_weights(chain["base"], checkpoint_id="b")
    assert served_equals(llm, chain["base_state"])
    assert base_version.digest == read_manifest(chain["base"]).digest
    llm.model.weights.clear()

    delta_version = engine.load_chain([chain["delta"]], checkpoint_id="d")

    # Only the tensors the delta changed travel to the workers, and they are the trainer's.
    changed = {
        k for k, v in chain["delta_state"].items() if not torch.equal(v, chain["base_state"][k])
    }
    assert set(llm.model.weights) == changed
    assert all(torch.equal(llm.model.weights[k], chain["delta_state"][k]) for k in changed)
    assert delta_version.digest == read_manifest(chain["delta"]).digest
    assert delta_version.checkpoint_id == "d"
    assert llm.resets == 2  # the prefix cache is dropped after every swap


def test_base_plus_delta_chain_in_one_call(
    fake_vllm: types.ModuleType, model_dir: Path, chain: dict[str, Any]
) -> None:
    engine = start(model_dir)
    (llm,) = FakeLLM.instances

    version = engine.load_chain([chain["base"], chain["delta"]], checkpoint_id="bd")

    assert served_equals(llm, chain["delta_state"])
    assert version.digest == read_manifest(chain["delta"]).digest


def test_a_delta_onto_the_wrong_weights_is_refused_before_anything_moves(
    fake_vllm: types.ModuleType, model_dir: Path, chain: dict[str, Any]
) -> None:
    engine = start(model_dir)  # serving the base model, not the delta's parent
    (llm,) = FakeLLM.instances
    before = engine.weights_version

    with pytest.raises(ValueError, match="parent digest"):
        engine.load_chain([chain["delta"]], checkpoint_id="d")

    assert llm.model.weights == {} and llm.resets == 0
    assert engine.weights_version == before


def test_a_corrupted_base_is_refused_before_anything_moves(
    fake_vllm: types.ModuleType, model_dir: Path, chain: dict[str, Any], tmp_path: Path
) -> None:
    import shutil

    broken = tmp_path / "base"
    shutil.copytree(chain["base"], broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    engine = start(model_dir)
    (llm,) = FakeLLM.instances

    with pytest.raises(ChecksumMismatchError, match=r"model\.safetensors"):
        engine.load_weights(broken, checkpoint_id="x")

    assert llm.model.weights == {}


def test_a_failed_push_leaves_no_version_a_delta_could_apply_onto(
    fake_vllm: types.ModuleType, model_dir: Path, chain: dict[str, Any]
) -> None:
    engine = start(model_dir)
    (llm,) = FakeLLM.instances
    llm.fail_rpc = True

    with pytest.raises(WeightPushError, match="undefined until a base"):
        engine.load_weights(chain["base"], checkpoint_id="b")

    assert engine.weights_version.digest == ""
    llm.fail_rpc = False
    with pytest.raises(ValueError, match="parent digest"):
        engine.load_chain([chain["delta"]], checkpoint_id="d")
    engine.load_chain([chain["base"], chain["delta"]], checkpoint_id="bd")  # a base recovers
    assert served_equals(llm, chain["delta_state"])


def test_greedy_samples_go_as_n_prompts_since_vllm_refuses_n_above_1_when_greedy(
    fake_vllm: types.ModuleType, model_dir: Path
) -> None:
    engine = start(model_dir)
    (llm,) = FakeLLM.instances

    greedy = engine.sample([BOS_ID, 65], 3, SamplingParams(max_tokens=2, temperature=0.0))
    sampled = engine.sample([BOS_ID, 65], 3, SamplingParams(max_tokens=2, seed=1))

    (greedy_prompts, greedy_params), (sampled_prompts, sampled_params) = llm.generated
    assert (len(greedy_prompts), greedy_params.n) == (3, 1)
    assert (len(sampled_prompts), sampled_params.n) == (1, 3)
    for seqs in (greedy, sampled):
        assert len(seqs) == 3
        assert seqs[0].tokens == [72, 105] and seqs[0].logprobs == [-1.0, -2.0]
        assert seqs[0].stop_reason == "length"
        assert seqs[0].weights_version == engine.weights_version


def test_requests_vllm_would_refuse_are_refused_with_the_field(
    fake_vllm: types.ModuleType, model_dir: Path
) -> None:
    engine = start(model_dir)

    with pytest.raises(InvalidInputError, match="temperature"):
        engine.sample([BOS_ID], 1, SamplingParams(temperature=2.5))
    with pytest.raises(InvalidInputError, match="max_tokens"):
        engine.sample([BOS_ID] * 60, 1, SamplingParams(max_tokens=8))
    with pytest.raises(InvalidInputError, match="prompt_tokens"):
        engine.sample([300], 1, SamplingParams())
    with pytest.raises(InvalidInputError, match="tokens"):
        engine.compute_logprobs([BOS_ID] * 64)


def test_compute_logprobs_returns_none_then_each_tokens_logprob(
    fake_vllm: types.ModuleType, model_dir: Path
) -> None:
    engine = start(model_dir)
    (llm,) = FakeLLM.instances

    assert engine.compute_logprobs([BOS_ID, 65, 66]) == [None, -0.5, -0.5]
    ((_, params),) = llm.generated
    assert (params.prompt_logprobs, params.max_tokens) == (0, 1)


# ---------------------------------------------------------------------------------- set-up


def test_each_engine_reserves_the_gpu_fraction_its_creator_gives(
    fake_vllm: types.ModuleType, model_dir: Path
) -> None:
    start(model_dir, gpu_memory_utilization=0.3)
    start(model_dir, gpu_memory_utilization=0.45)

    assert [llm.kwargs["gpu_memory_utilization"] for llm in FakeLLM.instances] == [0.3, 0.45]
    for bad in (0.0, 1.5):
        with pytest.raises(InvalidInputError, match="gpu_memory_utilization"):
            start(model_dir, gpu_memory_utilization=bad)
    assert len(FakeLLM.instances) == 2  # refused before vLLM starts


def test_a_max_seq_len_above_the_models_limit_is_clamped_with_a_log_line(
    fake_vllm: types.ModuleType, model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    limit = json.loads((model_dir / "config.json").read_text())["max_position_embeddings"]

    with caplog.at_level(logging.WARNING, logger=vllm_sampler.__name__):
        start(model_dir, max_seq_len=limit * 8)
    start(model_dir, max_seq_len=limit // 2)
    start(model_dir)

    # vLLM refuses to start above the model's limit; the torch engine clamps the same way.
    assert [llm.kwargs["max_model_len"] for llm in FakeLLM.instances] == [limit, limit // 2, None]
    (record,) = [r for r in caplog.records if "max_seq_len" in r.getMessage()]
    assert f"max_seq_len {limit * 8} is above the model's limit {limit}" in record.getMessage()


def test_the_tokenizers_model_max_length_caps_the_limit_too(
    fake_vllm: types.ModuleType, model_dir: Path, tmp_path: Path
) -> None:
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    (folder / "manifest.json").unlink()  # a foreign folder: its digest is computed
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(
        json.dumps({**tokenizer_config, "model_max_length": 100})
    )

    start(folder, max_seq_len=400)

    assert FakeLLM.instances[0].kwargs["max_model_len"] == 100


def test_the_checkpoints_own_dtype_is_served_unless_another_is_named(
    fake_vllm: types.ModuleType, model_dir: Path
) -> None:
    default = start(model_dir)  # the tiny model is fp32, as the trainer computes
    named = start(model_dir, dtype="bfloat16")

    assert [llm.kwargs["dtype"] for llm in FakeLLM.instances] == ["float32", "bfloat16"]
    assert (default.dtype, named.dtype) == ("float32", "bfloat16")
    with pytest.raises(InvalidInputError, match="dtype"):
        start(model_dir, dtype="float64")


def test_the_checkpoint_dtype_comes_from_config_json_either_key_or_the_weights(
    tmp_path: Path,
) -> None:
    shards = ["model.safetensors"]
    save_file({"a": torch.zeros(2, dtype=torch.bfloat16), "n": torch.zeros(1, dtype=torch.int64)},
              str(tmp_path / "model.safetensors"))  # fmt: skip
    config = tmp_path / "config.json"

    config.write_text(json.dumps({"dtype": "float16"}))  # transformers 5
    assert checkpoint_dtype(tmp_path, shards) == "float16"
    config.write_text(json.dumps({"torch_dtype": "float32"}))  # transformers 4
    assert checkpoint_dtype(tmp_path, shards) == "float32"
    config.write_text(json.dumps({}))  # no dtype named: the weights' own
    assert checkpoint_dtype(tmp_path, shards) == "bfloat16"
    config.write_text(json.dumps({"dtype": "float64"}))
    with pytest.raises(InvalidInputError, match="dtype: the checkpoint is float64"):
        checkpoint_dtype(tmp_path, shards)


def test_fp32_serving_pins_triton_to_ieee_before_vllm_starts(
    fake_vllm: types.ModuleType, model_dir: Path
) -> None:
    start(model_dir, dtype="bfloat16")
    assert TRITON_F32_ENV not in FakeLLM.instances[0].environ  # bf16 matmuls are not affected

    start(model_dir)  # fp32

    assert FakeLLM.instances[1].environ[TRITON_F32_ENV] == "ieee"


def test_a_triton_precision_set_by_the_operator_is_kept_with_a_warning(
    fake_vllm: types.ModuleType,
    model_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv(TRITON_F32_ENV, "tf32")

    with caplog.at_level(logging.WARNING, logger=vllm_sampler.__name__):
        start(model_dir)

    assert FakeLLM.instances[0].environ[TRITON_F32_ENV] == "tf32"
    assert any("will not compute in full fp32" in r.getMessage() for r in caplog.records)


def test_the_start_logs_the_attention_backend_and_dtype(
    fake_vllm: types.ModuleType, model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger=vllm_sampler.__name__):
        engine = start(model_dir)

    assert engine.attention_backends == ["TRITON_ATTN"]
    (record,) = [r for r in caplog.records if r.getMessage() == "vLLM engine started"]
    assert record.attention_backends == ["TRITON_ATTN"]  # type: ignore[attr-defined]
    assert record.dtype == "float32"  # type: ignore[attr-defined]
    assert getattr(record, TRITON_F32_ENV) == "ieee"


# ---------------------------------------------------------------------------------- close


def test_close_shuts_the_engine_core_down_once_and_refuses_later_calls(
    fake_vllm: types.ModuleType, model_dir: Path, chain: dict[str, Any]
) -> None:
    engine = start(model_dir)
    (llm,) = FakeLLM.instances

    engine.close()
    engine.close()  # a second close does nothing

    assert llm.shutdowns == 1 and engine.closed
    with pytest.raises(EngineClosedError):
        engine.sample([BOS_ID, 65], 1, SamplingParams(max_tokens=2))
    with pytest.raises(EngineClosedError):
        engine.compute_logprobs([BOS_ID, 65])
    with pytest.raises(EngineClosedError):
        engine.load_weights(chain["base"], checkpoint_id="b")
    with pytest.raises(EngineClosedError):
        engine.reset_prompt_cache()
    assert llm.model.weights == {} and llm.generated == []


def test_the_engine_closes_as_a_context_manager_and_when_its_start_fails(
    fake_vllm: types.ModuleType, model_dir: Path
) -> None:
    with start(model_dir) as engine:
        assert not engine.closed
    assert engine.closed and FakeLLM.instances[0].shutdowns == 1

    FakeLLM.quantization = "awq"
    with pytest.raises(InvalidInputError, match="quantized"):
        start(model_dir)
    assert FakeLLM.instances[1].shutdowns == 1  # its GPU memory is not left reserved
