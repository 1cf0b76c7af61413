"""The RestClient's run metadata, TTL changes, workspace-wide listing and publishing, through
the official `tinker` SDK (pinned, unchanged) against the running stack, and the same commands
through /v1/loops.

Every change is a command on the checkpoint's session (SetCheckpointTtl, PublishCheckpoint,
UnpublishCheckpoint) whose event the projection shows before the SDK's call returns. Another
workspace gets a 404 for everything of a checkpoint but one thing publishing allows: starting a
training run from its path.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
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
WAIT_S = 60.0


def _base_url() -> str:
    return get_api_settings().base_url


def _until(check: Callable[[], Any], what: str, timeout_s: float = WAIT_S) -> Any:
    return until(check, what, timeout_s=timeout_s)


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
def client(services: Settings, api_key: str) -> Iterator[tinker.ServiceClient]:
    service = tinker.ServiceClient(base_url=_base_url(), api_key=api_key)
    yield service
    service.close("success").result()


@pytest.fixture(scope="module")
def rest(api_key: str) -> tinker.RestClient:
    return tinker.RestClient(base_url=_base_url(), api_key=api_key)


@pytest.fixture(scope="module")
def training(client: tinker.ServiceClient) -> tinker.TrainingClient:
    return client.create_lora_training_client(
        base_model=TINY, rank=0, user_metadata={"team": "rl", "experiment": "rest-1"}
    ).result()


@pytest.fixture(scope="module")
def other_key(services: Settings) -> str:
    """An admin key of a workspace of its own."""
    workspace = create_workspace(services, "tinker-rest", "tinker rest test")
    return issue_key(services, workspace_id=workspace, scopes=("admin",), name="other")


@pytest.fixture(scope="module")
def other(other_key: str) -> Iterator[tinker.ServiceClient]:
    service = tinker.ServiceClient(base_url=_base_url(), api_key=other_key)
    yield service
    service.close("success").result()


def _listed(rest: tinker.RestClient, path: str) -> types.Checkpoint | None:
    model_id = types.ParsedCheckpointTinkerPath.from_tinker_path(path).training_run_id
    found = [
        c for c in rest.list_checkpoints(model_id).result().checkpoints if c.tinker_path == path
    ]
    return found[0] if found else None


# --- user_metadata ----------------------------------------------------------------------------


def test_user_metadata_of_create_model_and_of_a_run_from_state_comes_back_on_the_run(
    client: tinker.ServiceClient, rest: tinker.RestClient, training: tinker.TrainingClient
) -> None:
    run = rest.get_training_run(training.model_id).result()
    assert run.user_metadata == {"team": "rl", "experiment": "rest-1"}
    listed = {
        r.training_run_id: r for r in rest.list_training_runs(limit=1000).result().training_runs
    }
    assert listed[training.model_id].user_metadata == {"team": "rl", "experiment": "rest-1"}

    training.forward_backward([_datum([BOS, 97, 98])], "cross_entropy").result()
    state = training.save_state("meta-state").result()
    resumed = client.create_training_client_from_state(
        state.path, user_metadata={"resumed_from": state.path}
    ).result()
    assert rest.get_training_run(resumed.model_id).result().user_metadata == {
        "resumed_from": state.path
    }
    plain = client.create_lora_training_client(base_model=TINY, rank=0).result()
    assert rest.get_training_run(plain.model_id).result().user_metadata is None


@pytest.mark.parametrize(
    ("metadata", "field"),
    [
        ({"n": 1}, "user_metadata.n"),
        ({"k": "x" * 1001}, "user_metadata.k"),
        ({f"k{i}": "v" for i in range(33)}, "user_metadata"),
    ],
)
def test_bad_user_metadata_is_a_400_naming_the_field(
    client: tinker.ServiceClient, metadata: dict[str, Any], field: str
) -> None:
    with pytest.raises(tinker.BadRequestError) as err:
        client.create_lora_training_client(
            base_model=TINY,
            rank=0,
            user_metadata=metadata,  # type: ignore[arg-type]
        ).result()
    assert field in str(err.value)


# --- TTL --------------------------------------------------------------------------------------


def test_set_checkpoint_ttl_moves_the_expiry_and_null_keeps_it_forever(
    rest: tinker.RestClient, training: tinker.TrainingClient
) -> None:
    saved = training.save_state("ttl-1", ttl_seconds=3600).result()
    before = _listed(rest, saved.path)
    assert before is not None and before.expires_at is not None

    started = datetime.now(UTC)
    rest.set_checkpoint_ttl_from_tinker_path(saved.path, 7 * 24 * 3600).result()
    moved = _listed(rest, saved.path)
    assert moved is not None and moved.expires_at is not None  # shown once the call returns
    expected = started + timedelta(days=7)
    assert abs((moved.expires_at - expected).total_seconds()) < 60

    rest.set_checkpoint_ttl_from_tinker_path(saved.path, None).result()
    kept = _listed(rest, saved.path)
    assert kept is not None and kept.expires_at is None


def test_a_ttl_out_of_bounds_is_a_400_naming_ttl_seconds(
    rest: tinker.RestClient, training: tinker.TrainingClient
) -> None:
    path = training.save_state("ttl-bounds").result().path
    for ttl in (0, 10 * 366 * 24 * 3600 + 1):
        with pytest.raises(tinker.BadRequestError, match="ttl_seconds"):
            rest.set_checkpoint_ttl_from_tinker_path(path, ttl).result()


def test_the_janitor_expires_a_checkpoint_at_its_new_ttl_and_not_at_the_old_one(
    rest: tinker.RestClient, training: tinker.TrainingClient
) -> None:
    shortened = training.save_state("ttl-short", ttl_seconds=3600).result()
    spared = training.save_state("ttl-spared", ttl_seconds=6).result()
    rest.set_checkpoint_ttl_from_tinker_path(spared.path, None).result()
    rest.set_checkpoint_ttl_from_tinker_path(shortened.path, 1).result()
    _until(lambda: _listed(rest, shortened.path) is None, "the shortened checkpoint to expire")
    time.sleep(8.0)  # past the spared one's old expiry, and the janitor's next turn
    assert _listed(rest, spared.path) is not None


# --- list_user_checkpoints --------------------------------------------------------------------


def test_list_user_checkpoints_pages_through_every_run_of_the_workspace_newest_first(
    rest: tinker.RestClient, other: tinker.ServiceClient, other_key: str
) -> None:
    # In a workspace of its own: nobody else's saves land between the listings.
    theirs = tinker.RestClient(base_url=_base_url(), api_key=other_key)
    first = other.create_lora_training_client(base_model=TINY, rank=0).result()
    second = other.create_lora_training_client(base_model=TINY, rank=0).result()
    first_path = first.save_state("everywhere-1").result().path
    second_path = second.save_weights_for_sampler("everywhere-2").result().path

    everything = theirs.list_user_checkpoints(limit=1000).result()
    paths = [c.tinker_path for c in everything.checkpoints]
    assert everything.cursor is not None and everything.cursor.total_count == len(paths)
    assert {first_path, second_path} <= set(paths)
    assert paths.index(second_path) < paths.index(first_path)  # newest first, across runs
    times = [c.time for c in everything.checkpoints]
    assert times == sorted(times, reverse=True)
    kinds = {c.tinker_path: c.checkpoint_type for c in everything.checkpoints}
    assert (kinds[first_path], kinds[second_path]) == ("training", "sampler")

    page = theirs.list_user_checkpoints(limit=1, offset=1).result()
    assert page.cursor is not None
    assert (page.cursor.offset, page.cursor.limit, page.cursor.total_count) == (1, 1, len(paths))
    assert [c.tinker_path for c in page.checkpoints] == paths[1:2]

    # The default workspace's listing holds none of them.
    mine = rest.list_user_checkpoints(limit=1000).result()
    assert {first_path, second_path}.isdisjoint({c.tinker_path for c in mine.checkpoints})
    with pytest.raises(tinker.UnprocessableEntityError, match="limit"):  # past 1000
        rest.list_user_checkpoints(limit=1001).result()


# --- publishing -------------------------------------------------------------------------------


def test_a_published_checkpoint_is_flagged_and_another_workspace_may_start_from_it_only(
    rest: tinker.RestClient,
    training: tinker.TrainingClient,
    other: tinker.ServiceClient,
    other_key: str,
) -> None:
    training.forward_backward([_datum([BOS, 97, 98])], "cross_entropy").result()
    state = training.save_state("shared-1").result()
    private = training.save_state("private-1").result()
    theirs = tinker.RestClient(base_url=_base_url(), api_key=other_key)

    # Unpublished: another workspace cannot start from it, nor see it.
    with pytest.raises(tinker.BadRequestError, match="no run holds"):
        other.create_training_client_from_state(state.path).result()
    with pytest.raises(tinker.NotFoundError):
        theirs.publish_checkpoint_from_tinker_path(state.path).result()

    rest.publish_checkpoint_from_tinker_path(state.path).result()
    listed = _listed(rest, state.path)
    assert listed is not None and listed.public
    assert _listed(rest, private.path).public is False  # type: ignore[union-attr]
    rest.publish_checkpoint_from_tinker_path(state.path).result()  # again: already so, a 200
    assert _listed(rest, state.path).public  # type: ignore[union-attr]

    # Published: another workspace reads its weights info and starts a run from it...
    assert theirs.get_weights_info_by_tinker_path(state.path).result().base_model == TINY
    started = other.create_training_client_from_state_with_optimizer(state.path).result()
    out = started.forward_backward([_datum([BOS, 97, 98])], "cross_entropy").result()
    assert out.metrics["loss:sum"] > 0
    assert theirs.get_training_run(started.model_id).result().model_owner != "default"
    # ...and nothing else: the run, its listings, TTL, deletion, publishing stay the owner's.
    with pytest.raises(tinker.NotFoundError):
        theirs.get_training_run(training.model_id).result()
    with pytest.raises(tinker.NotFoundError):
        theirs.list_checkpoints(training.model_id).result()
    with pytest.raises(tinker.NotFoundError):
        theirs.set_checkpoint_ttl_from_tinker_path(state.path, 60).result()
    with pytest.raises(tinker.NotFoundError):
        theirs.unpublish_checkpoint_from_tinker_path(state.path).result()
    with pytest.raises(tinker.NotFoundError):
        theirs.delete_checkpoint_from_tinker_path(state.path).result()
    with pytest.raises(tinker.BadRequestError, match="no run holds"):
        other.create_training_client_from_state(private.path).result()

    rest.unpublish_checkpoint_from_tinker_path(state.path).result()
    assert _listed(rest, state.path).public is False  # type: ignore[union-attr]
    rest.unpublish_checkpoint_from_tinker_path(state.path).result()  # already private: a 200
    with pytest.raises(tinker.BadRequestError, match="no run holds"):
        other.create_training_client_from_state(state.path).result()
    with pytest.raises(tinker.NotFoundError):
        theirs.get_weights_info_by_tinker_path(state.path).result()


# --- the same commands through /v1/loops --------------------------------------------------------


def _loops(key: str) -> httpx.Client:
    return httpx.Client(
        base_url=f"{_base_url()}/v1/loops", headers={"Authorization": f"Api-Key {key}"}, timeout=60
    )


def _future(http: httpx.Client, request_id: str) -> dict[str, Any]:
    answer = http.get(f"/futures/{request_id}", params={"wait": 30}).json()
    assert answer["status"] != "pending", answer
    return answer  # type: ignore[no-any-return]


def test_loops_runs_carry_user_metadata_and_checkpoints_take_ttl_and_publishing(
    api_key: str, other_key: str, training: tinker.TrainingClient
) -> None:
    http, theirs = _loops(api_key), _loops(other_key)
    session = http.post("/sessions", json={"base_model": TINY}).json()
    assert _future(http, session["request_id"])["status"] == "accepted"
    created = http.post(
        "/runs",
        json={"session_id": session["session_id"], "max_seq_len": 64,
              "user_metadata": {"owner": "loops-test"}},
    ).json()  # fmt: skip
    assert _future(http, created["request_id"])["status"] == "accepted"
    assert http.get(f"/runs/{created['run_id']}").json()["user_metadata"] == {"owner": "loops-test"}
    bad = http.post(
        "/runs",
        json={"session_id": session["session_id"], "max_seq_len": 64, "user_metadata": {"n": 1}},
    )
    assert bad.status_code == 422 and bad.json()["field"] == "user_metadata.n"

    # A checkpoint of the Tinker model, by its loops id.
    path = training.save_state("loops-1").result().path
    uri = ids.bt_uri(path)
    run_id = uri.removeprefix("bt://loops:").split("/")[0]
    [row] = [c for c in http.get(f"/runs/{run_id}/checkpoints").json()["data"] if c["uri"] == uri]
    checkpoint = f"/checkpoints/{row['checkpoint_id']}"

    ttl = http.put(f"{checkpoint}/ttl", json={"ttl_seconds": 86400})
    assert (
        ttl.status_code == 202 and _future(http, ttl.json()["request_id"])["status"] == "accepted"
    )
    shown = _until(lambda: http.get(checkpoint).json()["expires_at"], "the new expiry")
    assert datetime.fromisoformat(shown) > datetime.now(UTC) + timedelta(hours=23)
    out_of_bounds = http.put(f"{checkpoint}/ttl", json={"ttl_seconds": 0})
    assert out_of_bounds.status_code == 422 and out_of_bounds.json()["field"] == "ttl_seconds"
    assert theirs.put(f"{checkpoint}/ttl", json={"ttl_seconds": 60}).status_code == 404

    # Another workspace cannot start a run from it until it is published.
    their_session = theirs.post("/sessions", json={"base_model": TINY}).json()
    assert _future(theirs, their_session["request_id"])["status"] == "accepted"
    start = {"session_id": their_session["session_id"], "max_seq_len": 64, "from_checkpoint": uri}
    refused = theirs.post("/runs", json=start)
    assert refused.status_code == 404 and refused.json()["field"] == "from_checkpoint"
    assert theirs.post(f"{checkpoint}/publish").status_code == 404

    published = http.post(f"{checkpoint}/publish")
    assert _future(http, published.json()["request_id"])["status"] == "accepted"
    _until(lambda: http.get(checkpoint).json()["public"], "the checkpoint to show as public")
    again = _future(http, http.post(f"{checkpoint}/publish").json()["request_id"])
    assert again["status"] == "rejected" and again["field"] == "public"
    accepted = theirs.post("/runs", json=start)
    assert accepted.status_code == 202
    assert _future(theirs, accepted.json()["request_id"])["status"] == "accepted"
    assert theirs.get(checkpoint).status_code == 404  # the checkpoint itself stays the owner's

    unpublished = http.delete(f"{checkpoint}/publish")
    assert _future(http, unpublished.json()["request_id"])["status"] == "accepted"
    _until(lambda: http.get(checkpoint).json()["public"] is False, "the checkpoint to be private")
