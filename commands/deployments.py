"""Models and their deployments (seed 003 "Deployments", "Resources"; seed 000's
`truss train deploy_checkpoints`): commands, state, decide and evolve.

Aggregate type `model`, id = the model id. A model holds the weights to serve: a promotable
sampler_weights checkpoint of a Loops run (seed 002's rule: a delta checkpoint of a
full-parameter run is refused), or a registered base model (a Hugging Face-format folder, see
`loopstream models add`). Its deployments are entities inside it (see events/deployments.py for
why): each has a lifecycle of its own, decided by the `_deployment_*` functions below against
that deployment's state only; what spans deployments (numbering, one development deployment per
model) is decided by the model.

Facts about the source checkpoint (its type, chain position, the run's LoRA rank, digest) come
in with the command: the API reads them from the checkpoint's read model, as it does for a
run's `from_checkpoint`. The rule is applied here, on those facts, so every producer of a
`CreateModel` gets the same answer.

Pure: no I/O, no clock; ids come in with the commands.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field, replace
from datetime import datetime
from types import MappingProxyType
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from commands.instance_types import InstanceType, ResourceError, select_instance_type
from commands.loops import (
    CHECKPOINT_URI,
    RESOURCE_ID,
    Command,
    NotPromotableError,
    Rejected,
    check_promotable,
)
from commands.model_names import outside_model_root
from events.deployments import (
    DeploymentActivated,
    DeploymentCreated,
    DeploymentDeactivated,
    DeploymentDeleted,
    DeploymentKind,
    DeploymentWeightsUpdated,
    DevelopmentDeploymentOverwritten,
    ModelCreated,
    ModelSource,
)
from events.limits import MAX_COUNT, ShortText
from events.loops import CheckpointType, DomainEvent

AGGREGATE_TYPE = "model"

DEPLOYMENT_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
DEFAULT_NAME = re.compile(r"^deployment-(?P<n>[0-9]+)$")
# The seed's development deployment: "Single replica, scales to zero".
DEVELOPMENT_REPLICAS = (0, 1)
# The seed's autoscaling defaults (003 "Autoscaling"): min 0 (scale to zero), max 1.
DEFAULT_MIN_REPLICA = 0
DEFAULT_MAX_REPLICA = 1
DeploymentStatus = Literal["ACTIVE", "INACTIVE", "DELETED"]


def _as_text(value: object) -> object:
    """config.yaml writes `cpu: "4"` or `cpu: 4`: both mean four cores."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return value


ResourceText = Annotated[str, BeforeValidator(_as_text), Field(min_length=1, max_length=32)]


class Resources(BaseModel):
    """A deployment's resources, as the seed's `config.yaml` `resources:` block."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    accelerator: ResourceText | None = Field(default=None, description='e.g. "L4" or "A100:2"')
    cpu: ResourceText | None = Field(default=None, description='vCPUs, e.g. "4" (default "1")')
    memory: ResourceText | None = Field(default=None, description='e.g. "16Gi" (default "2Gi")')
    instance_type: ResourceText | None = Field(
        default=None, description='the exact SKU, e.g. "L4:4x16"; the other fields are ignored'
    )


class DeploymentSpec(BaseModel):
    """What a new deployment asks for."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    deployment_id: str = Field(pattern=RESOURCE_ID)
    name: str | None = Field(default=None, pattern=DEPLOYMENT_NAME,
                             description="default deployment-N, N counting per model")  # fmt: skip
    development: bool = Field(default=False, description="the model's development deployment")
    resources: Resources = Field(default_factory=Resources)
    min_replica: int | None = Field(default=None, ge=0, le=MAX_COUNT, description="default 0")
    max_replica: int | None = Field(default=None, ge=1, le=MAX_COUNT, description="default 1")


# --- commands --------------------------------------------------------------------------------


class CreateModel(Command):
    """A deployable model from a checkpoint of this system or a registered base model, with an
    optional first deployment (`truss train deploy_checkpoints` makes both at once)."""

    name: ShortText | None = None
    source: ModelSource
    checkpoint_uri: str | None = Field(
        default=None, max_length=300, description="bt://loops:<run>/sampler_weights/<name>"
    )
    # Facts about the checkpoint, read by the API from its read model.
    checkpoint_type: CheckpointType | None = None
    chain_position: int | None = Field(default=None, ge=0, le=2**31 - 1)
    lora_rank: int | None = Field(default=None, ge=0, le=1024)
    content_digest: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    base_model: ShortText
    deployment: DeploymentSpec | None = None


class CreateDeployment(DeploymentSpec, Command):
    pass


class ChangeDeploymentInstanceType(Command):
    """The seed: "Changing the instance type deploys a copy of the deployment using the
    specified instance type" — a new published deployment, `copied_from` the old one."""

    deployment_id: str = Field(pattern=RESOURCE_ID)
    new_deployment_id: str = Field(pattern=RESOURCE_ID)
    name: str | None = Field(default=None, pattern=DEPLOYMENT_NAME)
    resources: Resources


class ActivateDeployment(Command):
    deployment_id: str = Field(pattern=RESOURCE_ID)


class DeactivateDeployment(Command):
    deployment_id: str = Field(pattern=RESOURCE_ID)


class DeleteDeployment(Command):
    deployment_id: str = Field(pattern=RESOURCE_ID)


class UpdateDeploymentWeights(Command):
    """Seed 002's weight sync into a deployment: its replicas hot-load a sampler_weights
    checkpoint (a base, or a delta onto what they serve) and warm up on it.

    Facts about the checkpoint (type, chain position, digest, the base model its run trains)
    come in with the command, read by the API from the checkpoint's read model (the caller's
    workspace's, or a published one)."""

    deployment_id: str = Field(pattern=RESOURCE_ID)
    checkpoint_uri: str = Field(max_length=300, description="bt://loops:<run>/sampler_weights/<n>")
    checkpoint_type: CheckpointType
    chain_position: int = Field(ge=0, le=2**31 - 1)
    content_digest: str = Field(pattern=r"^[0-9a-f]{64}$")
    base_model: ShortText = Field(description="the base model the checkpoint's run trains")
    warmup: bool = Field(default=True, description="a warmup generation after the swap")
    warmup_max_retries: int = Field(default=10, ge=0, le=100)
    reset_prompt_cache: bool = Field(default=True, description="drop prompts cached before")


COMMANDS: tuple[type[Command], ...] = (
    CreateModel,
    CreateDeployment,
    ChangeDeploymentInstanceType,
    ActivateDeployment,
    DeactivateDeployment,
    DeleteDeployment,
    UpdateDeploymentWeights,
)


# --- state -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeploymentState:
    deployment_id: str
    name: str
    number: int
    kind: DeploymentKind
    status: DeploymentStatus
    instance_type: str
    min_replica: int
    max_replica: int
    copied_from: str | None = None
    weights_version: int = 0  # of the last DeploymentWeightsUpdated (0: the model's weights)


def _frozen_map() -> MappingProxyType:
    return MappingProxyType({})


@dataclass(frozen=True)
class ModelState:
    model_id: str
    exists: bool = False
    name: str | None = None
    source: ModelSource | None = None
    checkpoint_uri: str | None = None
    base_model: str | None = None
    deployments: MappingProxyType = field(default_factory=_frozen_map)  # id -> DeploymentState
    deployments_created: int = 0  # numbers are never reused, not even after a delete
    version: int = 0  # sequence of the last event applied

    def live(self) -> list[DeploymentState]:
        return [d for d in self.deployments.values() if d.status != "DELETED"]

    @property
    def development(self) -> DeploymentState | None:
        return next((d for d in self.live() if d.kind == "development"), None)


def initial_state(aggregate_id: str) -> ModelState:
    return ModelState(model_id=aggregate_id)


# --- decide ----------------------------------------------------------------------------------


def decide(state: ModelState, command: Command, *, now: datetime) -> list[DomainEvent]:
    """The events `command` causes in `state`, or `Rejected` naming the field or rule."""
    if isinstance(command, CreateModel):
        return _create_model(command, state)
    if not state.exists:
        raise Rejected(f"model {state.model_id} does not exist", field="aggregate_id")
    return _decide(command, state)


def _create_model(command: CreateModel, state: ModelState) -> list[DomainEvent]:
    if state.exists:
        raise Rejected(f"model {state.model_id} already exists", field="aggregate_id")
    if not re.match(RESOURCE_ID, state.model_id):
        raise Rejected(f"a model id must match {RESOURCE_ID}", field="aggregate_id")
    # A name under the model root, never a path out of it: the API checks this too, but a
    # command sent straight to Kafka skips the API.
    problem = outside_model_root(command.base_model)
    if problem is not None:
        raise Rejected(f"base model {command.base_model!r} {problem}", field="base_model")
    run_id = None
    if command.source == "checkpoint":
        run_id, checkpoint_name = _check_checkpoint_source(command)
        name = command.name or f"{run_id}-{checkpoint_name}"
    else:
        for field_name in ("checkpoint_uri", "checkpoint_type", "chain_position", "lora_rank"):
            if getattr(command, field_name) is not None:
                raise Rejected(f"{field_name} is for source 'checkpoint' only", field=field_name)
        name = command.name or command.base_model
    created = ModelCreated(
        model_id=state.model_id,
        name=name,
        source=command.source,
        checkpoint_uri=command.checkpoint_uri,
        run_id=run_id,
        checkpoint_type=command.checkpoint_type,
        chain_position=command.chain_position,
        lora_rank=command.lora_rank,
        content_digest=command.content_digest,
        base_model=command.base_model,
    )
    events: list[DomainEvent] = [created]
    if command.deployment is not None:
        model = evolve(state, created)
        events.append(_new_deployment(model, command.deployment, field_prefix="deployment."))
    return events


def _check_checkpoint_source(command: CreateModel) -> tuple[str, str]:
    """(run id, checkpoint name) of a deployable checkpoint, or `Rejected`."""
    uri = command.checkpoint_uri
    match = CHECKPOINT_URI.match(uri or "")
    if match is None:
        raise Rejected(
            "checkpoint_uri must look like bt://loops:<run_id>/sampler_weights/<name>",
            field="checkpoint_uri",
        )
    if match["kind"] != "sampler_weights":
        raise Rejected(
            f"{uri} is a trainer (weights) checkpoint; deploy a sampler_weights checkpoint",
            field="checkpoint_uri",
        )
    if command.checkpoint_type is None or command.chain_position is None:
        raise Rejected("checkpoint_type and chain_position are required", field="checkpoint_type")
    if command.lora_rank is None:
        raise Rejected("lora_rank of the checkpoint's run is required", field="lora_rank")
    try:
        check_promotable(
            checkpoint_type=command.checkpoint_type,
            position=command.chain_position,
            lora_rank=command.lora_rank,
        )
    except NotPromotableError as exc:
        raise Rejected(f"{uri} cannot be deployed: {exc}", field="checkpoint_uri") from None
    return match["run_id"], match["name"]


def _resolve(resources: Resources, *, field_prefix: str) -> InstanceType:
    try:
        return select_instance_type(
            accelerator=resources.accelerator,
            cpu=resources.cpu,
            memory=resources.memory,
            instance_type=resources.instance_type,
        )
    except ResourceError as exc:
        raise Rejected(str(exc), field=f"{field_prefix}resources.{exc.field}") from None


def _next_name(state: ModelState) -> tuple[int, str]:
    """The next deployment's number and default name: deployment-N, skipping a name a
    deployment already has (one named so by hand)."""
    taken = {d.name for d in state.live()}
    number = state.deployments_created + 1
    candidate = number
    while f"deployment-{candidate}" in taken:
        candidate += 1
    return number, f"deployment-{candidate}"


def _check_new_id_and_name(state: ModelState, deployment_id: str, name: str | None,
                           *, field_prefix: str) -> None:  # fmt: skip
    if deployment_id in state.deployments:
        raise Rejected(
            f"deployment {deployment_id} already exists", field=f"{field_prefix}deployment_id"
        )
    if name is not None and any(d.name == name for d in state.live()):
        raise Rejected(
            f"model {state.model_id} already has a deployment named {name}",
            field=f"{field_prefix}name",
        )


def _new_deployment(
    state: ModelState, spec: DeploymentSpec, *, field_prefix: str = ""
) -> DeploymentCreated | DevelopmentDeploymentOverwritten:
    instance = _resolve(spec.resources, field_prefix=field_prefix)
    resources = spec.resources
    if spec.development:
        for field_name, value, fixed in zip(
            ("min_replica", "max_replica"), (spec.min_replica, spec.max_replica),
            DEVELOPMENT_REPLICAS, strict=True,
        ):  # fmt: skip
            if value is not None and value != fixed:
                raise Rejected(
                    f"{field_name} of a development deployment is fixed at {fixed} (single "
                    "replica, scales to zero); a published deployment takes other counts",
                    field=f"{field_prefix}{field_name}",
                )
        existing = state.development
        if existing is not None:
            if existing.deployment_id != spec.deployment_id:
                raise Rejected(
                    f"model {state.model_id} already has a development deployment "
                    f"({existing.deployment_id}); pushing to it overwrites its resources",
                    field=f"{field_prefix}development",
                )
            # `truss push --watch`: "Overwrites the existing development deployment".
            return DevelopmentDeploymentOverwritten(
                model_id=state.model_id,
                deployment_id=existing.deployment_id,
                instance_type=instance.name,
                accelerator=instance.accelerator,
                gpu_count=instance.gpu_count,
                cpu=resources.cpu,
                memory=resources.memory,
                requested_instance_type=resources.instance_type,
            )
        min_replica, max_replica = DEVELOPMENT_REPLICAS
    else:
        min_replica = DEFAULT_MIN_REPLICA if spec.min_replica is None else spec.min_replica
        max_replica = DEFAULT_MAX_REPLICA if spec.max_replica is None else spec.max_replica
        if min_replica > max_replica:
            raise Rejected(
                f"min_replica {min_replica} is above max_replica {max_replica}",
                field=f"{field_prefix}min_replica",
            )
    _check_new_id_and_name(state, spec.deployment_id, spec.name, field_prefix=field_prefix)
    number, default_name = _next_name(state)
    return DeploymentCreated(
        model_id=state.model_id,
        deployment_id=spec.deployment_id,
        name=spec.name or default_name,
        number=number,
        kind="development" if spec.development else "published",
        instance_type=instance.name,
        accelerator=instance.accelerator,
        gpu_count=instance.gpu_count,
        cpu=resources.cpu,
        memory=resources.memory,
        requested_instance_type=resources.instance_type,
        min_replica=min_replica,
        max_replica=max_replica,
    )


@functools.singledispatch
def _decide(command: Command, state: ModelState) -> list[DomainEvent]:
    raise Rejected(f"{type(command).__name__} is not a model command", field="type")


@_decide.register
def _(command: CreateDeployment, state: ModelState) -> list[DomainEvent]:
    return [_new_deployment(state, command)]


def _live_deployment(state: ModelState, deployment_id: str) -> DeploymentState:
    deployment = state.deployments.get(deployment_id)
    if deployment is None or deployment.status == "DELETED":
        raise Rejected(
            f"deployment {deployment_id} of model {state.model_id} does not exist",
            field="deployment_id",
        )
    return deployment


@_decide.register
def _(command: ChangeDeploymentInstanceType, state: ModelState) -> list[DomainEvent]:
    source = _live_deployment(state, command.deployment_id)
    if source.kind == "development":
        raise Rejected(
            "a development deployment takes new resources in place: create the development "
            "deployment again (it is overwritten), or create a published deployment",
            field="deployment_id",
        )
    instance = _resolve(command.resources, field_prefix="")
    if instance.name == source.instance_type:
        raise Rejected(
            f"deployment {source.deployment_id} already runs on {instance.name}",
            field="resources",
        )
    _check_new_id_and_name(state, command.new_deployment_id, command.name, field_prefix="")
    number, default_name = _next_name(state)
    resources = command.resources
    return [
        DeploymentCreated(
            model_id=state.model_id,
            deployment_id=command.new_deployment_id,
            name=command.name or default_name,
            number=number,
            kind="published",
            instance_type=instance.name,
            accelerator=instance.accelerator,
            gpu_count=instance.gpu_count,
            cpu=resources.cpu,
            memory=resources.memory,
            requested_instance_type=resources.instance_type,
            min_replica=source.min_replica,
            max_replica=source.max_replica,
            copied_from=source.deployment_id,
        )
    ]


# The deployment entity's own lifecycle: each decided on that deployment's state alone.


@_decide.register
def _(command: ActivateDeployment, state: ModelState) -> list[DomainEvent]:
    deployment = _live_deployment(state, command.deployment_id)
    if deployment.status == "ACTIVE":
        raise Rejected(f"deployment {deployment.deployment_id} is already active",
                       field="deployment_id")  # fmt: skip
    return [DeploymentActivated(model_id=state.model_id, deployment_id=deployment.deployment_id)]


@_decide.register
def _(command: DeactivateDeployment, state: ModelState) -> list[DomainEvent]:
    deployment = _live_deployment(state, command.deployment_id)
    if deployment.status == "INACTIVE":
        raise Rejected(f"deployment {deployment.deployment_id} is already inactive",
                       field="deployment_id")  # fmt: skip
    return [DeploymentDeactivated(model_id=state.model_id, deployment_id=deployment.deployment_id)]


@_decide.register
def _(command: DeleteDeployment, state: ModelState) -> list[DomainEvent]:
    deployment = _live_deployment(state, command.deployment_id)
    # The seed: "production deployments must be replaced before deletion". No deployment is in
    # an environment yet (environments come with a later slice), so every live one may go.
    return [DeploymentDeleted(model_id=state.model_id, deployment_id=deployment.deployment_id)]


@_decide.register
def _(command: UpdateDeploymentWeights, state: ModelState) -> list[DomainEvent]:
    deployment = _live_deployment(state, command.deployment_id)
    uri = command.checkpoint_uri
    match = CHECKPOINT_URI.match(uri)
    if match is None:
        raise Rejected(
            "checkpoint_uri must look like bt://loops:<run_id>/sampler_weights/<name>",
            field="checkpoint_uri",
        )
    if match["kind"] != "sampler_weights":
        raise Rejected(
            f"{uri} is a trainer (weights) checkpoint; sync a sampler_weights checkpoint",
            field="checkpoint_uri",
        )
    if command.base_model != state.base_model:
        raise Rejected(
            f"{uri} holds weights for {command.base_model!r}; model {state.model_id} serves "
            f"{state.base_model!r}",
            field="checkpoint_uri",
        )
    # Unlike creating a model, a delta is allowed: the seed's syncer sends a base, then deltas
    # onto it. Whether it chains onto what the replicas serve only the replicas can tell (they
    # verify every link's digest before touching a weight, and refuse otherwise).
    return [
        DeploymentWeightsUpdated(
            model_id=state.model_id,
            deployment_id=deployment.deployment_id,
            checkpoint_uri=uri,
            content_digest=command.content_digest,
            checkpoint_type=command.checkpoint_type,
            chain_position=command.chain_position,
            weights_version=deployment.weights_version + 1,
            warmup=command.warmup,
            warmup_max_retries=command.warmup_max_retries,
            reset_prompt_cache=command.reset_prompt_cache,
        )
    ]


# --- evolve ----------------------------------------------------------------------------------


def evolve(state: ModelState, event: DomainEvent) -> ModelState:
    """Fold one event into the state. The caller advances `version`."""
    return _evolve(event, state)


@functools.singledispatch
def _evolve(event: DomainEvent, state: ModelState) -> ModelState:
    return state


@_evolve.register
def _(event: ModelCreated, state: ModelState) -> ModelState:
    return replace(
        state,
        exists=True,
        name=event.name,
        source=event.source,
        checkpoint_uri=event.checkpoint_uri,
        base_model=event.base_model,
    )


def _with(state: ModelState, deployment: DeploymentState) -> ModelState:
    deployments = dict(state.deployments)
    deployments[deployment.deployment_id] = deployment
    return replace(state, deployments=MappingProxyType(deployments))


@_evolve.register
def _(event: DeploymentCreated, state: ModelState) -> ModelState:
    deployment = DeploymentState(
        deployment_id=event.deployment_id,
        name=event.name,
        number=event.number,
        kind=event.kind,
        status="ACTIVE",
        instance_type=event.instance_type,
        min_replica=event.min_replica,
        max_replica=event.max_replica,
        copied_from=event.copied_from,
    )
    return replace(
        _with(state, deployment), deployments_created=max(state.deployments_created, event.number)
    )


def _change(state: ModelState, deployment_id: str, **changes: object) -> ModelState:
    deployment = state.deployments.get(deployment_id)
    if deployment is None:
        return state
    return _with(state, replace(deployment, **changes))  # type: ignore[arg-type]


@_evolve.register
def _(event: DevelopmentDeploymentOverwritten, state: ModelState) -> ModelState:
    return _change(state, event.deployment_id, instance_type=event.instance_type)


@_evolve.register
def _(event: DeploymentActivated, state: ModelState) -> ModelState:
    return _change(state, event.deployment_id, status="ACTIVE")


@_evolve.register
def _(event: DeploymentDeactivated, state: ModelState) -> ModelState:
    return _change(state, event.deployment_id, status="INACTIVE")


@_evolve.register
def _(event: DeploymentDeleted, state: ModelState) -> ModelState:
    return _change(state, event.deployment_id, status="DELETED")


@_evolve.register
def _(event: DeploymentWeightsUpdated, state: ModelState) -> ModelState:
    return _change(state, event.deployment_id, weights_version=event.weights_version)
