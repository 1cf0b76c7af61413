"""The models/deployments projector: events -> row changes, versioned by the model's sequence."""

from __future__ import annotations

from datetime import UTC, datetime

from events.deployments import (
    DeploymentCreated,
    DeploymentDeactivated,
    DeploymentDeleted,
    ModelCreated,
)
from events.envelope import EventEnvelope
from events.ids import uuid7
from events.loops import DomainEvent
from projections.deployments import DEPLOYMENT_TABLES, project_deployment_event
from projections.rows import merge_changes

AT = datetime(2026, 12, 3, tzinfo=UTC)


def envelope(event: DomainEvent, sequence: int) -> EventEnvelope:
    return EventEnvelope(
        event_id=str(uuid7()), type=type(event).__name__, schema_version=1,
        aggregate_type="model", aggregate_id="m1", sequence=sequence, occurred_at=AT,
        workspace_id="w1", payload=event.model_dump(mode="json"),
    )  # fmt: skip


def project(*events: DomainEvent) -> dict[tuple[str, str], dict]:
    changes = [
        change
        for sequence, event in enumerate(events, start=1)
        for change in project_deployment_event(event, envelope(event, sequence))
    ]
    return {(c.table, c.key[0]): dict(c.values) for c in merge_changes(changes, DEPLOYMENT_TABLES)}


MODEL = ModelCreated(model_id="m1", name="n", source="base_model", base_model="tiny")
DEPLOYMENT = DeploymentCreated(
    model_id="m1", deployment_id="d1", name="deployment-1", number=1, kind="published",
    instance_type="L4:4x16", accelerator="L4", gpu_count=1, min_replica=0, max_replica=1,
)  # fmt: skip


def test_rows_carry_the_events_workspace_and_every_column_is_known() -> None:
    rows = project(MODEL, DEPLOYMENT)
    assert rows[("models", "m1")]["workspace_id"] == "w1"
    deployment = rows[("deployments", "d1")]
    assert (deployment["status"], deployment["instance_type"], deployment["version"]) == (
        "ACTIVE", "L4:4x16", 2,
    )  # fmt: skip
    for (table, _), values in rows.items():
        assert set(values) <= set(DEPLOYMENT_TABLES[table].columns)


def test_deactivate_and_delete_set_status_and_times() -> None:
    rows = project(
        MODEL,
        DEPLOYMENT,
        DeploymentDeactivated(model_id="m1", deployment_id="d1"),
        DeploymentDeleted(model_id="m1", deployment_id="d1"),
    )
    deployment = rows[("deployments", "d1")]
    assert (deployment["status"], deployment["deleted_at"], deployment["version"]) == (
        "DELETED", AT, 4,
    )  # fmt: skip
    assert deployment["deactivated_at"] == AT
