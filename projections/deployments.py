"""Projectors of the serving context: models, deployments and replicas -> read-model row changes.

Pure, like `projections/loops.py`. Both tables are versioned by the model aggregate's sequence
(a deployment is an entity inside its model), so a replayed event is a no-op. Columns match
migrations 0010, 0012 and 0014 (weights).
"""

from __future__ import annotations

from functools import singledispatch

from events.deployments import (
    DeploymentActivated,
    DeploymentCreated,
    DeploymentDeactivated,
    DeploymentDeleted,
    DeploymentWeightsUpdated,
    DevelopmentDeploymentOverwritten,
    ModelCreated,
)
from events.envelope import EventEnvelope
from events.loops import DomainEvent
from events.replicas import (
    ReplicaDraining,
    ReplicaEvent,
    ReplicaFailed,
    ReplicaHotloadFailed,
    ReplicaHotloadStarted,
    ReplicaReady,
    ReplicaRequested,
    ReplicaStarting,
    ReplicaStopped,
    ReplicaWeightsLoaded,
)
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
                "weights_version", "weights_checkpoint_uri", "weights_content_digest",
                "weights_checkpoint_type", "weights_updated_at",
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
        "weights_version": 0,
        "weights_checkpoint_uri": None,
        "weights_content_digest": None,
        "weights_checkpoint_type": None,
        "weights_updated_at": None,
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


@project_deployment_event.register
def _(event: DeploymentWeightsUpdated, envelope: EventEnvelope) -> list[RowChange]:
    return _update(
        event.deployment_id,
        envelope,
        weights_version=event.weights_version,
        weights_checkpoint_uri=event.checkpoint_uri,
        weights_content_digest=event.content_digest,
        weights_checkpoint_type=event.checkpoint_type,
        weights_updated_at=envelope.occurred_at,
    )


# --- replicas (the replica controller's events, versioned by the replica's own sequence) --------

REPLICA_TABLES: dict[str, TableSpec] = {
    "replicas": TableSpec(
        "replicas",
        key=("replica_id",),
        columns=(
            "replica_id", "deployment_id", "model_id", "workspace_id", "status", "reason",
            "replaces", "instance_type", "actor_name", "content_digest", "checkpoint_id",
            "node_ip", "pid", "start_ms", "load_ms", "predict_concurrency", "requested_at",
            "ready_at", "stopped_at", "version", "updated_at", "weights_version",
            "hotload_status", "hotload_weights_version", "hotload_reason", "hotload_fetch_ms",
            "hotload_apply_ms", "hotload_warmup_ms", "hotloaded_at",
        ),
    )
}  # fmt: skip


def _replica_update(
    event: ReplicaEvent, envelope: EventEnvelope, **values: object
) -> list[RowChange]:
    return [
        entity_change(
            "replicas", event.replica_id, envelope, {"replica_id": event.replica_id, **values},
            creates=False,
        )
    ]  # fmt: skip


@project_deployment_event.register
def _(event: ReplicaRequested, envelope: EventEnvelope) -> list[RowChange]:
    values = {
        "replica_id": event.replica_id,
        "deployment_id": event.deployment_id,
        "model_id": event.model_id,
        "workspace_id": envelope.workspace,
        "status": "REQUESTED",
        "reason": event.reason,
        "replaces": event.replaces,
        "instance_type": event.instance_type,
        "actor_name": None,
        "content_digest": None,
        "checkpoint_id": None,
        "node_ip": None,
        "pid": None,
        "start_ms": None,
        "load_ms": None,
        "predict_concurrency": None,
        "requested_at": envelope.occurred_at,
        "ready_at": None,
        "stopped_at": None,
        "weights_version": event.weights_version,
        "hotload_status": None,
        "hotload_weights_version": None,
        "hotload_reason": None,
        "hotload_fetch_ms": None,
        "hotload_apply_ms": None,
        "hotload_warmup_ms": None,
        "hotloaded_at": None,
    }
    return [entity_change("replicas", event.replica_id, envelope, values, creates=True)]


@project_deployment_event.register
def _(event: ReplicaStarting, envelope: EventEnvelope) -> list[RowChange]:
    return _replica_update(event, envelope, status="STARTING", actor_name=event.actor_name)


@project_deployment_event.register
def _(event: ReplicaReady, envelope: EventEnvelope) -> list[RowChange]:
    return _replica_update(
        event, envelope, status="READY", actor_name=event.actor_name,
        content_digest=event.content_digest, checkpoint_id=event.checkpoint_id,
        node_ip=event.node_ip, pid=event.pid, start_ms=event.start_ms, load_ms=event.load_ms,
        predict_concurrency=event.predict_concurrency, ready_at=envelope.occurred_at,
    )  # fmt: skip


@project_deployment_event.register
def _(event: ReplicaDraining, envelope: EventEnvelope) -> list[RowChange]:
    return _replica_update(event, envelope, status="DRAINING", reason=event.reason)


@project_deployment_event.register
def _(event: ReplicaStopped, envelope: EventEnvelope) -> list[RowChange]:
    return _replica_update(
        event, envelope, status="STOPPED", reason=event.reason, stopped_at=envelope.occurred_at
    )


@project_deployment_event.register
def _(event: ReplicaFailed, envelope: EventEnvelope) -> list[RowChange]:
    return _replica_update(
        event, envelope, status="FAILED", reason=f"{event.phase}: {event.reason}",
        stopped_at=envelope.occurred_at,
    )  # fmt: skip


@project_deployment_event.register
def _(event: ReplicaHotloadStarted, envelope: EventEnvelope) -> list[RowChange]:
    return _replica_update(
        event, envelope, hotload_status="LOADING", hotload_weights_version=event.weights_version,
        hotload_reason=None, hotload_fetch_ms=None, hotload_apply_ms=None,
        hotload_warmup_ms=None,
    )  # fmt: skip


@project_deployment_event.register
def _(event: ReplicaWeightsLoaded, envelope: EventEnvelope) -> list[RowChange]:
    return _replica_update(
        event, envelope, weights_version=event.weights_version,
        content_digest=event.content_digest, checkpoint_id=event.checkpoint_uri,
        hotload_status="LOADED", hotload_weights_version=event.weights_version,
        hotload_reason=None, hotload_fetch_ms=event.fetch_ms, hotload_apply_ms=event.apply_ms,
        hotload_warmup_ms=event.warmup_ms, hotloaded_at=envelope.occurred_at,
    )  # fmt: skip


@project_deployment_event.register
def _(event: ReplicaHotloadFailed, envelope: EventEnvelope) -> list[RowChange]:
    return _replica_update(
        event, envelope, hotload_status="FAILED", hotload_weights_version=event.weights_version,
        hotload_reason=event.reason, hotloaded_at=envelope.occurred_at,
    )  # fmt: skip
