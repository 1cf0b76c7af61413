"""A Tinker future answers the same wherever it is resolved from.

`retrieve_future` finds a result in the API process's own result feed (Kafka, in memory) or, when
the process did not see it (restarted, or another API process sent the request), in the futures
table (PostgreSQL). These tests submit every kind of request with the SDK's own wire format (the
`tinker` SDK's request types and resources, unchanged) to a second API process of their own, on
the shared stack, and restart that process between submit and retrieve: the answer from the table
must be byte for byte the answer from the feed. The shared API is never restarted here.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

import httpx
import pytest
from tinker import types
from tinker._client import AsyncTinker
from tinker.proto.response_conv import (
    deserialize_forward_backward_output,
    deserialize_sample_response,
)

from api.queries import ReadModels
from api.tinker.routes import WEIGHTS_ONLY, _tinker_response
from infra.settings import REPO_ROOT, Settings
from projections.db import get_engine
from tests.integration.kafka_helpers import read_results, until

TINY = "loopstream/tiny-llama"
BOS = 256  # the tiny model's byte vocabulary starts its specials here
T = TypeVar("T")


class SecondApi:
    """`python -m api.app` on a free port of its own, against the same stack as the shared one."""

    def __init__(self, log_path: str) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {
            **os.environ,
            "LOOPSTREAM_API_HOST": "127.0.0.1",
            "LOOPSTREAM_API_PORT": str(self.port),
        }
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "api.app"], cwd=REPO_ROOT, env=env, stdout=log, stderr=log
            )
        until(self._answers, f"the second API on port {self.port} to answer", timeout_s=120)

    def kill(self) -> None:
        """SIGKILL: nothing of what it held in memory survives, nothing is flushed on the way."""
        if self.process is not None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(30)
            self.process = None

    def restart(self) -> None:
        self.kill()
        self.start()

    def _answers(self) -> bool:
        assert self.process is not None and self.process.poll() is None, "second API died"
        try:
            return httpx.get(f"{self.url}/openapi.json", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False


@pytest.fixture(scope="module")
def api2(services: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecondApi]:
    api = SecondApi(str(tmp_path_factory.mktemp("api2") / "api.log"))
    api.start()
    yield api
    api.kill()


def _sdk_call(api: SecondApi, api_key: str, call: Callable[[AsyncTinker], Awaitable[T]]) -> T:
    """One request through the SDK's own resource (its serialization, headers and retries)."""

    async def run() -> T:
        client = AsyncTinker(base_url=api.url, api_key=api_key)
        try:
            return await call(client)
        finally:
            await client.close()

    return asyncio.run(run())


def _retrieve(api: SecondApi, api_key: str, request_id: str) -> httpx.Response:
    """The future's answer as the SDK receives it (its retrieve_future body), try_again waited."""

    def answer() -> httpx.Response | None:
        response = httpx.post(
            f"{api.url}/api/v1/retrieve_future",
            json={"request_id": request_id},
            headers={"X-API-Key": api_key},
            timeout=90,
        )
        assert response.status_code == 200, response.text
        is_json = response.headers["content-type"].startswith("application/json")
        return None if is_json and response.json().get("type") == "try_again" else response

    return until(answer, f"the future {request_id}", timeout_s=180)


def _datum(tokens: list[int]) -> types.Datum:
    n = len(tokens) - 1
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": types.TensorData(data=tokens[1:], dtype="int64", shape=[n]),
            "weights": types.TensorData(data=[1.0] * n, dtype="float32", shape=[n]),
        },
    )


def _session(api: SecondApi, api_key: str) -> str:
    created = _sdk_call(
        api,
        api_key,
        lambda c: c.service.create_session(
            request=types.CreateSessionRequest(tags=[], user_metadata=None, sdk_version="0.38")
        ),
    )
    return created.session_id


def _submit_every_kind(api: SecondApi, api_key: str) -> dict[str, str]:
    """One request of each kind the futures answer, in the SDK's wire format: kind -> request id."""
    session_id = _session(api, api_key)
    created = _sdk_call(
        api,
        api_key,
        lambda c: c.models.create(
            request=types.CreateModelRequest(
                session_id=session_id,
                model_seq_id=0,
                base_model=TINY,
                lora_config=types.LoraConfig(rank=0),
            )
        ),
    )
    model_id = f"{session_id}:train:0"
    futures = {"create_model": created.request_id}
    _retrieve(api, api_key, created.request_id)  # the run exists before its first request

    batch = [_datum([BOS, 97, 98, 99, 100])]
    futures["forward_backward"] = _sdk_call(
        api,
        api_key,
        lambda c: c.training.forward_backward(
            request=types.ForwardBackwardRequest(
                forward_backward_input=types.ForwardBackwardInput(
                    data=batch, loss_fn="cross_entropy"
                ),
                model_id=model_id,
                seq_id=1,
            )
        ),
    ).request_id
    futures["optim_step"] = _sdk_call(
        api,
        api_key,
        lambda c: c.training.optim_step(
            request=types.OptimStepRequest(
                optim_params=types.AdamParams(learning_rate=1e-2), model_id=model_id, seq_id=2
            )
        ),
    ).request_id
    futures["forward"] = _sdk_call(
        api,
        api_key,
        lambda c: c.training.forward_backward(
            request=types.ForwardBackwardRequest(
                forward_backward_input=types.ForwardBackwardInput(
                    data=batch, loss_fn="cross_entropy"
                ),
                model_id=model_id,
                seq_id=3,
            ),
            forward_only=True,
        ),
    ).request_id
    futures["save_weights_for_sampler"] = _sdk_call(
        api,
        api_key,
        lambda c: c.weights.save_for_sampler(
            request=types.SaveWeightsForSamplerRequest(
                model_id=model_id, path="futures-sampler", seq_id=4
            )
        ),
    ).request_id
    futures["save_weights"] = _sdk_call(
        api,
        api_key,
        lambda c: c.weights.save(
            request=types.SaveWeightsRequest(model_id=model_id, path="futures-state", seq_id=5)
        ),
    ).request_id
    state_path = f"tinker://{model_id}/weights/futures-state"
    futures["load_weights"] = _sdk_call(
        api,
        api_key,
        lambda c: c.weights.load(
            request=types.LoadWeightsRequest(
                model_id=model_id, path=state_path, optimizer=True, seq_id=6
            )
        ),
    ).request_id
    # A load of a checkpoint nobody saved: the worker's refusal is the future's answer.
    futures["load_weights_refused"] = _sdk_call(
        api,
        api_key,
        lambda c: c.weights.load(
            request=types.LoadWeightsRequest(
                model_id=model_id,
                path=f"tinker://{model_id}/weights/never-saved",
                optimizer=False,
                seq_id=7,
            )
        ),
    ).request_id
    # create_training_client_from_state: a new run from the state (its future is the CreateRun's),
    # and the weights-only variant (a future derived from it, resolved from log and read models).
    for seq, optimizer in ((1, True), (2, False)):
        futures[f"load_weights_new_run_optimizer_{optimizer}"] = _sdk_call(
            api,
            api_key,
            lambda c, seq=seq, optimizer=optimizer: c.weights.load(
                request=types.LoadWeightsRequest(
                    session_id=session_id, model_seq_id=seq, path=state_path, optimizer=optimizer
                )
            ),
        ).request_id

    _retrieve(api, api_key, futures["save_weights_for_sampler"])  # the sampler finds it
    sampling = _sdk_call(
        api,
        api_key,
        lambda c: c.service.create_sampling_session(
            request=types.CreateSamplingSessionRequest(
                session_id=session_id,
                sampling_session_seq_id=0,
                model_path=f"tinker://{model_id}/sampler_weights/futures-sampler",
            )
        ),
    )
    futures["sample"] = _sdk_call(
        api,
        api_key,
        lambda c: c.sampling.asample(
            request=types.SampleRequest(
                sampling_session_id=sampling.sampling_session_id,
                seq_id=1,
                num_samples=2,
                prompt=types.ModelInput.from_ints([BOS, 97, 98]),
                sampling_params=types.SamplingParams(max_tokens=4, seed=3),
                prompt_logprobs=True,
            )
        ),
    ).request_id
    return futures


def _in_table(settings: Settings, request_ids: list[str]) -> bool:
    with get_engine(settings).connect() as conn:
        reads = ReadModels(conn, settings.read_schema)
        return all(reads.command_result_exists(r) for r in request_ids)


def _decoded(kind: str, response: httpx.Response) -> object:
    """The answer as the SDK reads it (its own protobuf decoders), for a field-by-field diff."""
    if response.headers["content-type"] != "application/x-protobuf":
        return response.json()
    decode = (
        deserialize_sample_response if kind == "sample" else deserialize_forward_backward_output
    )
    return repr(decode(response.content))  # SDK dataclasses; repr also equates NaN with NaN


@pytest.mark.timeout(600)
def test_every_future_answers_the_same_from_postgresql_as_from_the_result_feed(
    services: Settings, api_key: str, api2: SecondApi
) -> None:
    futures = _submit_every_kind(api2, api_key)
    from_feed = {kind: _retrieve(api2, api_key, rid) for kind, rid in futures.items()}
    refused = from_feed["load_weights_refused"].json()
    assert refused["category"] == "user" and "never-saved" in refused["error"], refused
    until(lambda: _in_table(services, list(futures.values())), "the futures table", timeout_s=60)

    api2.restart()  # its result feed starts at the end of the topic: every answer is the table's

    for kind, request_id in futures.items():
        from_table = _retrieve(api2, api_key, request_id)
        expected = from_feed[kind]
        assert from_table.headers["content-type"] == expected.headers["content-type"], kind
        assert _decoded(kind, from_table) == _decoded(kind, expected), kind
        assert from_table.content == expected.content, kind


@pytest.mark.timeout(600)
def test_a_future_pending_across_an_api_restart_resolves_from_postgresql(
    services: Settings, api_key: str, api2: SecondApi
) -> None:
    """Submitted, then the API killed before anyone retrieved it: the new process never saw the
    result on its feed, and answers from the table what the feed's copy of the result gives."""
    session_id = _session(api2, api_key)
    created = _sdk_call(
        api2,
        api_key,
        lambda c: c.models.create(
            request=types.CreateModelRequest(
                session_id=session_id, model_seq_id=0, base_model=TINY,
                lora_config=types.LoraConfig(rank=0),
            )
        ),
    )  # fmt: skip
    api2.kill()
    api2.start()
    model = _retrieve(api2, api_key, created.request_id)
    assert model.json() == {"model_id": f"{session_id}:train:0"}

    forward = _sdk_call(
        api2,
        api_key,
        lambda c: c.training.forward_backward(
            request=types.ForwardBackwardRequest(
                forward_backward_input=types.ForwardBackwardInput(
                    data=[_datum([BOS, 70, 71, 72])], loss_fn="cross_entropy"
                ),
                model_id=f"{session_id}:train:0",
                seq_id=1,
            ),
            forward_only=True,
        ),
    ).request_id
    api2.kill()
    until(lambda: _in_table(services, [forward]), "the forward's row", timeout_s=60)
    api2.start()
    from_table = _retrieve(api2, api_key, forward)
    assert from_table.headers["content-type"] == "application/x-protobuf"
    on_kafka = read_results(services)[forward]
    assert from_table.content == _tinker_response(on_kafka).body
    output = deserialize_forward_backward_output(from_table.content)
    assert output.metrics["loss:sum"] > 0 and len(output.loss_fn_outputs) == 1


def test_the_feed_and_the_table_hold_the_same_result_for_every_tinker_future(
    services: Settings, api_key: str, api2: SecondApi
) -> None:
    """The two copies of each result (the command-results topic, the futures table) are equal
    field for field, and the same code turns them into the same bytes: the projection loses or
    changes nothing that a future's answer is made of."""
    futures = _submit_every_kind(api2, api_key)
    for request_id in futures.values():
        _retrieve(api2, api_key, request_id)
    # A weights-only load's future is the id of its LoadState, which follows its CreateRun.
    command_ids = {*futures.values()} | {
        r.removesuffix(WEIGHTS_ONLY) for r in futures.values() if r.endswith(WEIGHTS_ONLY)
    }
    until(lambda: _in_table(services, list(futures.values())), "the futures table", timeout_s=60)
    on_kafka = read_results(services)
    with get_engine(services).connect() as conn:
        reads = ReadModels(conn, services.read_schema)
        for command_id in command_ids:
            feed = on_kafka[command_id]
            table = reads.command_result(command_id, workspace=feed.workspace_id or "")
            assert table == feed, command_id
            assert _tinker_response(table).body == _tinker_response(feed).body, command_id
