"""Projectors of the serving context: models and deployments -> read-model row changes.

Pure, like `projections/loops.py`. Both tables are versioned by the model aggregate's sequence
(a deployment is an entity inside its model), so a replayed event is a no-op. Columns match
migration 0010.
"""

from __future__ import annotations

from functools import singledispatch

from events.deployments import (
    DeploymentActivated,
    DeploymentCreated,
    DeploymentDeactivated,
    DeploymentDeleted,
    DevelopmentDeploymentOverwritten,
    ModelCreated,
)
from events.envelope import EventEnvelope
from events.loops import DomainEvent
from projections.rows import RowChange, TableSpec, entity_change

DEPLOYMENT_TABLES: dict[str, TableSpec] = {
    spec.name: spec
    for spec in (
        TableSpec(
            "models",
            key=("model_id",),
            columns=(
                "model_id", "workspace_id", "name", "source", "checkpoint_uri", "run_id",
                "checkpoint_type", "chain_position", "lora_rank", "content_digest", "base_model",
                "created_at", "version", "updated_at",
            ),
        ),
        TableSpec(
            "deployments",
            key=("deployment_id",),
            columns=(
                "deployment_id", "model_id", "workspace_id", "name", "number", "kind", "status",
                "instance_type", "accelerator", "gpu_count", "cpu", "memory",
                "requested_instance_type", "min_replica", "max_replica", "copied_from",
                "created_at", "deactivated_at", "deleted_at", "version", "updated_at",
            ),
        ),
    )
}  # fmt: skip


@singledispatch
def project_deployment_event(event: DomainEvent, envelope: EventEnvelope) -> list[RowChange]:
    return []  # not a model event


@project_deployment_event.register
def _(event: ModelCreated, envelope: EventEnvelope) -> list[RowChange]:
    values = {
        "model_id": event.model_id,
        "workspace_id": envelope.workspace,
        "name": event.name,
        "source": event.source,
        "checkpoint_uri": event.checkpoint_uri,
        "run_id": event.run_id,
        "checkpoint_type": event.checkpoint_type,
        "chain_position": event.chain_position,
        "lora_rank": event.lora_rank,
        "content_digest": event.content_digest,
        "base_model": event.base_model,
        "created_at": envelope.occurred_at,
    }
    return [entity_change("models", event.model_id, envelope, values, creates=True)]


@project_deployment_event.register
def _(event: DeploymentCreated, envelope: EventEnvelope) -> list[RowChange]:
    values = {
        "deployment_id": event.deployment_id,
        "model_id": event.model_id,
        "workspace_id": envelope.workspace,
        "name": event.name,
        "number": event.number,
        "kind": event.kind,
        "status": "ACTIVE",
        "instance_type": event.instance_type,
        "accelerator": event.accelerator,
        "gpu_count": event.gpu_count,
        "cpu": event.cpu,
        "memory": event.memory,
        "requested_instance_type": event.requested_instance_type,
        "min_replica": event.min_replica,
        "max_replica": event.max_replica,
        "copied_from": event.copied_from,
        "created_at": envelope.occurred_at,
        "deactivated_at": None,
        "deleted_at": None,
    }
    return [entity_change("deployments", event.deployment_id, envelope, values, creates=True)]


def _update(event_deployment_id: str, envelope: EventEnvelope, **values: object) -> list[RowChange]:
    return [
        entity_change(
            "deployments",
            event_deployment_id,
            envelope,
            {"deployment_id": event_deployment_id, **values},
            creates=False,
        )
    ]


@project_deployment_event.register
def _(event: DevelopmentDeploymentOverwritten, envelope: EventEnvelope) -> list[RowChange]:
    return _update(
        event.deployment_id,
        envelope,
        instance_type=event.instance_type,
        accelerator=event.accelerator,
        gpu_count=event.gpu_count,
        cpu=event.cpu,
        memory=event.memory,
        requested_instance_type=event.requested_instance_type,
    )


@project_deployment_event.register
def _(event: DeploymentActivated, envelope: EventEnvelope) -> list[RowChange]:
    return _update(event.deployment_id, envelope, status="ACTIVE", deactivated_at=None)


@project_deployment_event.register
def _(event: DeploymentDeactivated, envelope: EventEnvelope) -> list[RowChange]:
    return _update(
        event.deployment_id, envelope, status="INACTIVE", deactivated_at=envelope.occurred_at
    )


@project_deployment_event.register
def _(event: DeploymentDeleted, envelope: EventEnvelope) -> list[RowChange]:
    return _update(event.deployment_id, envelope, status="DELETED", deleted_at=envelope.occurred_at)
