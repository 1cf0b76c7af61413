"""Models and deployments against the running services: REST (SDK), CLI, read models, audit.

A run saves a base sampler checkpoint and then a delta; the base deploys, the delta is refused
with seed 002's promotability rule. Naming, the development deployment's rules, deactivate /
activate / delete, the instance-type copy, and another workspace's 404 follow.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from typer.testing import CliRunner

from api.bootstrap import issue_key, send_and_wait
from api.cli import app
from api.client import LoopsError, ServiceClient, TrainingClient
from api.deploy_client import DeploymentsClient
from commands.deployments import CreateModel
from commands.envelope import CommandEnvelope
from commands.loops import PROMOTABILITY_RULE
from events.audit import history
from infra.settings import Settings
from tests.integration.kafka_helpers import create_workspace

WAIT_S = 120.0
Json = dict[str, Any]


def cli(*args: str, exit_code: int = 0) -> Any:
    done = CliRunner().invoke(app, list(args), env={"COLUMNS": "100"})
    assert done.exit_code == exit_code, f"{args}: {done.stdout}\n{done.stderr}\n{done.exception!r}"
    return done


def cli_json(*args: str) -> Any:
    return json.loads(cli(*args, "-o", "json").stdout)


def eventually(fetch: Any, predicate: Any, what: str) -> Any:
    deadline = time.monotonic() + WAIT_S
    while True:
        try:
            value = fetch()
        except LoopsError:
            value = None
        if value is not None and predicate(value):
            return value
        assert time.monotonic() < deadline, f"gave up waiting: {what} (last: {value})"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def service(services: Settings) -> Iterator[ServiceClient]:
    with ServiceClient() as client:
        yield client


@pytest.fixture(scope="module")
def deploys(service: ServiceClient) -> DeploymentsClient:
    return DeploymentsClient(service)


@pytest.fixture(scope="module")
def run(service: ServiceClient) -> Iterator[TrainingClient]:
    """A full-parameter run with sampler checkpoints base-1 (base) and delta-2 (delta)."""
    session = service.create_session("loopstream/tiny-llama", project="deployments-test")
    training = service.create_training_client(session, max_seq_len=32)
    base = training.save_weights_for_sampler("base-1", hotload=False).result(WAIT_S)
    delta = training.save_weights_for_sampler(
        "delta-2", checkpoint_type="delta", hotload=False
    ).result(WAIT_S)
    assert (base["checkpoint_type"], delta["checkpoint_type"]) == ("base", "delta")
    eventually(
        lambda: service.list_checkpoints(training.run_id),
        lambda rows: len([c for c in rows if c["kind"] == "sampler_weights"]) == 2,
        "both checkpoints projected",
    )
    yield training
    service.end_session(session.session_id, reason="test over").result(60)


@pytest.fixture(scope="module")
def deployed(deploys: DeploymentsClient, run: TrainingClient) -> Json:
    """The base checkpoint deployed through the CLI (`deploy-checkpoints`), as its JSON."""
    shown = cli_json(
        "deploy-checkpoints", "--run-id", run.run_id, "--checkpoint", "base-1",
        "--accelerator", "L4", "--cpu", "4", "--memory", "16Gi",
    )  # fmt: skip
    return shown  # type: ignore[no-any-return]


def test_deploy_checkpoints_makes_a_model_and_deployment_1(
    deployed: Json, run: TrainingClient
) -> None:
    assert deployed["source"] == "checkpoint"
    assert deployed["checkpoint_uri"] == f"bt://loops:{run.run_id}/sampler_weights/base-1"
    assert deployed["name"] == f"{run.run_id}-base-1"
    assert deployed["checkpoint_type"] == "base" and len(deployed["content_digest"]) == 64
    [first] = deployed["deployments"]
    assert (first["name"], first["kind"], first["status"]) == (
        "deployment-1",
        "published",
        "ACTIVE",
    )
    assert first["instance_type"] == "L4:4x16"  # the seed's own example
    assert (first["min_replica"], first["max_replica"]) == (0, 1)


def test_the_latest_sampler_checkpoint_is_the_default_and_a_delta_is_refused(
    deploys: DeploymentsClient, run: TrainingClient
) -> None:
    # Without --checkpoint, the run's latest sampler_weights save: delta-2, not deployable.
    done = cli("deploy-checkpoints", "--run-id", run.run_id, exit_code=1)
    assert PROMOTABILITY_RULE in done.stderr.replace("\n", " ").replace("  ", " ") or (
        "subsequent delta checkpoints are not" in done.stderr.replace("\n", " ")
    )
    with pytest.raises(LoopsError) as exc:
        deploys.deploy_checkpoints(run.run_id, checkpoint_name="delta-2")
    assert exc.value.status_code == 400 and exc.value.field == "run_id"
    assert PROMOTABILITY_RULE in exc.value.detail


def test_a_delta_sent_past_the_api_is_refused_by_the_aggregate(
    settings: Settings, run: TrainingClient
) -> None:
    """The rule lives in the aggregate: a producer that skips the API's check (a raw Kafka
    command with the checkpoint's true facts) gets the same answer from the log."""
    command = CreateModel(
        source="checkpoint", checkpoint_uri=f"bt://loops:{run.run_id}/sampler_weights/delta-2",
        checkpoint_type="delta", chain_position=1, lora_rank=0, base_model="loopstream/tiny-llama",
    )  # fmt: skip
    model_id = uuid.uuid4().hex[:8]
    envelope = CommandEnvelope(
        command_id=f"test-delta-{model_id}", type="CreateModel", aggregate_id=model_id,
        actor="test", payload=command.model_dump(mode="json"),
    )  # fmt: skip
    with pytest.raises(RuntimeError) as exc:
        send_and_wait(settings, envelope)
    assert PROMOTABILITY_RULE in str(exc.value)


def test_more_deployments_count_on_and_the_development_one_is_fixed(
    deploys: DeploymentsClient, deployed: Json
) -> None:
    model_id = deployed["model_id"]
    second = deploys.create_deployment(model_id).result(WAIT_S)
    dev = deploys.create_deployment(model_id, development=True).result(WAIT_S)
    shown = eventually(
        lambda: deploys.list_deployments(model_id), lambda d: len(d) == 3, "three deployments"
    )
    by_id = {d["deployment_id"]: d for d in shown}
    assert by_id[second["deployment_id"]]["name"] == "deployment-2"
    development = by_id[dev["deployment_id"]]
    assert (development["name"], development["kind"], development["is_development"]) == (
        "deployment-3", "development", True,
    )  # fmt: skip
    assert (development["min_replica"], development["max_replica"]) == (0, 1)
    # Fixed replicas: refused at once, naming the field.
    for field, value in (("max_replica", 2), ("min_replica", 1)):
        with pytest.raises(LoopsError) as exc:
            deploys.create_deployment(model_id, development=True, **{field: value})
        assert (exc.value.status_code, exc.value.field) == (400, field)
        assert "fixed at" in exc.value.detail
    # Pushing the development deployment again overwrites it: same id, new resources.
    again = deploys.create_deployment(
        model_id, development=True, resources={"instance_type": "T4:4x16"}
    ).result(WAIT_S)
    assert again["deployment_id"] == dev["deployment_id"]
    eventually(
        lambda: deploys.get_deployment(model_id, dev["deployment_id"]),
        lambda d: d["instance_type"] == "T4:4x16",
        "development deployment overwritten",
    )


def test_bad_resources_are_refused_naming_the_field(
    deploys: DeploymentsClient, deployed: Json
) -> None:
    for resources, field in (
        ({"cpu": "64"}, "resources.cpu"),
        ({"accelerator": "V100"}, "resources.accelerator"),
        ({"instance_type": "L4:1x1"}, "resources.instance_type"),
    ):
        with pytest.raises(LoopsError) as exc:
            deploys.create_deployment(deployed["model_id"], resources=resources)
        assert (exc.value.status_code, exc.value.field) == (400, field), exc.value.detail


def test_deactivate_activate_delete_are_seen_in_read_models_cli_and_audit(
    deploys: DeploymentsClient, deployed: Json, settings: Settings
) -> None:
    model_id = deployed["model_id"]
    created = deploys.create_deployment(model_id, name="lifecycle").result(WAIT_S)
    deployment_id = created["deployment_id"]
    eventually(lambda: deploys.get_deployment(model_id, deployment_id), bool, "created")

    shown = cli_json("deployments", "deactivate", model_id, deployment_id)
    assert shown["status"] == "INACTIVE" or eventually(
        lambda: deploys.get_deployment(model_id, deployment_id),
        lambda d: d["status"] == "INACTIVE", "deactivated",
    )  # fmt: skip
    with pytest.raises(LoopsError) as exc:
        deploys.deactivate(model_id, deployment_id)
    assert exc.value.status_code == 409
    deploys.activate(model_id, deployment_id).result(WAIT_S)
    eventually(
        lambda: deploys.get_deployment(model_id, deployment_id),
        lambda d: d["status"] == "ACTIVE" and d["deactivated_at"] is None,
        "activated",
    )
    cli("deployments", "delete", model_id, deployment_id)
    eventually(
        lambda: [d["deployment_id"] for d in deploys.list_deployments(model_id)],
        lambda ids: deployment_id not in ids,
        "deleted from the listing",
    )
    with pytest.raises(LoopsError) as exc:
        deploys.get_deployment(model_id, deployment_id)
    assert exc.value.status_code == 404 and exc.value.field == "deployment_id"
    with pytest.raises(LoopsError) as exc:
        deploys.activate(model_id, deployment_id)
    assert exc.value.status_code == 404

    types = [e.type for e in history(settings, model_id) if e.payload.get("deployment_id") ==
             deployment_id]  # fmt: skip
    assert types == [
        "DeploymentCreated", "DeploymentDeactivated", "DeploymentActivated", "DeploymentDeleted",
    ]  # fmt: skip


def test_changing_the_instance_type_deploys_a_copy(
    deploys: DeploymentsClient, deployed: Json
) -> None:
    model_id = deployed["model_id"]
    original = deployed["deployments"][0]["deployment_id"]
    copy = deploys.change_resources(model_id, original, {"instance_type": "A10G:4x16"}).result(
        WAIT_S
    )
    assert copy["copied_from"] == original and copy["deployment_id"] != original
    new = eventually(
        lambda: deploys.get_deployment(model_id, copy["deployment_id"]), bool, "the copy"
    )
    assert (new["instance_type"], new["copied_from"], new["kind"]) == (
        "A10G:4x16", original, "published",
    )  # fmt: skip
    assert deploys.get_deployment(model_id, original)["instance_type"] == "L4:4x16"


def test_models_listing_cli(deployed: Json) -> None:
    models = cli_json("deployments", "models")
    assert deployed["model_id"] in [m["model_id"] for m in models]
    table = cli("deployments", "list", deployed["model_id"]).stdout
    assert "deployment-1" in table


def test_a_base_model_is_deployable_and_an_unknown_one_is_refused(
    deploys: DeploymentsClient,
) -> None:
    accepted = deploys.create_model(
        base_model="loopstream/tiny-llama", deployment={"development": True}
    ).result(WAIT_S)
    model = eventually(lambda: deploys.get_model(accepted["model_id"]), bool, "base model")
    assert model["source"] == "base_model" and model["deployments"][0]["kind"] == "development"
    with pytest.raises(LoopsError) as exc:
        deploys.create_model(base_model="nobody/nothing")
    assert (exc.value.status_code, exc.value.field) == (400, "base_model")


def test_another_workspaces_model_and_deployment_are_404(
    settings: Settings, deployed: Json, run: TrainingClient
) -> None:
    workspace = create_workspace(settings, "deploy", "deployments tenancy test")
    key = issue_key(settings, workspace_id=workspace, scopes=("admin",), name="deploy test")
    model_id = deployed["model_id"]
    deployment_id = deployed["deployments"][0]["deployment_id"]
    with ServiceClient(api_key=key) as other_service:
        other = DeploymentsClient(other_service)
        for call, field in (
            (lambda: other.get_model(model_id), "model_id"),
            (lambda: other.list_deployments(model_id), "model_id"),
            (lambda: other.get_deployment(model_id, deployment_id), "model_id"),
            (lambda: other.deactivate(model_id, deployment_id), "model_id"),
            (lambda: other.delete(model_id, deployment_id), "model_id"),
            (lambda: other.create_deployment(model_id), "model_id"),
            (lambda: other.deploy_checkpoints(run.run_id, checkpoint_name="base-1"), "run_id"),
        ):
            with pytest.raises(LoopsError) as exc:
                call()
            assert (exc.value.status_code, exc.value.field) == (404, field)
        assert model_id not in [m["model_id"] for m in other.list_models()]
