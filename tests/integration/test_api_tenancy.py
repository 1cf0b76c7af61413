"""Tenancy of /v1/loops against the real stack: who may call, and what a workspace can see.

Two workspaces: `default` (an admin key of its own made here) owns a session, a run, a sampler
and a saved checkpoint; a fresh workspace with its own admin key is given those ids on every
read and write route and gets the same 404 as for an id nobody created. Keys are issued the way
the CLI issues them (CreateWorkspace / CreateApiKey on the commands topic), and the app runs
in-process against the running processor, projections and trainer worker.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.auth import parse_key
from api.bootstrap import issue_key
from api.submit import command_id_for
from events.audit import history
from events.envelope import DEFAULT_WORKSPACE
from infra.settings import Settings
from projections.check import check_against_log
from tests.integration.kafka_helpers import create_workspace, until

WAIT_S = 120.0  # the trainer worker may be restarting (shared services)
Json = dict[str, Any]


def _until(check: Callable[[], Any], what: str) -> Any:
    return until(check, what, timeout_s=WAIT_S)


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Api-Key {key}"}


@pytest.fixture(scope="module")
def app(settings: Settings, services: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as client:
        yield client


@pytest.fixture(scope="module")
def other_workspace(settings: Settings) -> str:
    return create_workspace(settings, "tenancy", "tenancy test")


@pytest.fixture(scope="module")
def keys(settings: Settings, app: TestClient, other_workspace: str) -> dict[str, tuple[str, str]]:
    """Keys by role: (key, key id). "own" and "infer" in default, "other" in a new workspace."""

    def issued(workspace: str, scopes: tuple[str, ...]) -> tuple[str, str]:
        # issue_key returns once the key authenticates (the check the API makes).
        key = issue_key(settings, workspace_id=workspace, scopes=scopes, name="tenancy test")
        return key, parse_key(key)[0]  # type: ignore[index]

    made = {
        "own": issued(DEFAULT_WORKSPACE, ("admin",)),
        "infer": issued(DEFAULT_WORKSPACE, ("infer",)),
        "other": issued(other_workspace, ("admin",)),
    }
    return made


def _accepted(app: TestClient, key: str, request_id: str) -> Json:
    response = app.get(f"/v1/loops/futures/{request_id}", params={"wait": 30}, headers=auth(key))
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "accepted", response.json()
    return response.json()  # type: ignore[no-any-return]


def _history_with(settings: Settings, aggregate_id: str, event_type: str) -> list[Any]:
    """The aggregate's history once it holds an event of `event_type`."""

    def check() -> list[Any] | None:
        events = history(settings, aggregate_id)
        return events if any(e.type == event_type for e in events) else None

    return _until(check, f"{event_type} of {aggregate_id}")  # type: ignore[no-any-return]


def _get(app: TestClient, key: str, path: str, predicate: Callable[[Json], bool]) -> Json:
    def check() -> Json | None:
        response = app.get(path, headers=auth(key))
        return (
            response.json() if response.status_code == 200 and predicate(response.json()) else None
        )

    return _until(check, path)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def owned(app: TestClient, keys: dict[str, tuple[str, str]]) -> Json:
    """A session, run, sampler and sampler checkpoint of the default workspace."""
    return _resources(app, keys["own"][0])


def _resources(app: TestClient, key: str) -> Json:
    """A session, run, sampler and sampler checkpoint of the key's workspace."""
    created = app.post(
        "/v1/loops/sessions", json={"base_model": "loopstream/tiny-llama"}, headers=auth(key)
    )
    assert created.status_code == 202, created.text
    session_id, session_request = created.json()["session_id"], created.json()["request_id"]
    _accepted(app, key, session_request)
    run = app.post(
        "/v1/loops/runs", json={"session_id": session_id, "max_seq_len": 32}, headers=auth(key)
    ).json()
    _accepted(app, key, run["request_id"])
    saved_response = app.post(
        f"/v1/loops/runs/{run['run_id']}/save_weights_for_sampler",
        json={"name": "tenancy", "hotload": None},
        headers=auth(key),
    )
    assert saved_response.status_code == 202, saved_response.text
    saved = saved_response.json()
    session = _get(
        app, key, f"/v1/loops/sessions/{session_id}",
        lambda s: len(s["checkpoints"]) == 1 and len(s["samplers"]) == 1,
    )  # fmt: skip
    return {
        "session_id": session_id,
        "run_id": run["run_id"],
        "sampler_id": run["sampler_id"],
        "checkpoint_id": session["checkpoints"][0]["checkpoint_id"],
        "request_ids": [session_request, run["request_id"], saved["request_id"]],
    }


DATUM = {
    "model_input": [1, 2, 3],
    "loss_fn_inputs": {"target_tokens": [2, 3, 4], "weights": [1.0, 1.0, 1.0]},
}


def _every_route(ids: Json) -> list[tuple[str, str, Json | None]]:
    """(method, path, body) of every /v1/loops route that names a resource."""
    run, sampler, checkpoint = ids["run_id"], ids["sampler_id"], ids["checkpoint_id"]
    runs = f"/v1/loops/runs/{run}"
    return [
        ("GET", f"/v1/loops/sessions/{ids['session_id']}", None),
        ("DELETE", f"/v1/loops/sessions/{ids['session_id']}", None),
        ("POST", "/v1/loops/runs", {"session_id": ids["session_id"], "max_seq_len": 8}),
        ("GET", runs, None),
        ("POST", f"{runs}/forward_backward", {"data": [DATUM]}),
        ("POST", f"{runs}/forward", {"data": [DATUM]}),
        ("POST", f"{runs}/optim_step", {}),
        ("POST", f"{runs}/compute_logprobs", {"sequences": [[1, 2]]}),
        ("POST", f"{runs}/load_state", {"checkpoint_uri": f"bt://loops:{run}/weights/x"}),
        ("POST", f"{runs}/save_weights", {"name": "x"}),
        ("POST", f"{runs}/save_weights_for_sampler", {"name": "x"}),
        ("POST", f"{runs}/hotload", {"name": "tenancy"}),
        ("GET", f"{runs}/checkpoints", None),
        ("POST", f"/v1/loops/samplers/{sampler}/sample", {"prompt_tokens": [1, 2]}),
        ("GET", f"/v1/loops/samplers/{sampler}/weights", None),
        ("GET", f"/v1/loops/samplers/{sampler}/syncs", None),
        ("GET", f"/v1/loops/checkpoints/{checkpoint}", None),
        ("GET", f"/v1/loops/checkpoints/{checkpoint}/files", None),
        ("DELETE", f"/v1/loops/checkpoints/{checkpoint}", None),
        ("POST", f"/v1/loops/checkpoints/{checkpoint}/promote", {}),
        *[("GET", f"/v1/loops/futures/{r}", None) for r in ids["request_ids"]],
    ]


def _missing(ids: Json) -> Json:
    """The same kinds of ids, of resources nobody created (same shapes)."""
    return {
        "session_id": "nosuchsession",
        "run_id": "zzzzzzz1",
        "sampler_id": "zzzzzzz2",
        "checkpoint_id": "zzzzzzz3",
        "request_ids": [f"never-{uuid.uuid4()}" for _ in ids["request_ids"]],
    }


def _mask(detail: str, ids: Json) -> str:
    for name in ("session_id", "run_id", "sampler_id", "checkpoint_id"):
        detail = detail.replace(ids[name], "<id>")
    for request_id in ids["request_ids"]:
        detail = detail.replace(request_id, "<id>")
    return detail


def test_another_workspaces_ids_answer_404_like_ids_nobody_created_on_every_route(
    app: TestClient, keys: dict[str, tuple[str, str]], owned: Json
) -> None:
    other = keys["other"][0]
    missing = _missing(owned)
    for (method, path, body), (_, missing_path, missing_body) in zip(
        _every_route(owned), _every_route(missing), strict=True
    ):
        foreign = app.request(method, path, json=body, headers=auth(other))
        assert foreign.status_code == 404, (method, path, foreign.text)
        unknown = app.request(method, missing_path, json=missing_body, headers=auth(other))
        assert unknown.status_code == 404, (method, missing_path, unknown.text)
        same = _mask(foreign.json()["detail"], owned) == _mask(unknown.json()["detail"], missing)
        assert same, (method, path, foreign.json(), unknown.json())
        assert foreign.json()["field"] == unknown.json()["field"]
    # ...and nothing of the owner's changed: its session is still active, its checkpoint kept.
    own = keys["own"][0]
    session = app.get(f"/v1/loops/sessions/{owned['session_id']}", headers=auth(own)).json()
    assert session["status"] == "active" and len(session["runs"]) == 1
    assert session["checkpoints"][0]["status"] == "active"


def test_listings_show_only_the_callers_workspace(
    app: TestClient, keys: dict[str, tuple[str, str]], owned: Json
) -> None:
    other = keys["other"][0]
    created = app.post(
        "/v1/loops/sessions", json={"base_model": "loopstream/tiny-llama"}, headers=auth(other)
    ).json()
    _accepted(app, other, created["request_id"])
    theirs = _get(
        app, other, "/v1/loops/sessions?limit=1000",
        lambda page: any(s["session_id"] == created["session_id"] for s in page["data"]),
    )  # fmt: skip
    assert {s["session_id"] for s in theirs["data"]} == {created["session_id"]}
    assert theirs["count"] == 1
    ours = app.get("/v1/loops/sessions?limit=1000", headers=auth(keys["own"][0])).json()
    listed = {s["session_id"] for s in ours["data"]}
    assert owned["session_id"] in listed and created["session_id"] not in listed


def test_a_missing_key_is_401_on_a_loops_route(app: TestClient) -> None:
    for method, path in (("GET", "/v1/loops/sessions"), ("POST", "/v1/loops/sessions")):
        response = app.request(method, path, json={"base_model": "loopstream/tiny-llama"})
        assert response.status_code == 401, response.text
        assert response.json()["field"] == "authorization"
        assert "API key" in response.json()["detail"]


def test_an_infer_only_key_cannot_train_but_may_sample_and_read(
    app: TestClient, keys: dict[str, tuple[str, str]], owned: Json
) -> None:
    infer = keys["infer"][0]
    for path, body in (
        ("/v1/loops/sessions", {"base_model": "loopstream/tiny-llama"}),
        ("/v1/loops/runs", {"session_id": owned["session_id"], "max_seq_len": 8}),
        (f"/v1/loops/runs/{owned['run_id']}/forward_backward", {"data": [DATUM]}),
        (f"/v1/loops/runs/{owned['run_id']}/save_weights", {"name": "x"}),
    ):
        response = app.post(path, json=body, headers=auth(infer))
        assert response.status_code == 403, (path, response.text)
        assert "`train`" in response.json()["detail"]
    sampled = app.post(
        f"/v1/loops/samplers/{owned['sampler_id']}/sample",
        json={"prompt_tokens": [1, 2], "max_tokens": 2},
        headers=auth(infer),
    )
    assert sampled.status_code == 202, sampled.text
    assert app.get(f"/v1/loops/runs/{owned['run_id']}", headers=auth(infer)).status_code == 200


def test_the_audit_trail_of_a_run_names_the_key_that_issued_each_command(
    settings: Settings, keys: dict[str, tuple[str, str]], owned: Json
) -> None:
    key_id = keys["own"][1]
    events = history(settings, owned["session_id"])
    # The command id on Kafka is the request id within the caller's workspace.
    command_ids = {command_id_for(DEFAULT_WORKSPACE, r) for r in owned["request_ids"]}
    by_request = [e for e in events if e.command_id in command_ids]
    assert {e.type for e in by_request} >= {"SessionCreated", "RunCreated", "SamplerCreated"}
    assert {e.actor for e in by_request} == {key_id}
    assert {e.workspace for e in events} == {DEFAULT_WORKSPACE}


def test_an_audit_scoped_to_another_workspace_shows_none_of_its_events(
    settings: Settings, owned: Json
) -> None:
    assert history(settings, owned["session_id"], workspace=DEFAULT_WORKSPACE)
    assert history(settings, owned["session_id"], workspace="someone-else") == []


def test_the_page_token_of_one_workspace_pages_nothing_in_another(
    app: TestClient, keys: dict[str, tuple[str, str]], owned: Json
) -> None:
    own, other = keys["own"][0], keys["other"][0]
    path = f"/v1/loops/checkpoints/{owned['checkpoint_id']}/files"
    page = app.get(path, params={"page_size": 1}, headers=auth(own)).json()
    token = page["next_page_token"]
    assert token is not None
    foreign = app.get(path, params={"page_size": 1, "page_token": token}, headers=auth(other))
    assert foreign.status_code == 404, foreign.text


def test_events_the_workers_emit_on_their_own_are_in_the_resources_workspace(
    settings: Settings, app: TestClient, keys: dict[str, tuple[str, str]], other_workspace: str
) -> None:
    """A release (the session ended) and a sampler's hosting and hotloads are events no request
    caused: they still belong to the workspace of the run or sampler, so an audit scoped to that
    workspace shows them."""
    key = keys["other"][0]
    created = app.post(
        "/v1/loops/sessions", json={"base_model": "loopstream/tiny-llama"}, headers=auth(key)
    )
    session_id = created.json()["session_id"]
    _accepted(app, key, created.json()["request_id"])
    run = app.post(
        "/v1/loops/runs", json={"session_id": session_id, "max_seq_len": 32}, headers=auth(key)
    ).json()
    _accepted(app, key, run["request_id"])
    saved = app.post(
        f"/v1/loops/runs/{run['run_id']}/save_weights_for_sampler",
        json={"name": "emitted"},
        headers=auth(key),
    )
    _accepted(app, key, saved.json()["request_id"])
    _history_with(settings, run["sampler_id"], "HotloadSucceeded")
    ended = app.delete(f"/v1/loops/sessions/{session_id}", headers=auth(key))
    _accepted(app, key, ended.json()["request_id"])
    run_events = _history_with(settings, run["run_id"], "TrainerReleased")
    sampler_events = _history_with(settings, run["sampler_id"], "SamplerReleased")
    emitted = [e for e in [*run_events, *sampler_events] if e.actor.endswith("-worker")]
    assert {"TrainerReleased", "SamplerReleased", "HotloadSucceeded"} <= {e.type for e in emitted}
    assert {e.workspace for e in emitted} == {other_workspace}


def test_a_log_check_scoped_to_a_workspace_counts_only_that_workspaces_events(
    settings: Settings, other_workspace: str, owned: Json
) -> None:
    """`projections check --workspace` (and `replay --check --workspace`): the other workspace's
    session (made by the test above) is all it tallies; a workspace with no events, nothing."""
    scoped = check_against_log(settings, workspace=other_workspace)
    everything = check_against_log(settings)
    nobody = check_against_log(settings, workspace="nobody-here")
    assert scoped.matches and 1 <= scoped.aggregates < everything.aggregates
    assert nobody.aggregates == 0 and nobody.matches


def test_a_checkpoint_of_another_workspace_cannot_be_loaded_or_sampled_by_path(
    app: TestClient, keys: dict[str, tuple[str, str]], owned: Json
) -> None:
    """The workers load whatever path a request names: the API checks whose it is first."""
    other = keys["other"][0]
    theirs = _resources(app, other)
    uri = f"bt://loops:{owned['run_id']}/sampler_weights/tenancy"
    loaded = app.post(
        f"/v1/loops/runs/{theirs['run_id']}/load_state",
        json={"checkpoint_uri": f"bt://loops:{owned['run_id']}/weights/tenancy"},
        headers=auth(other),
    )
    assert loaded.status_code == 404 and loaded.json()["field"] == "checkpoint_uri", loaded.text
    sampled = app.post(
        f"/v1/loops/samplers/{theirs['sampler_id']}/sample",
        json={"prompt_tokens": [1, 2], "checkpoint_uri": uri},
        headers=auth(other),
    )
    assert sampled.status_code == 404 and sampled.json()["field"] == "checkpoint_uri", sampled.text
    # Their own checkpoint by path is fine.
    own_uri = f"bt://loops:{theirs['run_id']}/sampler_weights/tenancy"
    mine = app.post(
        f"/v1/loops/samplers/{theirs['sampler_id']}/sample",
        json={"prompt_tokens": [1, 2], "checkpoint_uri": own_uri},
        headers=auth(other),
    )
    assert mine.status_code == 202, mine.text
