"""Request and response models of `/v1/models` (models and their deployments).

Field names follow seed 003: `resources` as in `config.yaml` (`accelerator`, `cpu`, `memory`,
`instance_type`), `min_replica` / `max_replica` as in the autoscaling settings, statuses
`ACTIVE` / `INACTIVE`.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from api.models import REQUEST_ID
from commands.deployments import DEPLOYMENT_NAME, Resources
from commands.loops import CHECKPOINT_NAME, RESOURCE_ID, CheckpointUri
from events.limits import MAX_COUNT, RequestKey, ShortText


class DeploymentCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str | None = Field(default=None, pattern=DEPLOYMENT_NAME,
                             description="default deployment-N, N counting per model")  # fmt: skip
    development: bool = Field(
        default=False,
        description="the model's development deployment: one replica, scales to zero "
        "(min_replica 0, max_replica 1, fixed); creating it again overwrites its resources",
    )
    resources: Resources = Field(default_factory=Resources)
    min_replica: int | None = Field(default=None, ge=0, le=MAX_COUNT, description="default 0")
    max_replica: int | None = Field(default=None, ge=1, le=MAX_COUNT, description="default 1")
    request_id: RequestKey | None = REQUEST_ID


class ModelCreate(BaseModel):
    """One source: `run_id` (+ `checkpoint_name`, default the run's latest sampler_weights
    checkpoint), `checkpoint_uri`, or `base_model` (a registered base model / HF folder)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: ShortText | None = Field(default=None, description="default <run>-<checkpoint>")
    run_id: str | None = Field(default=None, pattern=RESOURCE_ID)
    checkpoint_name: str | None = Field(default=None, pattern=CHECKPOINT_NAME)
    checkpoint_uri: CheckpointUri | None = None
    base_model: ShortText | None = None
    deployment: DeploymentCreate | None = Field(
        default=None, description="a first deployment, made with the model"
    )
    request_id: RequestKey | None = REQUEST_ID


class DeploymentResourcesChange(BaseModel):
    """A new instance type: deploys a copy (a new published deployment)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    resources: Resources
    name: str | None = Field(default=None, pattern=DEPLOYMENT_NAME)
    request_id: RequestKey | None = REQUEST_ID


class DeploymentWeightsUpdate(BaseModel):
    """Seed 002's weight sync into a deployment: a sampler_weights checkpoint (a base, or a delta
    onto what the replicas serve) and what the replicas do around the swap."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    checkpoint_uri: CheckpointUri = Field(
        description="bt://loops:<run_id>/sampler_weights/<name>, the workspace's or published"
    )
    warmup: bool = Field(default=True, description="a warmup generation after the swap")
    warmup_max_retries: int = Field(default=10, ge=0, le=100)
    reset_prompt_cache: bool = Field(default=True, description="drop prompts cached before")
    request_id: RequestKey | None = REQUEST_ID


class Public(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class DeploymentPublic(Public):
    id: str = Field(validation_alias="deployment_id")
    deployment_id: str
    model_id: str
    name: str
    number: int
    kind: str = Field(description="published or development")
    is_development: bool = False
    status: str = Field(description="ACTIVE or INACTIVE")
    instance_type: str
    accelerator: str | None
    gpu_count: int
    cpu: str | None
    memory: str | None
    requested_instance_type: str | None
    min_replica: int
    max_replica: int
    copied_from: str | None
    created_at: datetime
    deactivated_at: datetime | None
    updated_at: datetime

    @classmethod
    def of(cls, row: dict) -> DeploymentPublic:
        return cls.model_validate({**row, "is_development": row["kind"] == "development"})


class ModelPublic(Public):
    id: str = Field(validation_alias="model_id")
    model_id: str
    name: str
    source: str = Field(description="checkpoint or base_model")
    checkpoint_uri: str | None
    run_id: str | None
    checkpoint_type: str | None
    chain_position: int | None
    lora_rank: int | None
    content_digest: str | None
    base_model: str
    created_at: datetime
    deployments_count: int = 0


class ModelDetail(ModelPublic):
    deployments: list[DeploymentPublic]


class ModelsPublic(BaseModel):
    models: list[ModelPublic]
    count: int


class DeploymentsPublic(BaseModel):
    deployments: list[DeploymentPublic]


class ModelAccepted(BaseModel):
    model_id: str
    deployment_id: str | None = None
    checkpoint_uri: str | None = None
    request_id: str


class DeploymentAccepted(BaseModel):
    model_id: str
    deployment_id: str
    copied_from: str | None = None
    request_id: str


class DeploymentWeightsAccepted(BaseModel):
    model_id: str
    deployment_id: str
    checkpoint_uri: str
    request_id: str


class TargetWeightsPublic(BaseModel):
    weights_version: int = Field(description="0: the model's own weights; then 1, 2, 3...")
    checkpoint_uri: str | None
    content_digest: str | None
    checkpoint_type: str | None
    updated_at: datetime | None


class ReplicaWeightsPublic(Public):
    replica_id: str
    status: str = Field(description="REQUESTED, STARTING, READY or DRAINING")
    weights_version: int = Field(description="the deployment weights version it serves")
    content_digest: str | None = Field(description="the digest it serves (once READY)")
    checkpoint_id: str | None
    hotload_status: str | None = Field(description="its last hotload: LOADING, LOADED, FAILED")
    hotload_weights_version: int | None
    hotload_reason: str | None
    hotload_fetch_ms: float | None
    hotload_apply_ms: float | None
    hotload_warmup_ms: float | None
    hotloaded_at: datetime | None


class DeploymentWeightsPublic(BaseModel):
    """`check_deployment_state` for a deployment: the target and what every replica serves."""

    model_id: str
    deployment_id: str
    status: str
    version: int = Field(description="the model's event sequence this answer reflects")
    target: TargetWeightsPublic
    replicas: list[ReplicaWeightsPublic]
    ready: bool = Field(description="some replica is READY")
    synced: bool = Field(description="every READY replica serves the target version")
