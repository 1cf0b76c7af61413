"""Who may use the Tinker door, through the official `tinker` SDK (pinned, unchanged).

Only keys loopstream issued pass: an unissued `tml-...` key and a revoked one get the SDK's own
AuthenticationError (a 401). Training needs the `train` scope, sampling `infer` (a 403, the SDK's
PermissionDeniedError, naming the scope). A key of another workspace is given the default
workspace's model, checkpoints, sampler and futures and sees none of them: 404 (or the same 400
as for a path nobody saved). Keys and the second workspace are issued as the CLI issues them
(CreateWorkspace / CreateApiKey on the commands topic); the SDK talks to the running API.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import tinker
from tinker import types

from api.auth import parse_key
from api.bootstrap import issue_key, key_row_authenticates
from api.config import get_api_settings
from api.tinker import ids
from infra.settings import Settings
from tests.integration.kafka_helpers import create_workspace, until

TINY = "loopstream/tiny-llama"
BOS = 256  # the tiny model's byte vocabulary starts its specials here
WAIT_S = 60.0


def _base_url() -> str:
    return get_api_settings().base_url


def _until(check: Callable[[], Any], what: str) -> Any:
    return until(check, what, timeout_s=WAIT_S)


def _datum(tokens: list[int]) -> tinker.Datum:
    n = len(tokens) - 1
    return tinker.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": types.TensorData(data=tokens[1:], dtype="int64", shape=[n]),
            "weights": types.TensorData(data=[1.0] * n, dtype="float32", shape=[n]),
        },
    )


def _client(key: str) -> tinker.ServiceClient:
    return tinker.ServiceClient(base_url=_base_url(), api_key=key)


def _rest(key: str) -> tinker.RestClient:
    return tinker.RestClient(base_url=_base_url(), api_key=key)


@pytest.fixture(scope="module")
def other_workspace(services: Settings) -> str:
    return create_workspace(services, "tinker", "tinker access test")


@pytest.fixture(scope="module")
def other_key(services: Settings, other_workspace: str) -> str:
    """An admin key of a workspace of its own."""
    return issue_key(services, workspace_id=other_workspace, scopes=("admin",), name="other")


@pytest.fixture(scope="module")
def owned(api_key: str) -> Iterator[dict[str, Any]]:
    """A model of the default workspace with a state and a sampler checkpoint, and a future."""
    client = _client(api_key)
    training = client.create_lora_training_client(base_model=TINY, rank=0).result()
    training.forward_backward([_datum([BOS, 97, 98])], "cross_entropy").result()
    sampler_path = training.save_weights_for_sampler("access-1").result().path
    state_path = training.save_state("access-state").result().path
    sampling = client.create_sampling_client(model_path=sampler_path).result()
    # A future of this workspace, from the raw wire (the SDK keeps its request ids private).
    future = httpx.post(
        f"{_base_url()}/api/v1/optim_step",
        json={"model_id": training.model_id, "adam_params": {"learning_rate": 1e-3}},
        headers={"X-API-Key": api_key},
    )
    assert future.status_code == 200, future.text
    yield {
        "model_id": training.model_id,
        "sampler_path": sampler_path,
        "state_path": state_path,
        "sampling_session_id": sampling._sampling_session_id,
        "request_id": future.json()["request_id"],
    }
    client.close("success").result()


def test_an_unissued_tml_key_gets_the_sdks_authentication_error(services: Settings) -> None:
    made_up = "tml-0123456789abcdef_" + "x" * 43  # the form of a key, never issued
    for key in (made_up, "tml-loopstream-tests"):
        client = _client(key)
        with pytest.raises(tinker.AuthenticationError) as refused:
            client.create_lora_training_client(base_model=TINY, rank=0).result()
        assert refused.value.status_code == 401
        with pytest.raises(tinker.AuthenticationError):
            _rest(key).list_training_runs().result()
    assert "unknown or revoked API key" in str(refused.value) or "malformed" in str(refused.value)


def test_a_revoked_key_gets_the_sdks_authentication_error(services: Settings, api_key: str) -> None:
    key = issue_key(services, scopes=("train", "infer"), name="to revoke")
    client = _client(key)
    rest = _rest(key)
    assert rest.list_training_runs(limit=1).result().cursor.total_count >= 0

    key_id = parse_key(key)[0]  # type: ignore[index]
    revoked = httpx.delete(
        f"{_base_url()}/v1/api_keys/{key_id}", headers={"Authorization": f"Api-Key {api_key}"}
    )
    assert revoked.status_code == 202, revoked.text
    _until(lambda: not key_row_authenticates(services, key), "the revocation is projected")
    # The API reuses a key's row for at most api_key_cache_s (revocation within a second).
    time.sleep(get_api_settings().api_key_cache_s + 0.05)

    with pytest.raises(tinker.AuthenticationError) as refused:
        rest.list_training_runs(limit=1).result()
    assert "unknown or revoked API key" in str(refused.value)
    with pytest.raises(tinker.AuthenticationError):
        client.create_lora_training_client(base_model=TINY, rank=0).result()


@pytest.mark.parametrize("where", ["default", "own workspace"])
def test_an_issued_key_in_tinker_api_key_trains_and_samples(
    services: Settings, monkeypatch: pytest.MonkeyPatch, other_workspace: str, where: str
) -> None:
    workspace = other_workspace if where == "own workspace" else "default"
    key = issue_key(services, workspace_id=workspace, scopes=("train", "infer"))
    monkeypatch.setenv("TINKER_API_KEY", key)
    client = tinker.ServiceClient(base_url=_base_url())  # the key from the environment
    training = client.create_lora_training_client(base_model=TINY, rank=0).result()
    fb = training.forward_backward([_datum([BOS, 97, 97, 97])], "cross_entropy")
    step = training.optim_step(types.AdamParams(learning_rate=1e-2))
    assert fb.result().metrics["loss:sum"] > 0
    step.result()
    sampler = training.save_weights_and_get_sampling_client().result()
    out = sampler.sample(
        types.ModelInput.from_ints([BOS, 97]), 2, types.SamplingParams(max_tokens=4, seed=0)
    ).result()
    assert len(out.sequences) == 2 and all(len(s.tokens) > 0 for s in out.sequences)
    state = training.save_state("round-trip").result()
    again = client.create_training_client_from_state(state.path).result()
    assert again.forward([_datum([BOS, 97, 97])], "cross_entropy").result().metrics
    runs = _rest(key).list_training_runs(limit=1000).result().training_runs
    assert {training.model_id, again.model_id} <= {r.training_run_id for r in runs}
    assert {r.model_owner for r in runs} == {workspace}
    client.close("success").result()


def test_a_missing_scope_is_the_sdks_permission_error_naming_it(
    services: Settings, owned: dict[str, Any]
) -> None:
    infer_only = _client(issue_key(services, scopes=("infer",)))
    with pytest.raises(tinker.PermissionDeniedError) as no_train:
        infer_only.create_lora_training_client(base_model=TINY, rank=0).result()
    assert "`train`" in str(no_train.value)
    # ...while sampling the workspace's checkpoint is allowed.
    sampler = infer_only.create_sampling_client(model_path=owned["sampler_path"]).result()
    out = sampler.sample(
        types.ModelInput.from_ints([BOS]), 1, types.SamplingParams(max_tokens=2, seed=0)
    ).result()
    assert len(out.sequences) == 1

    train_only = _client(issue_key(services, scopes=("train",)))
    with pytest.raises(tinker.PermissionDeniedError) as no_infer:
        train_only.create_sampling_client(model_path=owned["sampler_path"]).result()
    assert "`infer`" in str(no_infer.value)


def test_another_workspace_sees_none_of_the_models_checkpoints_samplers_or_futures(
    services: Settings, api_key: str, owned: dict[str, Any], other_key: str
) -> None:
    model_id = owned["model_id"]
    client = _client(other_key)
    rest = _rest(other_key)

    # Through the SDK: the run and its checkpoints are not found; saved paths hold nothing.
    with pytest.raises(tinker.NotFoundError):
        rest.get_training_run(model_id).result()
    with pytest.raises(tinker.NotFoundError):
        rest.list_checkpoints(model_id).result()
    listed = rest.list_training_runs(limit=1000).result().training_runs
    assert model_id not in {r.training_run_id for r in listed}
    with pytest.raises(tinker.NotFoundError):
        rest.get_weights_info_by_tinker_path(owned["state_path"]).result()
    name = owned["sampler_path"].rsplit("/", 1)[1]
    with pytest.raises(tinker.NotFoundError):
        rest.get_external_weights_urls(f"tinker://{model_id}/external_weights/{name}").result()
    with pytest.raises(tinker.NotFoundError):
        rest.delete_checkpoint_from_tinker_path(owned["sampler_path"]).result()
    with pytest.raises(tinker.BadRequestError, match="no run holds"):
        client.create_training_client_from_state(owned["state_path"]).result()
    with pytest.raises(tinker.BadRequestError, match="no run holds"):
        client.create_sampling_client(model_path=owned["sampler_path"]).result()

    # On the wire: the model, its sampler, its future and its Tinker session.
    def post(path: str, body: dict[str, Any], key: str = other_key) -> httpx.Response:
        return httpx.post(
            f"{_base_url()}/api/v1/{path}", json=body, headers={"X-API-Key": key}, timeout=60
        )

    assert post("get_info", {"model_id": model_id}).status_code == 404
    optim = {"model_id": model_id, "seq_id": 1, "adam_params": {}}
    assert post("optim_step", optim).status_code == 404
    save = {"model_id": model_id, "seq_id": 1, "path": "stolen"}
    assert post("save_weights_for_sampler", save).status_code == 404
    sampler = httpx.get(
        f"{_base_url()}/api/v1/samplers/{owned['sampling_session_id']}",
        headers={"X-API-Key": other_key},
    )
    assert sampler.status_code == 404
    sample = {"sampling_session_id": owned["sampling_session_id"], "prompt": {"chunks": []}}
    assert post("asample", sample).status_code == 400  # as for a sampling session with no run
    assert post("retrieve_future", {"request_id": owned["request_id"]}).status_code == 404
    # Its Tinker session: no heartbeat, no model made in it, no finish.
    tinker_session = model_id.split(":")[0]
    assert post("session_heartbeat", {"session_id": tinker_session}).status_code == 404
    squat = {"session_id": tinker_session, "model_seq_id": 99, "base_model": TINY}
    assert post("create_model", squat).status_code == 404
    assert post(f"sessions/{tinker_session}/finish", {}).status_code == 404

    # The owner still has all of it.
    assert post("get_info", {"model_id": model_id}, api_key).status_code == 200
    assert post("session_heartbeat", {"session_id": tinker_session}, api_key).status_code == 200
    assert post("retrieve_future", {"request_id": owned["request_id"]}, api_key).status_code == 200
    mine = _rest(api_key)
    assert mine.get_training_run(model_id).result().training_run_id == model_id
    assert ids.tinker_path(ids.bt_uri(owned["sampler_path"])) in {
        c.tinker_path for c in mine.list_checkpoints(model_id).result().checkpoints
    }
