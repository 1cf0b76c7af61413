"""What a checkpoint carries and what publishing shares, through the official `tinker` SDK
(pinned, unchanged) against the running stack.

- A checkpoint's own `user_metadata` (save_state, save_weights_for_sampler; /v1/loops saves)
  travels SaveWeights -> RecordCheckpoint -> CheckpointSaved -> the checkpoints read model and
  comes back in every listing of it.
- `access_scope="accessible"` adds what another workspace published (the checkpoint, and the run
  holding it, read only) to what the caller owns; an unpublished one stays a 404.
- A published sampler checkpoint of another workspace can be sampled: the caller's workspace gets
  a sampler of its own for it, and unpublishing stops new sampling sessions on it.

Each test works in workspaces of its own: the owner's and a second one's.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import tinker
from tinker import types

from api.bootstrap import issue_key
from api.config import get_api_settings
from api.tinker import ids
from infra.settings import Settings
from tests.integration.kafka_helpers import create_workspace, until

TINY = "loopstream/tiny-llama"
BOS = 256  # the tiny model's byte vocabulary starts its specials here
PROMPT = types.ModelInput.from_ints([BOS, 104, 105])
PARAMS = types.SamplingParams(max_tokens=8, temperature=1.0, seed=7)


def _base_url() -> str:
    return get_api_settings().base_url


def _datum(tokens: list[int]) -> tinker.Datum:
    n = len(tokens) - 1
    return tinker.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": types.TensorData(data=tokens[1:], dtype="int64", shape=[n]),
            "weights": types.TensorData(data=[1.0] * n, dtype="float32", shape=[n]),
        },
    )


@pytest.fixture(scope="module")
def key(services: Settings) -> str:
    workspace = create_workspace(services, "tinker-pub", "tinker published test")
    return issue_key(services, workspace_id=workspace, scopes=("admin",), name="owner")


@pytest.fixture(scope="module")
def other_key(services: Settings) -> str:
    workspace = create_workspace(services, "tinker-pub-other", "tinker published other")
    return issue_key(services, workspace_id=workspace, scopes=("admin",), name="other")


@pytest.fixture(scope="module")
def client(key: str) -> Iterator[tinker.ServiceClient]:
    service = tinker.ServiceClient(base_url=_base_url(), api_key=key)
    yield service
    service.close("success").result()


@pytest.fixture(scope="module")
def other(other_key: str) -> Iterator[tinker.ServiceClient]:
    service = tinker.ServiceClient(base_url=_base_url(), api_key=other_key)
    yield service
    service.close("success").result()


@pytest.fixture(scope="module")
def rest(key: str) -> tinker.RestClient:
    return tinker.RestClient(base_url=_base_url(), api_key=key)


@pytest.fixture(scope="module")
def other_rest(other_key: str) -> tinker.RestClient:
    return tinker.RestClient(base_url=_base_url(), api_key=other_key)


@pytest.fixture(scope="module")
def training(client: tinker.ServiceClient) -> tinker.TrainingClient:
    trained = client.create_lora_training_client(base_model=TINY, rank=0).result()
    trained.forward_backward([_datum([BOS, 97, 98, 99])], "cross_entropy").result()
    trained.optim_step(types.AdamParams(learning_rate=0.05)).result()
    return trained


def _checkpoints(key: str, **params: Any) -> list[dict[str, Any]]:
    """GET /api/v1/checkpoints by hand (the SDK 0.38 sends no access_scope there)."""
    answer = httpx.get(
        f"{_base_url()}/api/v1/checkpoints",
        params={"limit": 1000, **params},
        headers={"X-API-Key": key},
        timeout=60,
    )
    assert answer.status_code == 200, answer.text
    return answer.json()["checkpoints"]  # type: ignore[no-any-return]


# --- a checkpoint's own user_metadata ---------------------------------------------------------


def test_a_checkpoint_keeps_its_user_metadata_in_every_listing(
    training: tinker.TrainingClient, rest: tinker.RestClient
) -> None:
    state = training.save_state("meta-state", user_metadata={"renderer": "role_colon"}).result()
    sampler = training.save_weights_for_sampler(
        "meta-sampler", user_metadata={"step": "1", "eval": "good"}
    ).result()
    bare = training.save_state("meta-bare").result()
    expected = {
        state.path: {"renderer": "role_colon"},
        sampler.path: {"step": "1", "eval": "good"},
        bare.path: None,
    }

    listed = rest.list_checkpoints(training.model_id).result().checkpoints
    assert {c.tinker_path: c.user_metadata for c in listed if c.tinker_path in expected} == expected
    everywhere = rest.list_user_checkpoints(limit=1000).result().checkpoints
    assert {
        c.tinker_path: c.user_metadata for c in everywhere if c.tinker_path in expected
    } == expected
    run = rest.get_training_run(training.model_id).result()
    assert run.last_checkpoint is not None and run.last_checkpoint.tinker_path == bare.path
    assert run.last_checkpoint.user_metadata is None
    assert run.last_sampler_checkpoint is not None
    assert run.last_sampler_checkpoint.user_metadata == {"step": "1", "eval": "good"}


# (A value that is not a string the SDK refuses itself, before sending.)
@pytest.mark.parametrize(
    ("metadata", "field"),
    [
        ({"k": "x" * 1001}, "user_metadata.k"),
        ({f"k{i}": "v" for i in range(33)}, "user_metadata"),
    ],
)
def test_bad_checkpoint_user_metadata_is_a_400_naming_the_field(
    training: tinker.TrainingClient, metadata: dict[str, Any], field: str
) -> None:
    with pytest.raises(tinker.BadRequestError) as err:
        training.save_state("meta-bad", user_metadata=metadata).result()
    assert field in str(err.value)
    # The client's next request still goes through (the refused seq_id is passed).
    assert training.save_state(f"meta-after-{len(metadata)}").result().path


def test_loops_saves_keep_user_metadata_on_the_checkpoint(key: str) -> None:
    http = httpx.Client(
        base_url=f"{_base_url()}/v1/loops", headers={"Authorization": f"Api-Key {key}"}, timeout=60
    )

    def future(request_id: str) -> dict[str, Any]:
        answer = http.get(f"/futures/{request_id}", params={"wait": 30}).json()
        assert answer["status"] != "pending", answer
        return answer  # type: ignore[no-any-return]

    session = http.post("/sessions", json={"base_model": TINY}).json()
    assert future(session["request_id"])["status"] == "accepted"
    run = http.post("/runs", json={"session_id": session["session_id"], "max_seq_len": 64}).json()
    assert future(run["request_id"])["status"] == "accepted"
    saved = http.post(
        f"/runs/{run['run_id']}/save_weights",
        json={"name": "loops-meta", "user_metadata": {"dataset": "abc"}},
    )
    assert saved.status_code == 202, saved.text
    assert future(saved.json()["request_id"])["status"] == "accepted"
    uri = f"bt://loops:{run['run_id']}/weights/loops-meta"
    rows = until(
        lambda: [
            c for c in http.get(f"/runs/{run['run_id']}/checkpoints").json()["data"]
            if c["uri"] == uri
        ],
        "the checkpoint's row",
        timeout_s=60,
    )  # fmt: skip
    assert rows[0]["user_metadata"] == {"dataset": "abc"}
    one = http.get(f"/checkpoints/{rows[0]['checkpoint_id']}").json()
    assert one["user_metadata"] == {"dataset": "abc"}
    bad = http.post(
        f"/runs/{run['run_id']}/save_weights_for_sampler",
        json={"name": "loops-bad", "user_metadata": {"n": 1}},
    )
    assert bad.status_code == 422 and bad.json()["field"] == "user_metadata.n"


# --- access_scope="accessible" ---------------------------------------------------------------


def test_accessible_adds_published_checkpoints_and_their_runs_of_other_workspaces(
    training: tinker.TrainingClient,
    rest: tinker.RestClient,
    other_rest: tinker.RestClient,
    key: str,
    other_key: str,
) -> None:
    shared = training.save_weights_for_sampler(
        "scope-shared", user_metadata={"license": "mit"}
    ).result()
    rest.publish_checkpoint_from_tinker_path(shared.path).result()
    private = training.save_state("scope-private").result()
    model_id = training.model_id

    # Owned (the default): another workspace's run stays a 404, published or not.
    with pytest.raises(tinker.NotFoundError):
        other_rest.get_training_run(model_id).result()
    owned_runs = other_rest.list_training_runs(limit=1000).result().training_runs
    assert model_id not in {r.training_run_id for r in owned_runs}
    assert shared.path not in {c["tinker_path"] for c in _checkpoints(other_key)}

    # Accessible: the run of the published checkpoint, read only, showing that checkpoint only.
    run = other_rest.get_training_run(model_id, access_scope="accessible").result()
    assert run.training_run_id == model_id and run.model_owner != "default"
    assert run.last_sampler_checkpoint is not None
    assert run.last_sampler_checkpoint.tinker_path == shared.path
    assert run.last_sampler_checkpoint.public
    assert run.last_sampler_checkpoint.user_metadata == {"license": "mit"}
    assert run.last_checkpoint is None  # its unpublished state checkpoint stays hidden
    by_path = other_rest.get_training_run_by_tinker_path(
        shared.path, access_scope="accessible"
    ).result()
    assert by_path.training_run_id == model_id
    runs = other_rest.list_training_runs(limit=1000, access_scope="accessible").result()
    assert model_id in {r.training_run_id for r in runs.training_runs}
    assert runs.cursor is not None and runs.cursor.total_count >= len(runs.training_runs)
    listed = {c["tinker_path"]: c for c in _checkpoints(other_key, access_scope="accessible")}
    assert listed[shared.path]["public"] and listed[shared.path]["user_metadata"] == {
        "license": "mit"
    }
    assert private.path not in listed
    # The owner's own view is the same under both scopes for its own things.
    mine = {c["tinker_path"] for c in _checkpoints(key, access_scope="accessible")}
    assert {shared.path, private.path} <= mine
    # ...and still nothing else of the run: its listing, TTL, deletion stay the owner's.
    with pytest.raises(tinker.NotFoundError):
        other_rest.list_checkpoints(model_id).result()
    with pytest.raises(tinker.NotFoundError):
        other_rest.delete_checkpoint_from_tinker_path(shared.path).result()

    # Unpublished: gone from every accessible answer.
    rest.unpublish_checkpoint_from_tinker_path(shared.path).result()
    with pytest.raises(tinker.NotFoundError):
        other_rest.get_training_run(model_id, access_scope="accessible").result()
    runs = other_rest.list_training_runs(limit=1000, access_scope="accessible").result()
    assert model_id not in {r.training_run_id for r in runs.training_runs}
    assert shared.path not in {
        c["tinker_path"] for c in _checkpoints(other_key, access_scope="accessible")
    }


# --- sampling a published checkpoint of another workspace ------------------------------------


def _samples(sampler: tinker.SamplingClient) -> list[list[int]]:
    out = sampler.sample(PROMPT, num_samples=2, sampling_params=PARAMS).result()
    return [list(s.tokens) for s in out.sequences]


def _with_session_id(
    sampler: tinker.SamplingClient, sampling_session_id: str, key: str
) -> tinker.SamplingClient:
    """A client whose handle names another sampling session id (what a hand-made request
    could send)."""
    fields = json.loads(base64.urlsafe_b64decode(sampler.get_sampler_handle()))
    fields["sampling_session_id"] = sampling_session_id
    handle = base64.urlsafe_b64encode(json.dumps(fields).encode()).decode()
    return tinker.SamplingClient.from_sampler_handle(handle, api_key=key)


def test_another_workspace_samples_a_published_checkpoint_until_it_is_unpublished(
    client: tinker.ServiceClient,
    training: tinker.TrainingClient,
    rest: tinker.RestClient,
    other: tinker.ServiceClient,
    other_rest: tinker.RestClient,
    other_key: str,
) -> None:
    path = training.save_weights_for_sampler("sample-shared").result().path
    hidden = training.save_weights_for_sampler("sample-hidden").result().path
    owners = _samples(client.create_sampling_client(model_path=path).result())
    # The trained weights answer other tokens than the base model's: what follows tells them apart.
    assert owners != _samples(client.create_sampling_client(base_model=TINY).result())

    with pytest.raises(tinker.BadRequestError, match="no run holds"):
        other.create_sampling_client(model_path=path).result()

    rest.publish_checkpoint_from_tinker_path(path).result()
    theirs = other.create_sampling_client(model_path=path).result()
    # The same weights as the owner's sampler serves: the same tokens for the same seed.
    assert _samples(theirs) == owners
    assert theirs.get_base_model() == TINY
    sampling_id = json.loads(base64.urlsafe_b64decode(theirs.get_sampler_handle()))[
        "sampling_session_id"
    ]
    session = ids.SamplingSession.parse(sampling_id)
    assert session.checkpoint_uri == ids.bt_uri(path)
    # Served by a run (and sampler) of the caller's own workspace, not the owner's.
    assert session.run_id != ids.run_id_of(training.model_id)
    got = other_rest.get_sampler(sampling_id).result()
    assert (got.base_model, got.model_path) == (TINY, path)
    with pytest.raises(tinker.NotFoundError):
        rest.get_sampler(sampling_id).result()
    their_session = other.holder.get_session_id()
    assert sampling_id in other_rest.get_session(their_session).result().sampler_ids

    # The sampler worker loads only what the requester may use: naming an unpublished
    # checkpoint of the owner in a hand-made sampling session id is refused there.
    forged = ids.SamplingSession(session.run_id, ids.bt_uri(hidden), "forged").id
    with pytest.raises(tinker.RequestFailedError, match="does not exist"):
        _samples(_with_session_id(theirs, forged, other_key))

    rest.unpublish_checkpoint_from_tinker_path(path).result()
    with pytest.raises(tinker.BadRequestError, match="no run holds"):
        other.create_sampling_client(model_path=path).result()
    # A sampling session made while it was published may finish its work.
    assert _samples(theirs) == owners
