"""`loopstream deploy-checkpoints` and `loopstream deployments ...`: models and deployments.

`deploy-checkpoints --run-id ID [--checkpoint NAME]` is the seed's `truss train
deploy_checkpoints`: a model from the run's sampler_weights checkpoint (the latest unless
named) and its first deployment, waited for and shown. `deployments models` lists the deployable
models (`loopstream models` lists base models, which is another thing).
"""

from __future__ import annotations

from typing import Any

import typer

from api.cli_loops import BASE_URL, _call, _client, _wait
from api.deploy_client import DeploymentsClient
from infra.cli_output import OUTPUT, Column, Listing, OutputFormat, emit, when

deployments_app = typer.Typer(
    no_args_is_help=True,
    help="Deployable models and their deployments: list, show, activate, deactivate, delete "
    "(`deployments models` lists deployable models; `loopstream models` lists base models).",
)


def _deploys(base_url: str | None) -> DeploymentsClient:
    return DeploymentsClient(_client(base_url))


def _resources(
    accelerator: str | None, cpu: str | None, memory: str | None, instance_type: str | None
) -> dict[str, str]:
    given = {"accelerator": accelerator, "cpu": cpu, "memory": memory,
             "instance_type": instance_type}  # fmt: skip
    return {k: v for k, v in given.items() if v is not None}


def _deployments_listing(deployments: list[dict[str, Any]], *, title: str | None) -> Listing:
    columns = [Column("deployment"), Column("name"), Column("kind"), Column("status"),
               Column("instance type"), Column("replicas", justify="right"),
               Column("copied from"), Column("created")]  # fmt: skip
    rows = [
        [d["deployment_id"], d["name"], d["kind"], d["status"], d["instance_type"],
         f"{d['min_replica']}-{d['max_replica']}", d["copied_from"], when(d["created_at"])]
        for d in deployments
    ]  # fmt: skip
    return Listing(columns, rows, title=title)


def _models_listing(models: list[dict[str, Any]], *, title: str | None) -> Listing:
    columns = [Column("model"), Column("name", kind="text"), Column("source"),
               Column("weights"), Column("base model"), Column("deployments", justify="right"),
               Column("created")]  # fmt: skip
    rows = [
        [m["model_id"], m["name"], m["source"], m["checkpoint_uri"] or m["base_model"],
         m["base_model"], m.get("deployments_count", "-"), when(m["created_at"])]
        for m in models
    ]  # fmt: skip
    return Listing(columns, rows, title=title)


ACCELERATOR = typer.Option(None, help='GPU, e.g. "L4" or "A100:2" (default: none, CPU only)')
CPU = typer.Option(None, help='vCPUs, e.g. "4" (default "1")')
MEMORY = typer.Option(None, help='e.g. "16Gi" (default "2Gi")')
INSTANCE_TYPE = typer.Option(
    None, "--instance-type", help='the exact instance type, e.g. "L4:4x16" (overrides the others)'
)


def deploy_checkpoints(
    run_id: str = typer.Option(..., "--run-id", help="the Loops run (trainer server) id"),
    checkpoint: str | None = typer.Option(
        None, "--checkpoint", help="a sampler_weights checkpoint name (default: the latest)"
    ),
    name: str | None = typer.Option(None, help="the model's name (default <run>-<checkpoint>)"),
    deployment_name: str | None = typer.Option(None, help="default deployment-1"),
    development: bool = typer.Option(False, help="make it the development deployment"),
    accelerator: str | None = ACCELERATOR,
    cpu: str | None = CPU,
    memory: str | None = MEMORY,
    instance_type: str | None = INSTANCE_TYPE,
    output: OutputFormat = OUTPUT,
    base_url: str | None = BASE_URL,
) -> None:
    """Deploy a run's checkpoint (`truss train deploy_checkpoints`): a model and its first
    deployment. A delta checkpoint of a full-parameter run is refused (Baseten's rule)."""
    deploys = _deploys(base_url)
    deployment: dict[str, Any] = {
        "development": development,
        "resources": _resources(accelerator, cpu, memory, instance_type),
    }
    if deployment_name is not None:
        deployment["name"] = deployment_name
    future = _call(deploys.deploy_checkpoints, run_id, checkpoint_name=checkpoint, name=name,
                   deployment=deployment)  # fmt: skip
    accepted = _wait(future, "deploy refused")
    model = _call(deploys.get_model, accepted["model_id"])
    emit(
        output,
        model,
        [
            _models_listing([model], title="model"),
            _deployments_listing(model["deployments"], title="deployments"),
        ],
    )


@deployments_app.command("models")
def deployments_models(
    limit: int = typer.Option(100, min=1, max=1000),
    output: OutputFormat = OUTPUT,
    base_url: str | None = BASE_URL,
) -> None:
    """The workspace's deployable models, newest first."""
    models = _call(_deploys(base_url).list_models, limit=limit)
    emit(output, models, [_models_listing(models, title="models")])


@deployments_app.command("list")
def deployments_list(
    model_id: str = typer.Argument(..., help="the model id"),
    output: OutputFormat = OUTPUT,
    base_url: str | None = BASE_URL,
) -> None:
    """A model's deployments (deleted ones are gone)."""
    deployments = _call(_deploys(base_url).list_deployments, model_id)
    emit(output, deployments, [_deployments_listing(deployments, title="deployments")])


@deployments_app.command("show")
def deployments_show(
    model_id: str,
    deployment_id: str,
    output: OutputFormat = OUTPUT,
    base_url: str | None = BASE_URL,
) -> None:
    """One deployment with its resources."""
    d = _call(_deploys(base_url).get_deployment, model_id, deployment_id)
    fields = ["deployment_id", "model_id", "name", "kind", "status", "instance_type",
              "accelerator", "gpu_count", "cpu", "memory", "requested_instance_type",
              "min_replica", "max_replica", "copied_from", "created_at",
              "deactivated_at"]  # fmt: skip
    listing = Listing([Column("field"), Column("value")], [[f, d[f]] for f in fields],
                      title="deployment")  # fmt: skip
    emit(output, d, [listing])


def _lifecycle(action: str, model_id: str, deployment_id: str, output: OutputFormat,
               base_url: str | None) -> None:  # fmt: skip
    deploys = _deploys(base_url)
    future = _call(getattr(deploys, action), model_id, deployment_id)
    accepted = _wait(future, f"{action} refused")
    if action == "delete":
        emit(output, {**accepted, "deleted": True},
             [_deployments_listing([], title=f"deleted {deployment_id}")])  # fmt: skip
        return
    d = _call(deploys.get_deployment, model_id, deployment_id)
    emit(output, d, [_deployments_listing([d], title=f"{action}d")])


@deployments_app.command("activate")
def deployments_activate(
    model_id: str, deployment_id: str, output: OutputFormat = OUTPUT,
    base_url: str | None = BASE_URL,
) -> None:  # fmt: skip
    """Serve a deactivated deployment again."""
    _lifecycle("activate", model_id, deployment_id, output, base_url)


@deployments_app.command("deactivate")
def deployments_deactivate(
    model_id: str, deployment_id: str, output: OutputFormat = OUTPUT,
    base_url: str | None = BASE_URL,
) -> None:  # fmt: skip
    """Stop serving, keep the configuration (requests get 404 until activated)."""
    _lifecycle("deactivate", model_id, deployment_id, output, base_url)


@deployments_app.command("delete")
def deployments_delete(
    model_id: str, deployment_id: str, output: OutputFormat = OUTPUT,
    base_url: str | None = BASE_URL,
) -> None:  # fmt: skip
    """Delete permanently (404 afterwards; the events stay in the log)."""
    _lifecycle("delete", model_id, deployment_id, output, base_url)


@deployments_app.command("create")
def deployments_create(
    model_id: str,
    name: str | None = typer.Option(None, help="default deployment-N"),
    development: bool = typer.Option(False, help="the development deployment (min 0, max 1)"),
    accelerator: str | None = ACCELERATOR,
    cpu: str | None = CPU,
    memory: str | None = MEMORY,
    instance_type: str | None = INSTANCE_TYPE,
    min_replica: int | None = typer.Option(None, min=0, help="default 0"),
    max_replica: int | None = typer.Option(None, min=1, help="default 1"),
    output: OutputFormat = OUTPUT,
    base_url: str | None = BASE_URL,
) -> None:
    """Another deployment of a model (the smallest instance type that fits the resources)."""
    resources = _resources(accelerator, cpu, memory, instance_type)
    body: dict[str, Any] = {"development": development, "resources": resources}
    for key, value in (("name", name), ("min_replica", min_replica), ("max_replica", max_replica)):
        if value is not None:
            body[key] = value
    deploys = _deploys(base_url)
    accepted = _wait(_call(deploys.create_deployment, model_id, **body), "deployment refused")
    d = _call(deploys.get_deployment, model_id, accepted["deployment_id"])
    emit(output, d, [_deployments_listing([d], title="created")])
