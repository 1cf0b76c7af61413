"""The SDK's newer losses and sampling options through the Tinker door, against the real stack.

gspo and stable_reinforce are checked against torch on the same weights in this process (rel
1e-4, as the older losses in test_tinker_sdk.py); stable_reinforce on sequences the sampler
recorded (`record_stability_info`), named by their `sequence_id`; custom losses through
`forward_backward_custom` (the SDK computes them on forward logprobs). Sampling: top-k prompt and
sample logprobs, `prompt_logprobs_last_n`, and prompt-cache hits counted by the sampler.
"""

from __future__ import annotations

from typing import Any

import pytest
import tinker
import torch
from tinker import types

from infra.settings import Settings

TINY = "loopstream/tiny-llama"
BOS = 256


def _tensor(values: list[float], dtype: str = "float32") -> types.TensorData:
    return types.TensorData(data=values, dtype=dtype, shape=[len(values)])  # type: ignore[arg-type]


def _datum(tokens: list[int], **inputs: list[float]) -> tinker.Datum:
    loss_fn_inputs: dict[str, Any] = {"target_tokens": _tensor(tokens[1:], "int64")}
    loss_fn_inputs.update({name: _tensor(values) for name, values in inputs.items()})
    return tinker.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]), loss_fn_inputs=loss_fn_inputs
    )


def _train_logprobs(training_client: tinker.TrainingClient, tokens: list[int]) -> torch.Tensor:
    n = len(tokens) - 1
    out = training_client.forward([_datum(tokens, weights=[1.0] * n)], "cross_entropy").result()
    return torch.tensor(out.loss_fn_outputs[0]["logprobs"].tolist(), dtype=torch.float64)


@pytest.mark.parametrize(
    "config",
    [None, {"clip_low_threshold": 0.5, "clip_high_threshold": 2.0}],
)
def test_gspo_matches_the_torch_reference(
    training_client: tinker.TrainingClient, config: dict[str, float] | None
) -> None:
    tokens = [BOS, 97, 98, 99, 97, 100]
    logp = _train_logprobs(training_client, tokens)
    q = (logp - torch.tensor([0.3, -0.2, 0.05, 0.4, -0.1], dtype=torch.float64)).tolist()
    adv = [0.0, 1.0, 1.0, 1.0, 1.0]  # the first target is "prompt": out of the sequence ratio
    out = training_client.forward(
        [_datum(tokens, logprobs=q, advantages=adv)], "gspo", config
    ).result()

    qt, at = torch.tensor(q, dtype=torch.float64), torch.tensor(adv, dtype=torch.float64)
    mask = (at != 0).double()
    s = torch.exp(((logp - qt) * mask).sum() / mask.sum())
    lo, hi = (
        (config or {}).get("clip_low_threshold", 1 - 3e-4),
        (config or {}).get("clip_high_threshold", 1 + 4e-4),
    )
    expected = -torch.minimum(s * at, s.clamp(lo, hi) * at).sum()
    assert out.metrics["loss:sum"] == pytest.approx(float(expected), rel=1e-4, abs=1e-5)


def _recorded_rollout(
    training_client: tinker.TrainingClient, *, record: bool
) -> tuple[list[int], types.SampledSequence]:
    sampler = training_client.save_weights_and_get_sampling_client(
        record_stability_info=record
    ).result()
    prompt = [BOS, 97, 98]
    response = sampler.sample(
        types.ModelInput.from_ints(prompt),
        num_samples=1,
        sampling_params=types.SamplingParams(max_tokens=6, temperature=1.0, seed=5),
    ).result()
    return prompt, response.sequences[0]


def _stable_datum(prompt: list[int], sequence: types.SampledSequence, adv: float) -> tinker.Datum:
    """The cookbook's layout (recipes/rl_loop.py): prompt + all but the last sampled token in,
    targets shifted by one; provenance names the sampled sequence behind every position."""
    sampled = list(sequence.tokens)
    ob = len(prompt) - 1
    datum = tinker.Datum(
        model_input=types.ModelInput.from_ints(prompt + sampled[:-1]),
        loss_fn_inputs={
            "target_tokens": _tensor(prompt[1:] + sampled, "int64"),
            "logprobs": _tensor([0.0] * ob + list(sequence.logprobs or [])),
            "advantages": _tensor([0.0] * ob + [adv] * len(sampled)),
        },
    )
    sid = sequence.sequence_id
    return datum.with_provenance(
        model_input=[
            types.PromptProvenanceSpan(sequence_id=sid, length=len(prompt)),
            types.SampledProvenanceSpan(sequence_id=sid, length=len(sampled) - 1),
        ],
        loss_fn_inputs=[
            types.PromptProvenanceSpan(sequence_id=sid, offset=1, length=len(prompt) - 1),
            types.SampledProvenanceSpan(sequence_id=sid, length=len(sampled)),
        ],
    )


@pytest.mark.parametrize("config", [None, {"kl_coeff": 0.5, "clip_high_threshold": 1.05}])
def test_stable_reinforce_trains_on_the_recorded_sequences(
    training_client: tinker.TrainingClient, config: dict[str, float] | None
) -> None:
    prompt, sequence = _recorded_rollout(training_client, record=True)
    assert sequence.sequence_id
    datum = _stable_datum(prompt, sequence, adv=1.5)
    tokens = prompt + list(sequence.tokens)
    logp = _train_logprobs(training_client, tokens)

    out = training_client.forward([datum], "stable_reinforce", config).result()

    ob = len(prompt) - 1
    q = torch.tensor(sequence.logprobs, dtype=torch.float64)
    lp = logp[ob:]  # only the sampled positions count
    cap = (config or {}).get("clip_high_threshold", 2.0)
    kl_coeff = (config or {}).get("kl_coeff", 0.0)
    weight = torch.exp(lp - q).clamp(max=cap)
    kl = torch.exp(q - lp) - (q - lp) - 1
    expected = -(weight * lp * 1.5).sum() + kl_coeff * kl.sum()
    assert out.metrics["loss:sum"] == pytest.approx(float(expected), rel=1e-4, abs=1e-5)
    # A training step on it works too (forward_backward + optim_step).
    training_client.forward_backward([datum], "stable_reinforce", config).result()
    training_client.optim_step(types.AdamParams(learning_rate=1e-4)).result()


def test_stable_reinforce_refuses_sequences_it_cannot_vouch_for(
    training_client: tinker.TrainingClient,
) -> None:
    prompt, unrecorded = _recorded_rollout(training_client, record=False)
    with pytest.raises(tinker.BadRequestError, match="record_stability_info"):
        training_client.forward(
            [_stable_datum(prompt, unrecorded, adv=1.0)], "stable_reinforce"
        ).result()

    prompt, sequence = _recorded_rollout(training_client, record=True)
    datum = _stable_datum(prompt, sequence, adv=1.0)
    targets = list(prompt[1:] + list(sequence.tokens))
    targets[-1] = (targets[-1] + 1) % 256  # not what the sampler generated
    forged = tinker.Datum(
        model_input=datum.model_input,
        loss_fn_inputs={**datum.loss_fn_inputs, "target_tokens": _tensor(targets, "int64")},
        model_input_spans=datum.model_input_spans,
        loss_fn_input_spans=datum.loss_fn_input_spans,
    )
    with pytest.raises(tinker.BadRequestError, match="not the sampled tokens"):
        training_client.forward([forged], "stable_reinforce").result()

    no_spans = _datum(prompt + list(sequence.tokens), logprobs=[0.0] * 8, advantages=[1.0] * 8)
    with pytest.raises(tinker.BadRequestError, match="loss_fn_input_spans"):
        training_client.forward([no_spans], "stable_reinforce").result()


def test_custom_losses_run_in_the_sdk_on_server_logprobs(
    service_client: tinker.ServiceClient, training_client: tinker.TrainingClient
) -> None:
    tokens = [BOS, 97, 98, 99, 100]
    weights = [1.0, 0.5, 2.0, 1.0]
    logp = _train_logprobs(training_client, tokens)

    def squared_nll(
        data: list[tinker.Datum], logprobs: list[torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        loss = sum(((-lp) ** 2).sum() for lp in logprobs)
        return loss, {"custom/squared_nll:sum": float(loss.detach())}  # type: ignore[union-attr]

    out = training_client.forward_backward_custom(
        [_datum(tokens, weights=weights)], squared_nll
    ).result()
    assert out.metrics["loss:sum"] == pytest.approx(float((logp**2).sum()), rel=1e-4)

    def weighted_nll(logprobs: torch.Tensor, weights: torch.Tensor) -> Any:
        loss = -(logprobs * weights).sum()
        return loss, {"custom/weighted_nll:sum": loss}

    handle = service_client.create_custom_loss(
        weighted_nll, input_ranks={"logprobs": 1, "weights": 1}
    ).result()
    # The weights moved by the step above: compare against the logprobs of now.
    logp = _train_logprobs(training_client, tokens)
    out = training_client.forward_backward_custom(
        [_datum(tokens, weights=weights)], handle
    ).result()
    expected = -(logp * torch.tensor(weights, dtype=torch.float64)).sum()
    assert out.metrics["loss:sum"] == pytest.approx(float(expected), rel=1e-4)


def test_sampling_answers_top_k_logprobs_last_n_and_prompt_cache_hits(
    service_client: tinker.ServiceClient,
) -> None:
    sampler = service_client.create_sampling_client(base_model=TINY).result()
    prompt = types.ModelInput.from_ints([BOS, 104, 105, 106, 107])
    params = types.SamplingParams(max_tokens=4, temperature=1.0, seed=11)

    first = sampler.sample(
        prompt, 2, params, include_prompt_logprobs=True,
        topk_prompt_logprobs=3, topk_sample_logprobs=2, prompt_logprobs_last_n=2,
    ).result()  # fmt: skip
    again = sampler.sample(prompt, 1, params).result()

    assert first.prompt_logprobs is not None
    assert first.prompt_logprobs[:3] == [None, None, None]
    assert all(v is not None for v in first.prompt_logprobs[3:])
    top_prompt = first.topk_prompt_logprobs
    assert top_prompt is not None and len(top_prompt) == 5
    assert top_prompt[:3] == [None, None, None]
    for entry in top_prompt[3:]:
        assert entry is not None and len(entry) == 3
        assert [lp for _, lp in entry] == sorted((lp for _, lp in entry), reverse=True)
    for seq in first.sequences:
        assert seq.topk_logprobs is not None and len(seq.topk_logprobs) == len(seq.tokens)
        assert all(top is not None and len(top) == 2 for top in seq.topk_logprobs)
    assert again.prompt_cache_hit_tokens == 5

    targets = types.TensorData(data=[104, -1, 1, 2, -1, 106, 7, 8], dtype="int64", shape=[4, 2])
    scored = sampler.sample(
        prompt, 1, params, include_prompt_logprobs=True, target_prompt_logprobs=targets,
        prompt_alt_tokens_k=3,
    ).result()  # fmt: skip
    assert scored.target_prompt_logprobs is not None
    cells = scored.target_prompt_logprobs.tolist()
    assert cells[0][1] == 0.0 and cells[2][0] == 0.0  # -1: nothing asked there
    # Scoring id 105 at position 1 is the prompt token's own logprob there.
    assert scored.prompt_logprobs is not None
    alternatives = scored.prompt_alt_tokens
    assert alternatives is not None and alternatives.tokens.shape == [4, 3]
    assert alternatives.logprobs.shape == [4, 3]
    assert all(lp <= 0 for row in alternatives.logprobs.tolist() for lp in row)
    with pytest.raises(tinker.BadRequestError, match="target_prompt_logprobs"):
        sampler.sample(
            prompt, 1, params,
            target_prompt_logprobs=types.TensorData(data=[1, 2], dtype="int64", shape=[2, 1]),
        ).result()  # fmt: skip

    with pytest.raises(tinker.BadRequestError, match="prompt_logprobs_last_n"):
        sampler.sample(
            prompt, 1, params, include_prompt_logprobs=True, prompt_logprobs_last_n=5
        ).result()


def test_the_loops_door_takes_the_same_losses_and_sampling_options(settings: Settings) -> None:
    """/v1/loops and its SDK: one implementation with the Tinker door (api/recorded.py)."""
    from api.client import LoopsError, ServiceClient
    from commands.work import Datum, LossFnInputs, ProvenanceSpan

    with ServiceClient() as service:
        session = service.create_session(settings.tiny_model_name, project="losses")
        trainer = service.create_training_client(session, max_seq_len=64)
        sampler = trainer.sampling_client()
        prompt = [BOS, 97, 98]
        out = sampler.sample(
            prompt_tokens=prompt, max_tokens=5, seed=3, record_stability_info=True,
            prompt_logprobs=True, topk_prompt_logprobs=2, topk_sample_logprobs=2,
        ).result(120)  # fmt: skip
        sequence = out["sequences"][0]
        assert sequence["sequence_id"].endswith(":0") and len(sequence["topk_logprobs"]) == 5
        assert len(out["topk_prompt_logprobs"]) == 3 and out["prompt_cache_hit_tokens"] == 0

        sampled, sid = sequence["tokens"], sequence["sequence_id"]
        n = len(prompt) - 1 + len(sampled)
        datum = Datum(
            model_input=prompt + sampled[:-1],
            loss_fn_inputs=LossFnInputs(
                target_tokens=prompt[1:] + sampled, advantages=[0.0] * 2 + [1.0] * len(sampled)
            ),
            loss_fn_input_spans=[
                ProvenanceSpan(kind="prompt", sequence_id=sid, offset=1, length=len(prompt) - 1),
                ProvenanceSpan(kind="sampled", sequence_id=sid, length=len(sampled)),
            ],
        )
        result = trainer.forward([datum], "stable_reinforce", {"kl_coeff": 0.1}).result(120)
        logp = torch.tensor(result["loss_fn_outputs"][0]["logprobs"][2:], dtype=torch.float64)
        q = torch.tensor(sequence["logprobs"], dtype=torch.float64)
        kl = torch.exp(q - logp) - (q - logp) - 1
        expected = -(torch.exp(logp - q).clamp(max=2.0) * logp).sum() + 0.1 * kl.sum()
        assert result["loss"] == pytest.approx(float(expected), rel=1e-4, abs=1e-5)
        assert n == len(result["loss_fn_outputs"][0]["logprobs"])

        gspo = Datum(
            model_input=datum.model_input,
            loss_fn_inputs=LossFnInputs(
                target_tokens=datum.loss_fn_inputs.target_tokens,
                logprobs=[0.0] * 2 + sequence["logprobs"],
                advantages=datum.loss_fn_inputs.advantages,
            ),
        )
        assert "loss" in trainer.forward_backward([gspo], "gspo").result(120)

        unknown = datum.model_copy(
            update={"loss_fn_input_spans": [
                ProvenanceSpan(kind="prompt", sequence_id="nope:0", offset=1, length=2),
                ProvenanceSpan(kind="sampled", sequence_id="nope:0", length=len(sampled)),
            ]}
        )  # fmt: skip
        with pytest.raises(LoopsError, match=r"422: data\.0\.loss_fn_input_spans\.0\.sequence_id"):
            trainer.forward([unknown], "stable_reinforce")


def test_save_weights_external_exports_a_hugging_face_folder(
    training_client: tinker.TrainingClient, api_key: str, tmp_path: Any
) -> None:
    import httpx
    from transformers import AutoModelForCausalLM

    from api.config import get_api_settings

    name = f"export-{id(tmp_path) % 100000}"
    saved = training_client.save_weights_external(name).result()
    assert saved.path.endswith(f"/external_weights/{name}")

    api = get_api_settings()
    rest = tinker.RestClient(base_url=f"http://{api.api_host}:{api.api_port}", api_key=api_key)
    urls = rest.get_external_weights_urls(saved.path).result().urls
    for file_name, url in urls.items():
        (tmp_path / file_name).write_bytes(httpx.get(url, timeout=30).raise_for_status().content)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    tokens = [BOS, 97, 98, 99, 100]
    logits = model(input_ids=torch.tensor([tokens[:-1]])).logits[0].double()
    exported = torch.log_softmax(logits, -1)[torch.arange(4), torch.tensor(tokens[1:])]
    torch.testing.assert_close(exported, _train_logprobs(training_client, tokens), rtol=1e-4,
                               atol=1e-5)  # fmt: skip

    # A refused export settles its seq_id: the client's next call goes through.
    with pytest.raises(tinker.BadRequestError, match="age_encryption_recipients"):
        training_client.save_weights_external("enc", age_encryption_recipients=["age1x"]).result()
    training_client.optim_step(types.AdamParams(learning_rate=1e-5)).result()
