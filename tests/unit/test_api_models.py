"""Request models, error messages, idempotency keys and API settings, without services."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from api.app import create_app
from api.config import ApiSettings
from api.errors import ApiError, validation_message
from api.models import ForwardBackwardCreate, RunCreate, SampleCreate, SaveWeightsCreate
from api.submit import (
    RequestIds,
    SentRequests,
    derived_resource_id,
    new_resource_id,
    request_id_of,
    resolve_request_id,
)
from commands.loops import RESOURCE_ID
from commands.work import ForwardBackward, Sample

DATUM = {"model_input": [1, 2, 3], "loss_fn_inputs": {"target_tokens": [2, 3, 4],
                                                       "weights": [1.0, 1.0, 1.0]}}  # fmt: skip


def first_error(exc: pytest.ExceptionInfo[ValidationError]) -> tuple[str, str | None]:
    return validation_message(exc.value.errors()[0])  # type: ignore[arg-type]


def test_forward_backward_body_is_the_wire_model_plus_request_id() -> None:
    body = ForwardBackwardCreate.model_validate({"data": [DATUM], "request_id": "k1"})
    wire = ForwardBackward.model_validate(body.model_dump(exclude={"request_id"}))
    assert wire.loss_fn == "cross_entropy" and wire.data[0].model_input == [1, 2, 3]


def test_unknown_loss_fn_names_the_field() -> None:
    with pytest.raises(ValidationError) as exc:
        ForwardBackwardCreate.model_validate({"data": [DATUM], "loss_fn": "hinge"})
    assert first_error(exc)[1] == "loss_fn"


def test_missing_loss_input_names_the_datum_field() -> None:
    datum = {"model_input": [1], "loss_fn_inputs": {"target_tokens": [2]}}
    with pytest.raises(ValidationError) as exc:
        ForwardBackwardCreate.model_validate({"data": [datum]})
    message, field = first_error(exc)
    assert field == "data.0.loss_fn_inputs.weights"
    assert "required by cross_entropy" in message


def test_extra_field_is_refused_by_name() -> None:
    with pytest.raises(ValidationError) as exc:
        SaveWeightsCreate.model_validate({"name": "step-1", "kind": "weights"})
    assert first_error(exc) == ("unknown field kind", "kind")


def test_sample_body_strips_to_the_wire_model() -> None:
    body = SampleCreate.model_validate({"prompt": "a", "affinity_key": "group-1", "seed": 3})
    wire = Sample.model_validate(body.model_dump(exclude={"affinity_key", "request_id"}))
    assert wire.seed == 3 and wire.prompt == "a"


def test_run_create_checks_the_checkpoint_uri() -> None:
    RunCreate(session_id="s1", max_seq_len=8, from_checkpoint="bt://loops:r1/weights/step-1")
    with pytest.raises(ValidationError) as exc:
        RunCreate(session_id="s1", max_seq_len=8, from_checkpoint="s3://bucket/x")
    assert first_error(exc)[1] == "from_checkpoint"


def test_resource_ids_fit_the_command_pattern() -> None:
    import re

    assert re.match(RESOURCE_ID, new_resource_id())
    assert re.match(RESOURCE_ID, derived_resource_id("key", "run"))


def test_the_same_key_derives_the_same_id_per_kind() -> None:
    assert derived_resource_id("k", "run") == derived_resource_id("k", "run")
    assert derived_resource_id("k", "run") != derived_resource_id("k", "sampler")


def test_idempotency_key_comes_from_any_one_place() -> None:
    chosen = RequestIds(request_id="k", command_id="ws:k", chosen=True)
    assert resolve_request_id(header="k", query=None, body=None, workspace="ws") == chosen
    assert resolve_request_id(header=None, query=None, body="k", workspace="ws") == chosen
    assert resolve_request_id(header="k", query="k", body="k", workspace="ws") == chosen
    generated = resolve_request_id(header=None, query=None, body=None, workspace="ws")
    assert not generated.chosen and len(generated.request_id) == 36
    assert generated.command_id == f"ws:{generated.request_id}"


def test_the_same_key_in_two_workspaces_is_two_commands_and_two_resources() -> None:
    """Idempotency keys are per workspace: a key another workspace guessed never names (or
    swallows, as a duplicate) this workspace's command, and derives other resource ids."""
    mine = resolve_request_id(header="step-1", query=None, body=None, workspace="default")
    theirs = resolve_request_id(header="step-1", query=None, body=None, workspace="other")
    assert mine.request_id == theirs.request_id == "step-1"
    assert mine.command_id != theirs.command_id
    assert derived_resource_id(mine.command_id, "run") != derived_resource_id(
        theirs.command_id, "run"
    )
    assert request_id_of("default", mine.command_id) == "step-1"
    assert request_id_of("default", "external-id") == "external-id"


def test_conflicting_idempotency_keys_are_refused() -> None:
    with pytest.raises(ApiError) as exc:
        resolve_request_id(header="a", query=None, body="b", workspace="ws")
    assert exc.value.status_code == 422 and exc.value.field == "request_id"


def test_sent_requests_expire_after_the_retention() -> None:
    expired = SentRequests(retention_s=-1.0)  # everything is already older than that
    expired.remember("r1")
    assert not expired.recently_sent("r1")
    longer = SentRequests(retention_s=60)
    longer.remember("r1")
    assert longer.recently_sent("r1")


def test_dev_page_token_secret_is_refused_off_loopback() -> None:
    ApiSettings(api_host="127.0.0.1")
    key_hash = {"api_key_hash_secret": "another-real-secret-of-32-chars!"}
    with pytest.raises(ValidationError, match="page_token_secret"):
        ApiSettings(api_host="0.0.0.0", **key_hash)
    ApiSettings(
        api_host="0.0.0.0", page_token_secret="a-real-secret-of-32-characters!!", **key_hash
    )


def test_base_url_defaults_to_the_listen_address() -> None:
    assert ApiSettings(api_port=18123).base_url == "http://127.0.0.1:18123"
    assert ApiSettings(api_base_url="http://api:9/").base_url == "http://api:9"


def test_an_unauthenticated_request_is_a_401_before_its_body_is_validated() -> None:
    # The key is checked first: a caller without one learns nothing from validation errors
    # (tests/integration/test_api_boundary.py checks the 422s of an authenticated caller).
    client = TestClient(create_app())
    response = client.post(
        "/v1/loops/runs/r1/optim_step", json={"adam_params": {"learning_rate": -1}}
    )
    assert response.status_code == 401
    assert response.json()["field"] == "authorization"


def test_openapi_lists_the_loops_routes() -> None:
    paths = TestClient(create_app()).get("/openapi.json").json()["paths"]
    for path in (
        "/v1/loops/sessions",
        "/v1/loops/runs",
        "/v1/loops/runs/{run_id}/forward_backward",
        "/v1/loops/samplers/{sampler_id}/sample",
        "/v1/loops/futures/{request_id}",
        "/v1/loops/checkpoints/{checkpoint_id}/files",
    ):
        assert path in paths
