"""Queries on the serving read models (`models`, `deployments`; migration 0010) and the
checkpoint look-ups a deploy needs. Workspace-scoped like every read: another workspace's model
or deployment is not found. A deleted deployment is not found either (seed 003: "API requests
return a 404 error post-deletion"); its row stays for replay and audit.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends

from api.deps import ApiSettingsDep, EngineDep, SettingsDep
from api.queries import ReadModels, Row
from projections.health import wait_until_caught_up

_LIVE = "d.status <> 'DELETED'"
_MODEL = (
    "select m.*, (select count(*) from {s}.deployments d where d.model_id = m.model_id "
    "and d.status <> 'DELETED') as deployments_count from {s}.models m"
)


class DeploymentReads(ReadModels):
    def model(self, model_id: str, *, workspace: str) -> Row | None:
        return self._resource(
            _MODEL + " where m.model_id = :id and m.workspace_id = :ws",
            id=model_id,
            ws=workspace,
        )

    def models(self, *, workspace: str, limit: int, offset: int) -> tuple[list[Row], int]:
        rows = self._all(
            _MODEL + " where m.workspace_id = :ws "
            "order by m.created_at desc, m.model_id limit :limit offset :offset",
            ws=workspace,
            limit=limit,
            offset=offset,
        )
        total = self._one("select count(*) as n from {s}.models where workspace_id = :ws",
                          ws=workspace)  # fmt: skip
        return rows, int(total["n"]) if total else 0

    def deployments_of_model(self, model_id: str, *, workspace: str) -> list[Row]:
        return self._all(
            f"select * from {{s}}.deployments d where d.model_id = :id and d.workspace_id = :ws "
            f"and {_LIVE} order by d.number, d.deployment_id",
            id=model_id,
            ws=workspace,
        )

    def deployment(self, model_id: str, deployment_id: str, *, workspace: str) -> Row | None:
        return self._resource(
            f"select * from {{s}}.deployments d where d.deployment_id = :id "
            f"and d.model_id = :model and d.workspace_id = :ws and {_LIVE}",
            id=deployment_id,
            model=model_id,
            ws=workspace,
        )

    def live_replicas(self, deployment_id: str, *, workspace: str) -> list[Row]:
        """The deployment's replicas that are starting, serving or draining, oldest first."""
        return self._all(
            "select * from {s}.replicas where deployment_id = :id and workspace_id = :ws "
            "and status in ('REQUESTED', 'STARTING', 'READY', 'DRAINING') "
            "order by requested_at, replica_id",
            id=deployment_id,
            ws=workspace,
        )

    def development_deployment(self, model_id: str, *, workspace: str) -> Row | None:
        return self._one(
            f"select * from {{s}}.deployments d where d.model_id = :model "
            f"and d.workspace_id = :ws and d.kind = 'development' and {_LIVE}",
            model=model_id,
            ws=workspace,
        )

    def sampler_checkpoint(self, run_id: str, name: str | None, *, workspace: str) -> Row | None:
        """A live sampler_weights checkpoint of the run: by name, else the latest saved."""
        by_name = "and c.name = :name" if name is not None else ""
        return self._one(
            "select c.* from {s}.checkpoints c where c.run_id = :run and c.workspace_id = :ws "
            f"and c.kind = 'sampler_weights' and c.status = 'active' {by_name} "
            "order by c.created_at desc, c.checkpoint_id desc limit 1",
            run=run_id,
            ws=workspace,
            name=name,
        )

    def checkpoint_by_uri(self, uri: str, *, workspace: str) -> Row | None:
        """A live checkpoint by URI: the workspace's own, or a published one of any workspace."""
        return self._one(
            "select c.* from {s}.checkpoints c where c.uri = :uri and c.status = 'active' "
            "and (c.workspace_id = :ws or c.public) order by (c.workspace_id = :ws) desc limit 1",
            uri=uri,
            ws=workspace,
        )

    def run_any_workspace(self, run_id: str) -> Row | None:
        """The run of a checkpoint already found (its LoRA rank and base model)."""
        return self._one("select * from {s}.runs where run_id = :id", id=run_id)


async def get_deployment_reads(
    settings: SettingsDep, api_settings: ApiSettingsDep, engine: EngineDep
) -> DeploymentReads:
    def catch_up() -> bool:
        return wait_until_caught_up(
            settings, engine, settings.read_schema, timeout_s=api_settings.read_your_writes_wait_s
        )

    return DeploymentReads(engine, settings.read_schema, catch_up=catch_up)


DeploymentReadDep = Annotated[DeploymentReads, Depends(get_deployment_reads)]
