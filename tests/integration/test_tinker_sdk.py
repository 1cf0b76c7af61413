"""The official `tinker` SDK (pinned, unchanged) against the running stack's Tinker front door.

Every call goes SDK -> /api/v1 -> Kafka -> the same workers as /v1/loops -> CommandResult ->
retrieve_future. Loss values are checked against torch on the same weights in this process
(tolerance: rel 1e-4, the workers compute in float32 like the reference).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
import warnings
from typing import Any

import httpx
import pytest
import tinker
import torch
from tinker import types

from api.kafka_driver import query
from api.tinker import ids
from infra.settings import Settings
from tests.integration.kafka_helpers import until

TINY = "loopstream/tiny-llama"
BOS = 256  # the tiny model's byte vocabulary starts its specials here
WAIT_S = 120.0  # a run stopping and its engine released, on shared services


def _datum(tokens: list[int], **inputs: list[float]) -> tinker.Datum:
    loss_fn_inputs: dict[str, Any] = {
        "target_tokens": types.TensorData(data=tokens[1:], dtype="int64", shape=[len(tokens) - 1])
    }
    for name, values in inputs.items():
        loss_fn_inputs[name] = types.TensorData(data=values, dtype="float32", shape=[len(values)])
    return tinker.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]), loss_fn_inputs=loss_fn_inputs
    )


def test_capabilities_list_the_tiny_model(service_client: tinker.ServiceClient) -> None:
    names = [m.model_name for m in service_client.get_server_capabilities().supported_models]
    assert TINY in names


def test_core_loop_trains_saves_and_samples(
    service_client: tinker.ServiceClient, training_client: tinker.TrainingClient
) -> None:
    tokenizer = training_client.get_tokenizer()
    tokens = [BOS, *tokenizer.encode("aaaa bbbb", add_special_tokens=False)]
    datum = _datum(tokens, weights=[1.0] * (len(tokens) - 1))

    # Pipelined: submitted without waiting, applied in seq_id order.
    first = training_client.forward_backward([datum], "cross_entropy")
    step = training_client.optim_step(types.AdamParams(learning_rate=1e-2))
    second = training_client.forward_backward([datum], "cross_entropy")
    loss_before = first.result().metrics["loss:sum"]
    assert step.result().metrics is not None
    loss_after = second.result().metrics["loss:sum"]
    assert loss_after < loss_before  # the step between them was applied first

    saved = training_client.save_weights_for_sampler("core-1").result()
    assert saved.path.startswith("tinker://") and saved.path.endswith("/sampler_weights/core-1")
    sampler = service_client.create_sampling_client(model_path=saved.path).result()
    prompt = types.ModelInput.from_ints(tokens[:3])
    response = sampler.sample(
        prompt, 3, types.SamplingParams(max_tokens=6, temperature=1.0, top_k=5, seed=1)
    ).result()
    assert len(response.sequences) == 3
    assert all(1 <= len(s.tokens) <= 6 for s in response.sequences)
    for sequence in response.sequences:
        assert sequence.logprobs is not None and len(sequence.logprobs) == len(sequence.tokens)

    logprobs = sampler.compute_logprobs(types.ModelInput.from_ints(tokens)).result()
    assert logprobs[0] is None and len(logprobs) == len(tokens)
    # The trainer's logprobs of the same tokens, from a forward pass on the same weights.
    fwd = training_client.forward([datum], "cross_entropy").result()
    trainer_logprobs = fwd.loss_fn_outputs[0]["logprobs"].tolist()
    assert logprobs[1:] == pytest.approx(trainer_logprobs, abs=1e-4)


def test_save_weights_and_get_sampling_client(training_client: tinker.TrainingClient) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sampler = training_client.save_weights_and_get_sampling_client().result()
    out = sampler.sample(
        types.ModelInput.from_ints([BOS, 97]), 1, types.SamplingParams(max_tokens=4, seed=0)
    ).result()
    assert len(out.sequences) == 1


@pytest.mark.parametrize(
    ("loss_fn", "config"),
    [
        ("importance_sampling", None),
        ("ppo", {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}),
        ("cispo", None),
        ("dro", {"beta": 0.5}),
    ],
)
def test_policy_losses_match_torch_reference(
    training_client: tinker.TrainingClient, loss_fn: str, config: dict[str, float] | None
) -> None:
    tokens = [BOS, 97, 98, 99, 97, 100]
    n = len(tokens) - 1
    # logprobs under the current weights, through a forward pass.
    ce = training_client.forward([_datum(tokens, weights=[1.0] * n)], "cross_entropy").result()
    logp = torch.tensor(ce.loss_fn_outputs[0]["logprobs"].tolist(), dtype=torch.float64)
    q = (logp - torch.tensor([0.3, -0.2, 0.05, 0.4, -0.1], dtype=torch.float64)).tolist()
    adv = [1.0, -1.0, 0.5, 2.0, -0.5]
    out = training_client.forward(
        [_datum(tokens, logprobs=q, advantages=adv)], loss_fn, config
    ).result()

    qt, at = torch.tensor(q, dtype=torch.float64), torch.tensor(adv, dtype=torch.float64)
    ratio = torch.exp(logp - qt)
    lo, hi = (
        (config or {}).get("clip_low_threshold", 0.8),
        (config or {}).get("clip_high_threshold", 1.2),
    )
    if loss_fn == "importance_sampling":
        expected = -(ratio * at).sum()
    elif loss_fn == "ppo":
        expected = -torch.minimum(ratio * at, ratio.clamp(lo, hi) * at).sum()
    elif loss_fn == "cispo":
        expected = -(ratio.clamp(lo, hi) * logp * at).sum()
    else:
        expected = -(logp * at - 0.5 * (config or {})["beta"] * (logp - qt) ** 2).sum()
    assert out.metrics["loss:sum"] == pytest.approx(float(expected), rel=1e-4, abs=1e-5)


def test_ten_pipelined_calls_apply_in_seq_id_order(training_client: tinker.TrainingClient) -> None:
    tokens = [BOS, 120, 121, 122]
    datum = _datum(tokens, weights=[1.0] * 3)
    futures: list[Any] = []
    for _ in range(5):
        futures.append(training_client.forward_backward([datum], "cross_entropy"))
        futures.append(training_client.optim_step(types.AdamParams(learning_rate=5e-3)))
    results = [f.result() for f in futures]
    losses = [r.metrics["loss:sum"] for r in results[0::2]]
    # Each forward_backward saw the optimizer step submitted before it: strictly decreasing.
    assert losses == sorted(losses, reverse=True) and len(set(losses)) == 5


def test_state_round_trip_and_training_client_from_state(
    service_client: tinker.ServiceClient, training_client: tinker.TrainingClient
) -> None:
    state = training_client.save_state("state-1").result()
    assert state.path.endswith("/weights/state-1")
    tokens = [BOS, 50, 51, 52]
    datum = _datum(tokens, weights=[1.0] * 3)
    expected = training_client.forward([datum], "cross_entropy").result().metrics["loss:sum"]

    resumed = service_client.create_training_client_from_state_with_optimizer(state.path).result()
    got = resumed.forward([datum], "cross_entropy").result().metrics["loss:sum"]
    assert got == pytest.approx(expected, rel=1e-6)
    info = resumed.get_info()
    assert info.model_data.model_name == TINY


def test_invalid_requests_raise_the_sdk_errors_with_the_server_message(
    service_client: tinker.ServiceClient, training_client: tinker.TrainingClient
) -> None:
    with pytest.raises(tinker.APIStatusError) as unknown_model:
        service_client.create_lora_training_client(base_model="nope/missing", rank=0).result()
    assert "nope/missing" in str(unknown_model.value) and TINY in str(unknown_model.value)

    too_long = _datum(list(range(3000)), weights=[1.0] * 2999)
    with pytest.raises(tinker.APIStatusError) as long_seq:
        training_client.forward_backward([too_long], "cross_entropy").result()
    assert "exceeds max_seq_len" in str(long_seq.value)


def test_bad_loss_name_raises_the_sdk_error_with_the_server_message(
    training_client: tinker.TrainingClient,
) -> None:
    datum = _datum([BOS, 97, 98], weights=[1.0, 1.0])
    with pytest.raises(tinker.BadRequestError) as bad_loss:
        training_client.forward_backward([datum], "no_such_loss").result()  # type: ignore[arg-type]
    # The API's own message, listing the losses it serves.
    assert "loss_fn" in str(bad_loss.value) and "importance_sampling" in str(bad_loss.value)


def test_load_state_on_an_existing_client_restores_the_weights(
    training_client: tinker.TrainingClient,
) -> None:
    datum = _datum([BOS, 60, 61, 62], weights=[1.0] * 3)
    state = training_client.save_state("load-1").result()
    saved_loss = training_client.forward([datum], "cross_entropy").result().metrics["loss:sum"]
    training_client.forward_backward([datum], "cross_entropy")
    training_client.optim_step(types.AdamParams(learning_rate=5e-2)).result()
    moved = training_client.forward([datum], "cross_entropy").result().metrics["loss:sum"]
    assert moved != pytest.approx(saved_loss, rel=1e-6)

    loaded = training_client.load_state(state.path).result()
    assert loaded.path == state.path
    back = training_client.forward([datum], "cross_entropy").result().metrics["loss:sum"]
    assert back == pytest.approx(saved_loss, rel=1e-6)


def test_training_client_from_state_with_weights_only(
    service_client: tinker.ServiceClient, training_client: tinker.TrainingClient
) -> None:
    datum = _datum([BOS, 70, 71, 72], weights=[1.0] * 3)
    state = training_client.save_state("weights-only-1").result()
    expected = training_client.forward([datum], "cross_entropy").result().metrics["loss:sum"]
    resumed = service_client.create_training_client_from_state(state.path).result()
    got = resumed.forward([datum], "cross_entropy").result().metrics["loss:sum"]
    assert got == pytest.approx(expected, rel=1e-6)
    # It trains from there: the fresh optimizer takes a step.
    resumed.forward_backward([datum], "cross_entropy")
    resumed.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    after = resumed.forward([datum], "cross_entropy").result().metrics["loss:sum"]
    assert after < got


def test_rest_client_lists_downloads_and_deletes_checkpoints(
    service_client: tinker.ServiceClient, training_client: tinker.TrainingClient
) -> None:
    import httpx

    rest = service_client.create_rest_client()
    model_id = training_client.model_id
    sampler_ckpt = training_client.save_weights_for_sampler("rest-1", ttl_seconds=3600).result()
    state = training_client.save_state("rest-state-1").result()

    run = rest.get_training_run(model_id).result()
    assert run.training_run_id == model_id and run.base_model == TINY and not run.is_lora
    assert run.last_checkpoint is not None and run.last_checkpoint.tinker_path == state.path
    assert run.last_sampler_checkpoint is not None
    assert run.last_sampler_checkpoint.tinker_path == sampler_ckpt.path
    runs = rest.list_training_runs(limit=5).result()
    assert 1 <= len(runs.training_runs) <= 5 and runs.cursor.total_count >= 1

    listed = {c.tinker_path: c for c in rest.list_checkpoints(model_id).result().checkpoints}
    assert listed[sampler_ckpt.path].checkpoint_type == "sampler"
    assert listed[sampler_ckpt.path].checkpoint_id == "sampler_weights/rest-1"
    assert listed[sampler_ckpt.path].expires_at is not None  # the ttl given at save time
    assert listed[state.path].checkpoint_type == "training"
    assert (listed[state.path].size_bytes or 0) > 0

    # Download: one presigned S3 URL per file of the sampler_weights checkpoint.
    urls = rest.get_external_weights_urls(f"tinker://{model_id}/external_weights/rest-1").result()
    assert any(name.endswith(".safetensors") for name in urls.urls)
    name, url = next(iter(sorted(urls.urls.items())))
    downloaded = httpx.get(url, timeout=30)
    assert downloaded.status_code == 200 and len(downloaded.content) > 0, name

    info = rest.get_weights_info_by_tinker_path(state.path).result()
    assert info.base_model == TINY and not info.is_lora

    # A TTL set after the save (more of it, and publishing: test_tinker_rest.py).
    rest.set_checkpoint_ttl_from_tinker_path(state.path, 3600).result()
    listed = {c.tinker_path: c for c in rest.list_checkpoints(model_id).result().checkpoints}
    assert listed[state.path].expires_at is not None

    rest.delete_checkpoint_from_tinker_path(sampler_ckpt.path).result()
    remaining = [c.tinker_path for c in rest.list_checkpoints(model_id).result().checkpoints]
    assert sampler_ckpt.path not in remaining and state.path in remaining
    with pytest.raises(tinker.NotFoundError):
        rest.delete_checkpoint_from_tinker_path(sampler_ckpt.path).result()


def _base_url() -> str:
    from api.config import get_api_settings

    api = get_api_settings()
    return f"http://{api.api_host}:{api.api_port}"


def test_finishing_a_tinker_session_stops_its_runs_and_releases_their_engines(
    services: Settings, api_key: str
) -> None:
    client = tinker.ServiceClient(base_url=_base_url(), api_key=api_key)
    training = client.create_lora_training_client(base_model=TINY, rank=0).result()
    training.forward([_datum([BOS, 97, 98], weights=[1.0, 1.0])], "cross_entropy").result()
    model_id = training.model_id
    run_id, session_id = ids.run_id_of(model_id), model_id.split(":")[0]

    client.close("success").result()  # the SDK's finish_session

    stopped = until(
        lambda: query(
            services,
            "select stop_reason from {schema}.runs where run_id = %s and status = 'stopped'",
            run_id,
        ),
        "the run stopped",
        timeout_s=WAIT_S,
    )
    assert "tinker session finished" in stopped[0]["stop_reason"]
    released = until(
        lambda: query(
            services,
            "select payload from {schema}.event_log where aggregate_id = %s "
            "and type = 'TrainerReleased'",
            run_id,
        ),
        "the trainer engine released",
        timeout_s=WAIT_S,
    )
    assert len(released) == 1
    # The SDK stops its heartbeat loop on a 410.
    beat = httpx.post(
        f"{_base_url()}/api/v1/session_heartbeat",
        json={"session_id": session_id},
        headers={"X-API-Key": api_key},
    )
    assert beat.status_code == 410


def _restart_api(settings: Settings) -> None:
    """Restart only the API service (SIGTERM, then `services up`)."""
    from infra.processes import StackError
    from infra.services import SERVICES, _process, services_up

    process = _process(settings, next(s for s in SERVICES if s.name == "api"))
    pid = process.pid()
    assert pid is not None
    os.kill(pid, signal.SIGTERM)
    until(lambda: process.pid() is None, "the API to stop", timeout_s=60)
    with contextlib.suppress(StackError):  # a slow start on a busy machine: wait below
        services_up(settings)
    until(lambda: _answers(f"{_base_url()}/openapi.json"), "the API to answer", timeout_s=180)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.timeout(600)
def test_weights_only_load_and_seq_order_survive_an_api_restart(
    services: Settings, training_client: tinker.TrainingClient, api_key: str
) -> None:
    datum = _datum([BOS, 80, 81, 82], weights=[1.0] * 3)
    state = training_client.save_state("restart-1").result()
    expected = training_client.forward([datum], "cross_entropy").result().metrics["loss:sum"]
    session_id = training_client.model_id.split(":")[0]
    headers = {"X-API-Key": api_key}
    posted = httpx.post(
        f"{_base_url()}/api/v1/load_weights",
        json={"path": state.path, "optimizer": False, "session_id": session_id,
              "model_seq_id": 900 + int(time.time()) % 1000},
        headers=headers,
    )  # fmt: skip
    assert posted.status_code == 200, posted.text
    future = posted.json()

    _restart_api(services)  # nothing of the pending load is left in API memory

    def answer() -> dict[str, Any] | None:
        body = httpx.post(
            f"{_base_url()}/api/v1/retrieve_future",
            json={"request_id": future["request_id"]},
            headers=headers,
            timeout=60,
        ).json()
        return None if body.get("type") == "try_again" else body

    body = until(answer, "the weights-only load's future", timeout_s=180)
    assert body == {"model_id": future["model_id"]}
    # The future may come from the result feed before the futures table has the row.
    load = until(lambda: query(
        services, "select status, command_type, output from {schema}.command_results "
        "where command_id = %s", future["request_id"]),
        "the load's row in the futures table", timeout_s=30)  # fmt: skip
    assert load[0]["status"] == "accepted" and load[0]["command_type"] == "LoadState"
    assert load[0]["output"]["path"] == ids.bt_uri(state.path)

    # The training client carries on with its next seq_ids on the new API process: the gate
    # finds their predecessors answered in the log, and keeps their order.
    first = training_client.forward_backward([datum], "cross_entropy")
    step = training_client.optim_step(types.AdamParams(learning_rate=1e-2))
    after = training_client.forward([datum], "cross_entropy")
    assert first.result().metrics["loss:sum"] == pytest.approx(expected, rel=1e-6)
    step.result()
    assert after.result().metrics["loss:sum"] < expected
