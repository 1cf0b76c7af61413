"""Events of the serving context's models and deployments (aggregate type `model`).

A model is the consistency boundary of its deployments, as a Loops session is of its runs and
checkpoints: the seed's rules that span a model's deployments (names `deployment-1`,
`deployment-2`... counting per model, one development deployment per model, "production
deployments must be replaced before deletion") are checked in one place, in order, without a
distributed lock. Every deployment event carries `deployment_id`, so a consumer that follows one
deployment (the replica controller to come) filters the model's stream by it.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from events.loops import CheckpointType, DomainEvent

ModelSource = Literal["checkpoint", "base_model"]
DeploymentKind = Literal["published", "development"]


class ModelEvent(DomainEvent):
    aggregate_type: ClassVar[str] = "model"

    model_id: str


class ModelCreated(ModelEvent):
    """A deployable model: the weights every deployment of it serves."""

    name: str
    source: ModelSource
    # source "checkpoint": a sampler_weights checkpoint of a Loops run, promotable (seed 002).
    checkpoint_uri: str | None = None
    run_id: str | None = None
    checkpoint_type: CheckpointType | None = None
    chain_position: int | None = None
    lora_rank: int | None = None
    content_digest: str | None = Field(default=None, description="sha256 over the files")
    # The base model the weights are for (source "base_model": the weights themselves).
    base_model: str


class DeploymentEvent(ModelEvent):
    deployment_id: str


class DeploymentCreated(DeploymentEvent):
    """A deployment of the model: published, or the model's development deployment.

    The resources as asked (`accelerator`, `cpu`, `memory`, or `instance_type`) and the instance
    type they resolved to (commands/instance_types.py) are both kept."""

    name: str
    number: int = Field(ge=1, description="the model's n-th deployment (deployment-n)")
    kind: DeploymentKind
    instance_type: str
    accelerator: str | None = None
    gpu_count: int = Field(ge=0)
    cpu: str | None = Field(default=None, description='as asked, e.g. "4"')
    memory: str | None = Field(default=None, description='as asked, e.g. "16Gi"')
    requested_instance_type: str | None = None
    min_replica: int = Field(ge=0)
    max_replica: int = Field(ge=1)
    copied_from: str | None = Field(
        default=None, description="the deployment this one copies with another instance type"
    )


class DevelopmentDeploymentOverwritten(DeploymentEvent):
    """The seed's `truss push --watch`: the existing development deployment takes the new
    resource configuration (same id and name)."""

    instance_type: str
    accelerator: str | None = None
    gpu_count: int = Field(ge=0)
    cpu: str | None = None
    memory: str | None = None
    requested_instance_type: str | None = None


class DeploymentActivated(DeploymentEvent):
    pass


class DeploymentDeactivated(DeploymentEvent):
    """Serving stops; the deployment stays visible and can be activated again. "API requests
    return a 404 error while deactivated" (seed 003)."""


class DeploymentDeleted(DeploymentEvent):
    """Permanent: the deployment is gone from listings and answers 404; its events stay."""


class DeploymentWeightsUpdated(DeploymentEvent):
    """The deployment's target weights (seed 002's weight sync into a deployment): every ready
    replica hot-loads them, and replicas started from now on start on them. A delta must chain
    onto what the replicas serve; each replica verifies the chain and refuses what does not
    check out (`ReplicaHotloadFailed`), serving its previous weights on."""

    checkpoint_uri: str
    content_digest: str = Field(description="sha256 over the checkpoint's files")
    checkpoint_type: CheckpointType
    chain_position: int = Field(ge=0)
    weights_version: int = Field(ge=1, description="1, 2, 3... per deployment")
    warmup: bool = Field(description="a warmup generation after the swap, rolled back if none")
    warmup_max_retries: int = Field(ge=0)
    reset_prompt_cache: bool


DEPLOYMENT_EVENTS: tuple[type[DomainEvent], ...] = (
    ModelCreated,
    DeploymentCreated,
    DevelopmentDeploymentOverwritten,
    DeploymentActivated,
    DeploymentDeactivated,
    DeploymentDeleted,
    DeploymentWeightsUpdated,
)
