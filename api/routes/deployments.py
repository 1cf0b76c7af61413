"""Models and deployments (`/v1/models`, seed 003's management API paths).

Writes are commands on the model aggregate (202 + `request_id`, the future); reads come from
the `models` / `deployments` read models. Every route is workspace-scoped: another workspace's
model or deployment is a 404, as is a deleted deployment ("API requests return a 404 error
post-deletion"). Obvious refusals (a missing model, a delta checkpoint, a resource no instance
type meets) are answered at once with the field named; the aggregate decides again on the log,
so a race is answered by the future.
"""

from __future__ import annotations

from fastapi import APIRouter, Path, Query, status

from api.auth import Caller, CallerDep, TrainCaller
from api.deploy_models import (
    DeploymentAccepted,
    DeploymentCreate,
    DeploymentPublic,
    DeploymentResourcesChange,
    DeploymentsPublic,
    DeploymentWeightsAccepted,
    DeploymentWeightsPublic,
    DeploymentWeightsUpdate,
    ModelAccepted,
    ModelCreate,
    ModelDetail,
    ModelPublic,
    ModelsPublic,
    ReplicaWeightsPublic,
    TargetWeightsPublic,
)
from api.deploy_queries import DeploymentReadDep, DeploymentReads
from api.deps import IdempotencyHeader, OffsetQuery, RequestIdQuery, SettingsDep, SubmitterDep
from api.errors import ApiError, conflict, error_responses, not_found
from api.queries import Row
from api.routes._common import envelope
from api.submit import Submitter, derived_resource_id, new_resource_id, resolve_request_id
from commands.deployments import (
    DEFAULT_MAX_REPLICA,
    DEFAULT_MIN_REPLICA,
    DEVELOPMENT_REPLICAS,
    ActivateDeployment,
    ChangeDeploymentInstanceType,
    CreateDeployment,
    CreateModel,
    DeactivateDeployment,
    DeleteDeployment,
    DeploymentSpec,
    Resources,
    UpdateDeploymentWeights,
)
from commands.instance_types import ResourceError, select_instance_type
from commands.loops import (
    CHECKPOINT_URI,
    RESOURCE_ID,
    Command,
    NotPromotableError,
    check_promotable,
    content_digest,
)
from events.loops import CheckpointFile
from gpu_workers.models import UnknownBaseModel, require_base_model

router = APIRouter(prefix="/v1/models", tags=["models"])
ModelIdPath = Path(pattern=RESOURCE_ID, description="model id")
DeploymentIdPath = Path(pattern=RESOURCE_ID, description="deployment id")


def _bad(detail: str, field: str) -> ApiError:
    return ApiError(status.HTTP_400_BAD_REQUEST, detail, field=field)


def _check_resources(resources: Resources, prefix: str) -> None:
    try:
        select_instance_type(**resources.model_dump())
    except ResourceError as exc:
        raise _bad(str(exc), f"{prefix}resources.{exc.field}") from None


def _check_deployment(body: DeploymentCreate, prefix: str) -> None:
    _check_resources(body.resources, prefix)
    if body.development:
        for name, fixed in zip(("min_replica", "max_replica"), DEVELOPMENT_REPLICAS, strict=True):
            value = getattr(body, name)
            if value is not None and value != fixed:
                raise _bad(
                    f"{name} of a development deployment is fixed at {fixed} (single replica, "
                    "scales to zero)",
                    f"{prefix}{name}",
                )
    else:
        low = DEFAULT_MIN_REPLICA if body.min_replica is None else body.min_replica
        high = DEFAULT_MAX_REPLICA if body.max_replica is None else body.max_replica
        if low > high:
            raise _bad(f"min_replica {low} is above max_replica {high}", f"{prefix}min_replica")


def _model(reads: DeploymentReads, model_id: str, caller: Caller) -> Row:
    row = reads.model(model_id, workspace=caller.workspace_id)
    if row is None:
        raise not_found(f"model {model_id} not found", field="model_id")
    return row


def _deployment(reads: DeploymentReads, model_id: str, deployment_id: str, caller: Caller) -> Row:
    _model(reads, model_id, caller)
    row = reads.deployment(model_id, deployment_id, workspace=caller.workspace_id)
    if row is None:
        raise not_found(
            f"deployment {deployment_id} of model {model_id} not found", field="deployment_id"
        )
    return row


def _source_checkpoint(reads: DeploymentReads, body: ModelCreate, caller: Caller) -> Row:
    if body.checkpoint_uri is not None:
        row = reads.checkpoint_by_uri(body.checkpoint_uri, workspace=caller.workspace_id)
        if row is None:
            raise not_found(f"checkpoint {body.checkpoint_uri} not found", field="checkpoint_uri")
        return row
    assert body.run_id is not None
    if reads.run(body.run_id, workspace=caller.workspace_id) is None:
        raise not_found(f"run {body.run_id} not found", field="run_id")
    row = reads.sampler_checkpoint(body.run_id, body.checkpoint_name, workspace=caller.workspace_id)
    if row is None:
        if body.checkpoint_name is not None:
            raise not_found(
                f"run {body.run_id} has no sampler_weights checkpoint {body.checkpoint_name}",
                field="checkpoint_name",
            )
        raise not_found(f"run {body.run_id} has no sampler_weights checkpoint", field="run_id")
    return row


def _create_model_command(
    reads: DeploymentReads, body: ModelCreate, caller: Caller, settings: SettingsDep
) -> CreateModel:
    sources = [n for n in ("run_id", "checkpoint_uri", "base_model") if getattr(body, n)]
    if len(sources) != 1:
        raise _bad("give exactly one of run_id, checkpoint_uri or base_model", "run_id")
    if body.checkpoint_name is not None and body.run_id is None:
        raise _bad("checkpoint_name goes with run_id", "checkpoint_name")
    if body.base_model is not None:
        try:
            require_base_model(settings, body.base_model)
        except UnknownBaseModel as exc:
            raise _bad(str(exc), "base_model") from exc
        return CreateModel(name=body.name, source="base_model", base_model=body.base_model)
    checkpoint = _source_checkpoint(reads, body, caller)
    uri = checkpoint["uri"]
    field = "checkpoint_uri" if body.checkpoint_uri else "run_id"
    match = CHECKPOINT_URI.match(uri)
    if match is None or match["kind"] != "sampler_weights":
        raise _bad(f"{uri} is a trainer (weights) checkpoint; deploy a sampler_weights one", field)
    run = reads.run_any_workspace(checkpoint["run_id"])
    if run is None:
        raise not_found(f"run {checkpoint['run_id']} not found", field=field)
    try:
        check_promotable(
            checkpoint_type=checkpoint["checkpoint_type"] or "base",
            position=checkpoint["chain_position"] or 0,
            lora_rank=run["lora_rank"],
        )
    except NotPromotableError as exc:
        raise _bad(f"{uri} cannot be deployed: {exc}", field) from None
    files = tuple(CheckpointFile.model_validate(f) for f in checkpoint["files"] or ())
    return CreateModel(
        name=body.name,
        source="checkpoint",
        checkpoint_uri=uri,
        checkpoint_type=checkpoint["checkpoint_type"] or "base",
        chain_position=checkpoint["chain_position"] or 0,
        lora_rank=run["lora_rank"],
        content_digest=content_digest(files) if files else None,
        base_model=run["base_model"],
    )


def _submit(
    submitter: Submitter, *, request_id: str, command: Command, model_id: str, caller: Caller
) -> None:
    submitter.submit(
        envelope(request_id=request_id, command=command, aggregate_id=model_id, caller=caller),
        to="commands",
    )


@router.post("", status_code=status.HTTP_202_ACCEPTED, responses=error_responses(400, 404))
def create_model(
    body: ModelCreate,
    caller: TrainCaller,
    reads: DeploymentReadDep,
    submitter: SubmitterDep,
    settings: SettingsDep,
    idempotency_key: IdempotencyHeader = None,
    request_id: RequestIdQuery = None,
) -> ModelAccepted:
    """A deployable model from a run's sampler_weights checkpoint (`truss train
    deploy_checkpoints --run-id`: the latest one unless `checkpoint_name`), a checkpoint URI,
    or a registered base model; with `deployment`, its first deployment too. A delta checkpoint
    of a full-parameter run is refused with seed 002's promotability rule."""
    ids = resolve_request_id(
        header=idempotency_key, query=request_id, body=body.request_id,
        workspace=caller.workspace_id,
    )  # fmt: skip
    if ids.chosen:
        model_id = derived_resource_id(ids.command_id, "model")
        deployment_id = derived_resource_id(ids.command_id, "deployment")
    else:
        model_id, deployment_id = new_resource_id(), new_resource_id()
    command = _create_model_command(reads, body, caller, settings)
    spec = None
    if body.deployment is not None:
        _check_deployment(body.deployment, "deployment.")
        spec = DeploymentSpec(
            deployment_id=deployment_id,
            **body.deployment.model_dump(exclude={"request_id"}),
        )
    command = command.model_copy(update={"deployment": spec})
    _submit(submitter, request_id=ids.command_id, command=command, model_id=model_id,
            caller=caller)  # fmt: skip
    return ModelAccepted(
        model_id=model_id,
        deployment_id=deployment_id if spec else None,
        checkpoint_uri=command.checkpoint_uri,
        request_id=ids.request_id,
    )


@router.get("")
def list_models(
    caller: CallerDep,
    reads: DeploymentReadDep,
    limit: int = Query(100, ge=1, le=1000),
    offset: OffsetQuery = 0,
) -> ModelsPublic:
    """The workspace's deployable models, newest first."""
    rows, total = reads.models(workspace=caller.workspace_id, limit=limit, offset=offset)
    return ModelsPublic(models=[ModelPublic.model_validate(r) for r in rows], count=total)


@router.get("/{model_id}", responses=error_responses(404))
def get_model(
    caller: CallerDep, reads: DeploymentReadDep, model_id: str = ModelIdPath
) -> ModelDetail:
    row = _model(reads, model_id, caller)
    deployments = reads.deployments_of_model(model_id, workspace=caller.workspace_id)
    return ModelDetail(
        **ModelPublic.model_validate(row).model_dump(),
        deployments=[DeploymentPublic.of(d) for d in deployments],
    )


@router.get("/{model_id}/deployments", responses=error_responses(404))
def list_deployments(
    caller: CallerDep, reads: DeploymentReadDep, model_id: str = ModelIdPath
) -> DeploymentsPublic:
    """The model's deployments (deleted ones are gone), in creation order."""
    _model(reads, model_id, caller)
    rows = reads.deployments_of_model(model_id, workspace=caller.workspace_id)
    return DeploymentsPublic(deployments=[DeploymentPublic.of(r) for r in rows])


@router.post(
    "/{model_id}/deployments",
    status_code=status.HTTP_202_ACCEPTED,
    responses=error_responses(400, 404),
)
def create_deployment(
    body: DeploymentCreate,
    caller: TrainCaller,
    reads: DeploymentReadDep,
    submitter: SubmitterDep,
    model_id: str = ModelIdPath,
    idempotency_key: IdempotencyHeader = None,
    request_id: RequestIdQuery = None,
) -> DeploymentAccepted:
    """A published deployment (named deployment-N unless `name`), or with `development` the
    model's development deployment (created, or overwritten with these resources)."""
    ids = resolve_request_id(
        header=idempotency_key, query=request_id, body=body.request_id,
        workspace=caller.workspace_id,
    )  # fmt: skip
    _model(reads, model_id, caller)
    _check_deployment(body, "")
    existing = (
        reads.development_deployment(model_id, workspace=caller.workspace_id)
        if body.development
        else None
    )
    if existing is not None:
        deployment_id = existing["deployment_id"]  # pushing again overwrites it
    elif ids.chosen:
        deployment_id = derived_resource_id(ids.command_id, "deployment")
    else:
        deployment_id = new_resource_id()
    command = CreateDeployment(
        deployment_id=deployment_id, **body.model_dump(exclude={"request_id"})
    )
    _submit(submitter, request_id=ids.command_id, command=command, model_id=model_id,
            caller=caller)  # fmt: skip
    return DeploymentAccepted(
        model_id=model_id, deployment_id=deployment_id, request_id=ids.request_id
    )


@router.get("/{model_id}/deployments/{deployment_id}", responses=error_responses(404))
def get_deployment(
    caller: CallerDep,
    reads: DeploymentReadDep,
    model_id: str = ModelIdPath,
    deployment_id: str = DeploymentIdPath,
) -> DeploymentPublic:
    return DeploymentPublic.of(_deployment(reads, model_id, deployment_id, caller))


def _lifecycle(
    command: Command,
    *,
    refuse_status: str | None,
    model_id: str,
    deployment_id: str,
    caller: Caller,
    reads: DeploymentReads,
    submitter: Submitter,
    idempotency_key: str | None,
    request_id: str | None,
) -> DeploymentAccepted:
    ids = resolve_request_id(
        header=idempotency_key, query=request_id, body=None, workspace=caller.workspace_id
    )
    if not submitter.already_submitted(ids.command_id):
        row = _deployment(reads, model_id, deployment_id, caller)
        if refuse_status is not None and row["status"] == refuse_status:
            raise conflict(
                f"deployment {deployment_id} is already {refuse_status.lower()}",
                field="deployment_id",
            )
    _submit(submitter, request_id=ids.command_id, command=command, model_id=model_id,
            caller=caller)  # fmt: skip
    return DeploymentAccepted(
        model_id=model_id, deployment_id=deployment_id, request_id=ids.request_id
    )


LIFECYCLE_ERRORS = error_responses(404, 409)


@router.post(
    "/{model_id}/deployments/{deployment_id}/activate",
    status_code=status.HTTP_202_ACCEPTED,
    responses=LIFECYCLE_ERRORS,
)
def activate_deployment(
    caller: TrainCaller,
    reads: DeploymentReadDep,
    submitter: SubmitterDep,
    model_id: str = ModelIdPath,
    deployment_id: str = DeploymentIdPath,
    idempotency_key: IdempotencyHeader = None,
    request_id: RequestIdQuery = None,
) -> DeploymentAccepted:
    """Serve again a deployment that was deactivated."""
    return _lifecycle(
        ActivateDeployment(deployment_id=deployment_id), refuse_status="ACTIVE",
        model_id=model_id, deployment_id=deployment_id, caller=caller, reads=reads,
        submitter=submitter, idempotency_key=idempotency_key, request_id=request_id,
    )  # fmt: skip


@router.post(
    "/{model_id}/deployments/{deployment_id}/deactivate",
    status_code=status.HTTP_202_ACCEPTED,
    responses=LIFECYCLE_ERRORS,
)
def deactivate_deployment(
    caller: TrainCaller,
    reads: DeploymentReadDep,
    submitter: SubmitterDep,
    model_id: str = ModelIdPath,
    deployment_id: str = DeploymentIdPath,
    idempotency_key: IdempotencyHeader = None,
    request_id: RequestIdQuery = None,
) -> DeploymentAccepted:
    """Stop serving, keep the configuration: "API requests return a 404 error while
    deactivated" (seed 003); activate to serve again."""
    return _lifecycle(
        DeactivateDeployment(deployment_id=deployment_id), refuse_status="INACTIVE",
        model_id=model_id, deployment_id=deployment_id, caller=caller, reads=reads,
        submitter=submitter, idempotency_key=idempotency_key, request_id=request_id,
    )  # fmt: skip


@router.delete(
    "/{model_id}/deployments/{deployment_id}",
    status_code=status.HTTP_202_ACCEPTED,
    responses=LIFECYCLE_ERRORS,
)
def delete_deployment(
    caller: TrainCaller,
    reads: DeploymentReadDep,
    submitter: SubmitterDep,
    model_id: str = ModelIdPath,
    deployment_id: str = DeploymentIdPath,
    idempotency_key: IdempotencyHeader = None,
    request_id: RequestIdQuery = None,
) -> DeploymentAccepted:
    """Delete permanently: gone from listings, 404 afterwards; its events stay in the log."""
    return _lifecycle(
        DeleteDeployment(deployment_id=deployment_id), refuse_status=None,
        model_id=model_id, deployment_id=deployment_id, caller=caller, reads=reads,
        submitter=submitter, idempotency_key=idempotency_key, request_id=request_id,
    )  # fmt: skip


@router.patch(
    "/{model_id}/deployments/{deployment_id}/resources",
    status_code=status.HTTP_202_ACCEPTED,
    responses=error_responses(400, 404),
)
def change_resources(
    body: DeploymentResourcesChange,
    caller: TrainCaller,
    reads: DeploymentReadDep,
    submitter: SubmitterDep,
    model_id: str = ModelIdPath,
    deployment_id: str = DeploymentIdPath,
    idempotency_key: IdempotencyHeader = None,
    request_id: RequestIdQuery = None,
) -> DeploymentAccepted:
    """Another instance type: "Changing the instance type deploys a copy of the deployment"
    (seed 003). The answer names the new deployment; the old one is left as it is."""
    ids = resolve_request_id(
        header=idempotency_key, query=request_id, body=body.request_id,
        workspace=caller.workspace_id,
    )  # fmt: skip
    source = _deployment(reads, model_id, deployment_id, caller)
    _check_resources(body.resources, "")
    if source["kind"] == "development":
        raise _bad(
            "a development deployment takes new resources in place: create the development "
            "deployment again (it is overwritten), or create a published deployment",
            "deployment_id",
        )
    instance = select_instance_type(**body.resources.model_dump())
    if instance.name == source["instance_type"]:
        raise _bad(f"deployment {deployment_id} already runs on {instance.name}", "resources")
    new_id = derived_resource_id(ids.command_id, "deployment") if ids.chosen else new_resource_id()
    command = ChangeDeploymentInstanceType(
        deployment_id=deployment_id, new_deployment_id=new_id, name=body.name,
        resources=body.resources,
    )  # fmt: skip
    _submit(submitter, request_id=ids.command_id, command=command, model_id=model_id,
            caller=caller)  # fmt: skip
    return DeploymentAccepted(
        model_id=model_id, deployment_id=new_id, copied_from=deployment_id,
        request_id=ids.request_id,
    )  # fmt: skip


@router.post(
    "/{model_id}/deployments/{deployment_id}/weights",
    status_code=status.HTTP_202_ACCEPTED,
    responses=error_responses(400, 404),
)
def update_weights(
    body: DeploymentWeightsUpdate,
    caller: TrainCaller,
    reads: DeploymentReadDep,
    submitter: SubmitterDep,
    model_id: str = ModelIdPath,
    deployment_id: str = DeploymentIdPath,
    idempotency_key: IdempotencyHeader = None,
    request_id: RequestIdQuery = None,
) -> DeploymentWeightsAccepted:
    """Seed 002's weight sync into a deployment: its ready replicas hot-load a sampler_weights
    checkpoint (a base, or a delta onto what they serve), warm up and reset their prompt cache;
    replicas started afterwards start on it. Unlike creating a model, a delta is allowed. A
    replica that cannot verify or apply the chain refuses it and serves its weights on; follow
    it on `GET .../weights`."""
    ids = resolve_request_id(
        header=idempotency_key, query=request_id, body=body.request_id,
        workspace=caller.workspace_id,
    )  # fmt: skip
    _deployment(reads, model_id, deployment_id, caller)
    model = _model(reads, model_id, caller)
    uri = body.checkpoint_uri
    match = CHECKPOINT_URI.match(uri)
    if match is None or match["kind"] != "sampler_weights":
        raise _bad(f"{uri} is a trainer (weights) checkpoint; sync a sampler_weights one",
                   "checkpoint_uri")  # fmt: skip
    checkpoint = reads.checkpoint_by_uri(uri, workspace=caller.workspace_id)
    if checkpoint is None:
        raise not_found(f"checkpoint {uri} not found", field="checkpoint_uri")
    run = reads.run_any_workspace(checkpoint["run_id"])
    if run is None:
        raise not_found(f"run {checkpoint['run_id']} not found", field="checkpoint_uri")
    if run["base_model"] != model["base_model"]:
        raise _bad(
            f"{uri} holds weights for {run['base_model']!r}; model {model_id} serves "
            f"{model['base_model']!r}",
            "checkpoint_uri",
        )
    files = tuple(CheckpointFile.model_validate(f) for f in checkpoint["files"] or ())
    if not files:
        raise _bad(f"{uri} has no files recorded", "checkpoint_uri")
    command = UpdateDeploymentWeights(
        deployment_id=deployment_id,
        checkpoint_uri=uri,
        checkpoint_type=checkpoint["checkpoint_type"] or "base",
        chain_position=checkpoint["chain_position"] or 0,
        content_digest=content_digest(files),
        base_model=run["base_model"],
        warmup=body.warmup,
        warmup_max_retries=body.warmup_max_retries,
        reset_prompt_cache=body.reset_prompt_cache,
    )
    _submit(submitter, request_id=ids.command_id, command=command, model_id=model_id,
            caller=caller)  # fmt: skip
    return DeploymentWeightsAccepted(
        model_id=model_id, deployment_id=deployment_id, checkpoint_uri=uri,
        request_id=ids.request_id,
    )  # fmt: skip


@router.get("/{model_id}/deployments/{deployment_id}/weights", responses=error_responses(404))
def get_weights(
    caller: CallerDep,
    reads: DeploymentReadDep,
    model_id: str = ModelIdPath,
    deployment_id: str = DeploymentIdPath,
) -> DeploymentWeightsPublic:
    """The weight sync state (seed 002's `check_deployment_state`): the target weights and, per
    live replica, the version and digest it serves and its last hotload (status, reason,
    timings). `synced`: every READY replica serves the target."""
    row = _deployment(reads, model_id, deployment_id, caller)
    if row["weights_version"]:
        target = TargetWeightsPublic(
            weights_version=row["weights_version"],
            checkpoint_uri=row["weights_checkpoint_uri"],
            content_digest=row["weights_content_digest"],
            checkpoint_type=row["weights_checkpoint_type"],
            updated_at=row["weights_updated_at"],
        )
    else:
        model = _model(reads, model_id, caller)
        target = TargetWeightsPublic(
            weights_version=0,
            checkpoint_uri=model["checkpoint_uri"],
            content_digest=model["content_digest"],
            checkpoint_type=model["checkpoint_type"],
            updated_at=None,
        )
    replicas = [
        ReplicaWeightsPublic.model_validate(r)
        for r in reads.live_replicas(deployment_id, workspace=caller.workspace_id)
    ]
    ready = [r for r in replicas if r.status == "READY"]
    return DeploymentWeightsPublic(
        model_id=model_id,
        deployment_id=deployment_id,
        status=row["status"],
        version=row["version"],
        target=target,
        replicas=replicas,
        ready=bool(ready),
        synced=all(r.weights_version == target.weights_version for r in ready),
    )
