"""The sampler engine: seeded reproducibility, stops, top_p, verified hot weight swaps."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from gpu_workers.engine.sampler import SamplerEngine, SamplerEngineProtocol
from gpu_workers.engine.trainer import TrainerEngine
from gpu_workers.engine.types import AdamParams, Datum, InvalidInputError, SamplingParams
from gpu_workers.engine.vllm_sampler import VllmNotInstalledError, VllmSamplerEngine
from gpu_workers.manifest import ChecksumMismatchError, read_manifest
from gpu_workers.tiny_model import BOS_ID, EOS_ID, ensure_tiny_model

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def trained_weights(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Sampler weights trained to like the letter 'z', so they differ visibly from the base."""
    trainer = TrainerEngine(model_dir, max_seq_len=64)
    for _ in range(30):
        trainer.forward_backward([Datum.from_tokens([BOS_ID, *b"zzzzzzzzzzzz"])], "cross_entropy")
        trainer.optim_step(AdamParams(learning_rate=1e-2))
    folder = tmp_path_factory.mktemp("ckpt") / "sampler"
    trainer.save_weights_for_sampler(folder)
    return folder


def test_same_seed_same_tokens_other_seed_other_tokens(model_dir: Path) -> None:
    sampler = SamplerEngine(model_dir)
    params = SamplingParams(max_tokens=16, seed=42)

    a = sampler.sample([BOS_ID], 4, params)
    b = SamplerEngine(model_dir).sample([BOS_ID], 4, params)
    c = sampler.sample([BOS_ID], 4, SamplingParams(max_tokens=16, seed=43))

    assert [s.tokens for s in a] == [s.tokens for s in b]
    assert [s.tokens for s in a] != [s.tokens for s in c]
    assert len({tuple(s.tokens) for s in a}) == 4  # the samples of one call differ


def test_sample_i_depends_on_seed_and_index_only(model_dir: Path) -> None:
    sampler = SamplerEngine(model_dir)
    params = SamplingParams(max_tokens=12, seed=7)

    two = sampler.sample([BOS_ID, 65], 2, params)
    five = sampler.sample([BOS_ID, 65], 5, params)

    assert [s.tokens for s in two] == [s.tokens for s in five[:2]]


def test_sequences_report_their_logprobs_length_and_version(model_dir: Path) -> None:
    sampler = SamplerEngine(model_dir)

    seqs = sampler.sample([BOS_ID], 3, SamplingParams(max_tokens=10, seed=1, stop_at_eos=False))

    for seq in seqs:
        assert len(seq.tokens) == len(seq.logprobs) == 10
        assert seq.stop_reason == "length"
        assert all(lp < 0 for lp in seq.logprobs)
        assert seq.weights_version == sampler.weights_version
    assert sampler.weights_version.checkpoint_id == "base"
    assert sampler.weights_version.digest == read_manifest(model_dir).digest


def test_temperature_zero_and_tiny_top_p_are_greedy(model_dir: Path) -> None:
    sampler = SamplerEngine(model_dir)
    prompt = [BOS_ID, *b"abc"]

    greedy = sampler.sample(prompt, 2, SamplingParams(max_tokens=8, temperature=0.0))
    nucleus = sampler.sample(prompt, 2, SamplingParams(max_tokens=8, top_p=1e-6, seed=3))

    argmax: list[int] = []
    with torch.no_grad():
        for _ in range(8):
            logits = sampler.model(input_ids=torch.tensor([[*prompt, *argmax]])).logits[0, -1]
            argmax.append(int(logits.argmax()))
            if argmax[-1] == EOS_ID:
                break
    assert greedy[0].tokens == greedy[1].tokens == nucleus[0].tokens == argmax


def test_temperature_and_top_p_below_float32_resolution_sample_greedily(
    model_dir: Path,
) -> None:
    # 1e-300 is 0 as a float32: the division overflowed to NaN and the replica answered a 500.
    sampler = SamplerEngine(model_dir)
    prompt = [BOS_ID, *b"abc"]

    greedy = sampler.sample(prompt, 1, SamplingParams(max_tokens=6, temperature=0.0))
    cold = sampler.sample(prompt, 1, SamplingParams(max_tokens=6, temperature=1e-300, seed=1))
    narrow = sampler.sample(prompt, 1, SamplingParams(max_tokens=6, top_p=5e-324, seed=1))

    assert cold[0].tokens == narrow[0].tokens == greedy[0].tokens


def test_stop_token_ids_end_a_sequence_and_are_kept(model_dir: Path) -> None:
    sampler = SamplerEngine(model_dir)
    free = sampler.sample([BOS_ID], 1, SamplingParams(max_tokens=30, seed=9, stop_at_eos=False))[0]
    stop_token = free.tokens[5]
    first = free.tokens.index(stop_token)

    by_id = sampler.sample(
        [BOS_ID], 1, SamplingParams(max_tokens=30, seed=9, stop=[stop_token], stop_at_eos=False)
    )[0]

    assert by_id.tokens == free.tokens[: first + 1]
    assert by_id.logprobs == free.logprobs[: first + 1]
    assert by_id.stop_reason == "stop"


def test_stop_strings_end_a_sequence_and_are_cut_from_the_text(
    model_dir: Path, trained_weights: Path
) -> None:
    sampler = SamplerEngine(model_dir)
    sampler.load_weights(trained_weights, checkpoint_id="z-lover")

    seqs = sampler.sample([BOS_ID], 8, SamplingParams(max_tokens=30, seed=1, stop=["zz"]))

    stopped = [s for s in seqs if s.stop_reason == "stop"]
    assert len(stopped) >= 6  # the trained model emits "zz" early almost always
    for seq in stopped:
        assert seq.tokens[-2:] == [ord("z")] * 2  # tokens keep what the model generated
        assert "zz" not in seq.text
        assert sampler.tokenizer.decode(seq.tokens, skip_special_tokens=True).startswith(seq.text)


def test_load_weights_swaps_in_place_and_changes_the_version(
    model_dir: Path, trained_weights: Path
) -> None:
    sampler = SamplerEngine(model_dir)
    model_id = id(sampler.model)
    params = SamplingParams(max_tokens=16, seed=0)
    before = sampler.sample([BOS_ID], 8, params)

    version = sampler.load_weights(trained_weights, checkpoint_id="bt://loops:r/sampler_weights/a")
    after = sampler.sample([BOS_ID], 8, params)

    assert id(sampler.model) == model_id
    assert version.checkpoint_id == "bt://loops:r/sampler_weights/a"
    assert version.digest == read_manifest(trained_weights).digest
    assert all(s.weights_version == version for s in after)
    z = ord("z")
    assert sum(s.tokens.count(z) for s in after) > sum(s.tokens.count(z) for s in before) + 20


def test_tampered_weights_are_refused_and_the_old_weights_stay(
    model_dir: Path, trained_weights: Path, tmp_path: Path
) -> None:
    sampler = SamplerEngine(model_dir)
    params = SamplingParams(max_tokens=8, seed=0)
    before = sampler.sample([BOS_ID], 2, params)
    bad = tmp_path / "bad"
    shutil.copytree(trained_weights, bad)
    data = bytearray((bad / "model.safetensors").read_bytes())
    data[-1] ^= 0x01
    (bad / "model.safetensors").write_bytes(bytes(data))

    with pytest.raises(ChecksumMismatchError, match=r"model\.safetensors"):
        sampler.load_weights(bad, checkpoint_id="bad")

    assert sampler.weights_version.checkpoint_id == "base"
    assert [s.tokens for s in sampler.sample([BOS_ID], 2, params)] == [s.tokens for s in before]


def test_bad_sampling_requests_name_the_field(model_dir: Path) -> None:
    sampler = SamplerEngine(model_dir, max_seq_len=32)
    cases = [
        (lambda: sampler.sample([BOS_ID] * 30, 1, SamplingParams(max_tokens=8)), "max_tokens"),
        (lambda: sampler.sample([], 1, SamplingParams()), "prompt_tokens"),
        (lambda: sampler.sample([BOS_ID, 999], 1, SamplingParams()), "prompt_tokens[1]"),
        (lambda: sampler.sample([BOS_ID], 0, SamplingParams()), "num_samples"),
        (lambda: sampler.sample([BOS_ID], 1, SamplingParams(stop=[5000])), "stop[0]"),
    ]
    for call, field in cases:
        with pytest.raises(InvalidInputError) as err:
            call()
        assert err.value.field == field


def test_engines_implement_the_protocol_and_vllm_fails_clearly(model_dir: Path) -> None:
    assert isinstance(SamplerEngine(model_dir), SamplerEngineProtocol)
    try:
        import vllm  # noqa: F401
    except ImportError:
        with pytest.raises(VllmNotInstalledError, match=r"gpu"):
            VllmSamplerEngine(model_dir, gpu_memory_utilization=0.5)


def test_a_cached_prompt_samples_exactly_like_a_fresh_prefill(model_dir: Path) -> None:
    cached = SamplerEngine(model_dir)
    params = SamplingParams(max_tokens=12, seed=5)
    first = cached.sample([BOS_ID, 104, 105], 3, params)
    again = cached.sample([BOS_ID, 104, 105], 3, params)  # served from the prompt cache
    fresh = SamplerEngine(model_dir, prompt_cache_size=0).sample([BOS_ID, 104, 105], 3, params)

    assert cached.prompt_cache_hits == 1
    assert [s.tokens for s in again] == [s.tokens for s in first] == [s.tokens for s in fresh]
    assert [s.logprobs for s in again] == [s.logprobs for s in first]


def test_a_weight_swap_drops_the_prompt_cache_unless_told_to_keep_it(
    model_dir: Path, trained_weights: Path
) -> None:
    """Kept across a swap, the cache answers with the old weights' prompt: that is why a
    weight sync resets it by default."""
    prompt, params = [BOS_ID, 122], SamplingParams(max_tokens=1, temperature=0.0)
    reference = SamplerEngine(model_dir, prompt_cache_size=0)
    reference.load_weights(trained_weights, checkpoint_id="z")
    (expected,) = reference.sample(prompt, 1, params)

    stale = SamplerEngine(model_dir)
    stale.sample(prompt, 1, params)  # cached with the base weights
    stale.load_chain([trained_weights], checkpoint_id="z", keep_prompt_cache=True)
    (answer,) = stale.sample(prompt, 1, params)
    assert answer.logprobs != pytest.approx(expected.logprobs, abs=1e-4)
    assert stale.reset_prompt_cache() == 1
    (answer,) = stale.sample(prompt, 1, params)
    assert answer.logprobs == pytest.approx(expected.logprobs, abs=1e-5)

    default = SamplerEngine(model_dir)
    default.sample(prompt, 1, params)
    default.load_weights(trained_weights, checkpoint_id="z")  # drops the cache itself
    (answer,) = default.sample(prompt, 1, params)
    assert answer.logprobs == pytest.approx(expected.logprobs, abs=1e-5)
