"""The rest of the SDK 0.38 table through the official `tinker` SDK (pinned, unchanged) against
the running stack: load_state_with_optimizer, sampler handles and base models, get_sampler,
get_training_run_by_tinker_path, delete_checkpoint by id, RestClient.get_server_capabilities,
and the RestClient's sessions, checkpoint storage usage and audit log.

Everything runs in a workspace of its own, so listings, storage sums and the audit log hold
this module's doings only; a second workspace checks that none of it shows there.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
import tinker
from tinker import types

from api.bootstrap import issue_key
from api.config import get_api_settings
from infra.settings import Settings
from tests.integration.kafka_helpers import create_workspace

TINY = "loopstream/tiny-llama"
BOS = 256  # the tiny model's byte vocabulary starts its specials here
ADAM = types.AdamParams(learning_rate=1e-2)


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


@pytest.fixture(autouse=True)
def _quiet_sdk_warnings() -> Iterator[None]:
    # RestClient's admin calls are deprecated in 0.38 (AdminClient is the same route) and
    # search_sessions is experimental: both still send the request under test.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", tinker.ExperimentalWarning)
        yield


@pytest.fixture(scope="module")
def workspace(services: Settings) -> str:
    return create_workspace(services, "tinker-more", "tinker rest more test")


@pytest.fixture(scope="module")
def key(services: Settings, workspace: str) -> str:
    return issue_key(services, workspace_id=workspace, scopes=("admin",), name="more")


@pytest.fixture(scope="module")
def other_key(services: Settings) -> str:
    other = create_workspace(services, "tinker-more-other", "tinker rest more other")
    return issue_key(services, workspace_id=other, scopes=("admin",), name="other")


@pytest.fixture(scope="module")
def client(key: str) -> Iterator[tinker.ServiceClient]:
    service = tinker.ServiceClient(
        base_url=_base_url(),
        api_key=key,
        user_metadata={"team": "rl", "run": "more-1"},
        display_name="Nightly sweep Alpha",
    )
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
    return client.create_lora_training_client(base_model=TINY, rank=0).result()


def _loss(training: tinker.TrainingClient, datum: tinker.Datum) -> float:
    return float(training.forward([datum], "cross_entropy").result().metrics["loss:sum"])


def _step(training: tinker.TrainingClient, datum: tinker.Datum) -> None:
    training.forward_backward([datum], "cross_entropy")
    training.optim_step(ADAM).result()


def _session_id(client: tinker.ServiceClient) -> str:
    return client.holder.get_session_id()


# --- training and sampling clients ---------------------------------------------------------------


def test_load_state_with_optimizer_resumes_adam_where_it_was_saved(
    training: tinker.TrainingClient,
) -> None:
    datum = _datum([BOS, 80, 81, 82, 83])
    _step(training, datum)  # Adam's moments are no longer zero
    state = training.save_state("opt-1").result()
    saved = _loss(training, datum)
    _step(training, datum)
    after_one_step = _loss(training, datum)
    _step(training, datum)  # wander off

    loaded = training.load_state_with_optimizer(state.path).result()
    assert loaded.path == state.path
    assert _loss(training, datum) == pytest.approx(saved, rel=1e-6)
    _step(training, datum)
    # The same step as right after the save: weights and moments both came back.
    assert _loss(training, datum) == pytest.approx(after_one_step, rel=1e-5)

    # Weights alone: the step from the same weights goes elsewhere (other moments).
    training.load_state(state.path).result()
    assert _loss(training, datum) == pytest.approx(saved, rel=1e-6)
    _step(training, datum)
    assert _loss(training, datum) != pytest.approx(after_one_step, rel=1e-5)


def test_a_sampler_knows_its_base_model_and_its_handle_restores_it_in_another_client(
    client: tinker.ServiceClient,
    training: tinker.TrainingClient,
    rest: tinker.RestClient,
    key: str,
) -> None:
    path = training.save_weights_for_sampler("handle-1").result().path
    sampler = client.create_sampling_client(model_path=path)
    # get_base_model: the SDK asked GET /samplers/{id} when it made the client from a path.
    assert sampler.get_base_model() == TINY
    assert client.create_sampling_client(base_model=TINY).get_base_model() == TINY

    handle = sampler.get_sampler_handle()
    assert key not in handle  # the handle carries no credentials
    restored = tinker.SamplingClient.from_sampler_handle(handle, api_key=key)
    assert restored.get_base_model() == TINY
    prompt = types.ModelInput.from_ints([BOS, 104, 105])
    params = types.SamplingParams(max_tokens=6, temperature=1.0, seed=11)
    first = sampler.sample(prompt, num_samples=2, sampling_params=params).result()
    again = restored.sample(prompt, num_samples=2, sampling_params=params).result()
    assert [s.tokens for s in again.sequences] == [s.tokens for s in first.sequences]


def test_get_sampler_names_the_base_model_and_path_for_its_workspace_only(
    client: tinker.ServiceClient,
    training: tinker.TrainingClient,
    rest: tinker.RestClient,
    other_rest: tinker.RestClient,
) -> None:
    path = training.save_weights_for_sampler("get-sampler-1").result().path
    client.create_sampling_client(model_path=path).result()
    samplers = rest.get_session(_session_id(client)).result().sampler_ids
    pinned = [s for s in samplers if "~sampler_weights~get-sampler-1~" in s]
    assert len(pinned) == 1
    got = rest.get_sampler(pinned[0]).result()
    assert (got.sampler_id, got.base_model, got.model_path) == (pinned[0], TINY, path)
    with pytest.raises(tinker.NotFoundError):
        other_rest.get_sampler(pinned[0]).result()


def test_get_training_run_by_tinker_path_is_the_run_of_the_path(
    training: tinker.TrainingClient, rest: tinker.RestClient, other_rest: tinker.RestClient
) -> None:
    path = training.save_state("by-path-1").result().path
    by_path = rest.get_training_run_by_tinker_path(path).result()
    assert by_path == rest.get_training_run(training.model_id).result()
    assert by_path.training_run_id == training.model_id
    assert by_path.last_checkpoint is not None
    with pytest.raises(tinker.NotFoundError):
        other_rest.get_training_run_by_tinker_path(path).result()


def test_delete_checkpoint_by_id_removes_it_and_a_second_delete_is_404(
    training: tinker.TrainingClient, rest: tinker.RestClient, other_rest: tinker.RestClient
) -> None:
    training.save_state("doomed-1").result()
    ids = [c.checkpoint_id for c in rest.list_checkpoints(training.model_id).result().checkpoints]
    assert "weights/doomed-1" in ids
    with pytest.raises(tinker.NotFoundError):
        other_rest.delete_checkpoint(training.model_id, "weights/doomed-1").result()

    rest.delete_checkpoint(training.model_id, "weights/doomed-1").result()
    ids = [c.checkpoint_id for c in rest.list_checkpoints(training.model_id).result().checkpoints]
    assert "weights/doomed-1" not in ids
    with pytest.raises(tinker.NotFoundError):
        rest.delete_checkpoint(training.model_id, "weights/doomed-1").result()


def test_rest_client_server_capabilities_list_the_tiny_model(rest: tinker.RestClient) -> None:
    models = rest.get_server_capabilities().result().supported_models
    assert TINY in [m.model_name for m in models]


# --- sessions --------------------------------------------------------------------------------


def test_get_session_lists_its_training_runs_and_samplers_with_its_metadata(
    client: tinker.ServiceClient,
    training: tinker.TrainingClient,
    rest: tinker.RestClient,
    other_rest: tinker.RestClient,
) -> None:
    second = client.create_lora_training_client(base_model=TINY, rank=0).result()
    quick = training.save_weights_and_get_sampling_client().result()
    base = client.create_sampling_client(base_model=TINY).result()

    session = rest.get_session(_session_id(client)).result()
    assert session.training_run_ids[:1] == [training.model_id]
    assert second.model_id in session.training_run_ids
    assert all(":train:" in m and "-smp" not in m for m in session.training_run_ids)
    # The sampling session ids the SDK's clients hold (its handle carries the same id).
    handed_out = {quick._sampling_session_id, base._sampling_session_id}
    assert handed_out <= set(session.sampler_ids)
    assert session.user_metadata == {"team": "rl", "run": "more-1"}
    assert session.display_name == "Nightly sweep Alpha"

    with pytest.raises(tinker.NotFoundError):
        other_rest.get_session(_session_id(client)).result()
    with pytest.raises(tinker.NotFoundError):
        rest.get_session("nosuchsession").result()


def test_list_sessions_pages_newest_first_through_the_workspace_only(
    key: str, rest: tinker.RestClient, other_rest: tinker.RestClient
) -> None:
    made = []
    for _ in range(3):
        service = tinker.ServiceClient(base_url=_base_url(), api_key=key)
        made.append(_session_id(service))
        service.close("success").result()
    newest_first = list(reversed(made))
    page_one = rest.list_sessions(limit=2).result().sessions
    page_two = rest.list_sessions(limit=2, offset=2).result().sessions
    assert page_one == newest_first[:2]
    assert page_two[:1] == newest_first[2:]
    assert rest.list_sessions(limit=2, access_scope="accessible").result().sessions == page_one
    others = other_rest.list_sessions(limit=1000).result().sessions
    assert not set(made) & set(others)


def test_search_sessions_filters_and_pages_with_the_cursor(
    key: str, rest: tinker.RestClient, other_rest: tinker.RestClient, workspace: str
) -> None:
    def make(name: str, metadata: dict[str, str]) -> tinker.ServiceClient:
        service = tinker.ServiceClient(
            base_url=_base_url(), api_key=key, display_name=name, user_metadata=metadata
        )
        _session_id(service)  # the SDK creates its session on first use: now, in this order
        return service

    red = make("Search Red fox", {"color": "red", "batch": "s1"})
    blue = make("search blue whale", {"color": "blue", "batch": "s1"})
    green = make("green search FOX", {"color": "green", "batch": "s1"})
    red_id, blue_id, green_id = (_session_id(c) for c in (red, blue, green))
    blue.close("errored", "blue broke").result()
    green.close("interrupted").result()

    def found(**fields: object) -> list[str]:
        fields.setdefault("user_metadata", {"batch": "s1"})  # this test's sessions only
        request = types.SessionSearchRequest(**fields)  # type: ignore[arg-type]
        return [s.session_id for s in rest.search_sessions(request).result().sessions]

    # Words each appear, in any case; session_id or display_name.
    assert found(display_name="FOX search") == [green_id, red_id]
    assert found(display_name="whale", session_id=red_id) == [blue_id, red_id]
    assert found(session_id=blue_id) == [blue_id]
    assert set(found(user_metadata={"batch": "s1", "color": "red"})) == {red_id}
    # Statuses: active (heartbeats, not closed), the client's close reason.
    assert found(statuses=[types.ActiveSessionStatusQuery()]) == [red_id]
    assert found(statuses=[types.ClientFinishedSessionStatusQuery()]) == [green_id, blue_id]
    finished = types.ClientFinishedSessionStatusQuery(reasons=["errored"])
    assert found(statuses=[finished]) == [blue_id]
    assert found(statuses=[types.FailedSessionStatusQuery()]) == []

    request = types.SessionSearchRequest(session_id=blue_id)
    (summary,) = rest.search_sessions(request).result().sessions
    assert summary.owner == workspace and summary.project_id == workspace
    assert summary.display_name == "search blue whale"
    assert summary.user_metadata == {"color": "blue", "batch": "s1"}
    assert summary.status == types.ClientSessionFinished(
        reason=types.ClientSessionFinishErrored(), detail="blue broke"
    )
    assert summary.checkpoints_count == 0 and summary.checkpoint_storage_bytes == 0

    # One per page, newest first, until next_cursor is None.
    request = types.SessionSearchRequest(user_metadata={"batch": "s1"}, limit=1)
    walked = []
    while True:
        page = rest.search_sessions(request).result()
        walked += [s.session_id for s in page.sessions]
        if page.next_cursor is None:
            break
        request = request.model_copy(update={"cursor": page.next_cursor})
    assert walked == [green_id, blue_id, red_id]

    # No projects here: the workspace is the only one; another name is not found.
    assert found(project_ids=[workspace]) == [green_id, blue_id, red_id]
    with pytest.raises(tinker.NotFoundError):
        found(project_ids=["someone-elses"])
    assert found(owner=types.UserSearchOwner(owner_urns=["someone-else"])) == []
    other = types.SessionSearchRequest(session_id=red_id, owner=types.AccessibleSearchOwner())
    assert other_rest.search_sessions(other).result().sessions == []
    red.close("success").result()


def test_a_session_summary_counts_the_live_checkpoints_of_its_runs(
    client: tinker.ServiceClient, training: tinker.TrainingClient, rest: tinker.RestClient
) -> None:
    request = types.SessionSearchRequest(session_id=_session_id(client))
    (summary,) = rest.search_sessions(request).result().sessions
    checkpoints = [
        c
        for model_id in rest.get_session(_session_id(client)).result().training_run_ids
        for c in rest.list_checkpoints(model_id).result().checkpoints
    ]
    assert summary.checkpoints_count == len(checkpoints) > 0
    assert summary.checkpoint_storage_bytes == sum(c.size_bytes or 0 for c in checkpoints)


# --- checkpoint storage and the audit log ----------------------------------------------------


def test_checkpoint_storage_usage_is_the_workspace_live_checkpoints(
    training: tinker.TrainingClient,
    rest: tinker.RestClient,
    other_rest: tinker.RestClient,
    workspace: str,
) -> None:
    training.save_state("storage-1").result()
    live = rest.list_user_checkpoints(limit=1000).result().checkpoints
    usage = rest.get_current_checkpoint_storage_usage().result()
    (item,) = usage.data
    assert item.project_id == workspace
    assert item.checkpoint_count == len(live)
    assert item.size_bytes == sum(c.size_bytes or 0 for c in live) > 0
    assert item.size_gigabytes == pytest.approx(item.size_bytes / 1e9)
    assert usage.effective_rate_usd_per_gigabyte_month is None  # loopstream bills nothing
    assert rest.get_current_checkpoint_storage_usage(project_id=workspace).result() == usage
    with pytest.raises(tinker.NotFoundError):
        rest.get_current_checkpoint_storage_usage(project_id="someone-elses").result()
    (theirs,) = other_rest.get_current_checkpoint_storage_usage().result().data
    assert theirs.checkpoint_count == 0


def test_audit_log_shows_the_workspace_checkpoint_and_key_events_of_the_day(
    services: Settings,
    training: tinker.TrainingClient,
    rest: tinker.RestClient,
    other_rest: tinker.RestClient,
    workspace: str,
) -> None:
    path = training.save_state("audited-1").result().path
    training.save_state("audited-gone").result()
    rest.delete_checkpoint(training.model_id, "weights/audited-gone").result()
    entries = rest.get_audit_log(event_type="checkpoints").result().entries
    saved = [e for e in entries if e.event == "checkpoint_saved" and e.tinker_path == path]
    assert len(saved) == 1
    assert saved[0].model_id == training.model_id
    assert saved[0].event_details["tinker_path"] == path
    assert saved[0].event_details["name"] == "audited-1"
    deleted = [e for e in entries if e.event == "checkpoint_deleted"]
    assert any(e.tinker_path and e.tinker_path.endswith("/weights/audited-gone") for e in deleted)
    assert [e.timestamp for e in entries] == sorted(e.timestamp for e in entries)

    organization = rest.get_audit_log(event_type="organizations").result().entries
    assert {"workspace_created", "api_key_created"} <= {e.event for e in organization}
    assert all("key_hash" not in e.event_details for e in organization)
    assert rest.get_audit_log(event_type="projects").result().entries == []
    everything = rest.get_audit_log().result().entries
    assert len(everything) == len(entries) + len(organization)
    yesterday = (datetime.now(UTC) - timedelta(days=1)).date()
    assert rest.get_audit_log(day=yesterday).result().entries == []

    theirs = other_rest.get_audit_log(event_type="checkpoints").result().entries
    assert not [e for e in theirs if e.tinker_path == path]
    trainer_only = issue_key(services, workspace_id=workspace, scopes=("train", "infer"))
    plain = tinker.RestClient(base_url=_base_url(), api_key=trainer_only)
    with pytest.raises(tinker.PermissionDeniedError):
        plain.get_audit_log().result()
