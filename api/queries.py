"""Queries on the Loops read models (PostgreSQL schema `settings.read_schema`).

The read side of the API: plain SQL by primary key or indexed column, nothing else. Rows come
back as dicts that the routes turn into `XPublic` models.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, text

from commands.envelope import CommandResult
from infra.settings import checked_identifier

Row = dict[str, Any]

# A checkpoint row with the environments it was promoted to, as a list.
_CHECKPOINT = (
    "select c.*, coalesce((select json_agg(p.environment order by p.environment) "
    "from {s}.promotions p where p.checkpoint_id = c.checkpoint_id), '[]') as promoted_to "
    "from {s}.checkpoints c"
)

# A run (alias r) that holds a live published checkpoint of its own workspace.
_SHARED_RUN = (
    "exists (select 1 from {s}.checkpoints c where c.run_id = r.run_id "
    "and c.workspace_id = r.workspace_id and c.status = 'active' and c.public)"
)


class ReadModels:
    """Reads on a connection, or on an engine: then each query borrows a pooled connection for
    its own statement only, so a request that waits (a long-poll) holds no connection while it
    waits. `catch_up`, when given, waits for the projection to reach the end of the log (False
    when it could not): a resource looked up by id and not found is looked up once more after
    it, so a client that was just told "accepted" finds what it created (read-your-writes)."""

    def __init__(
        self,
        conn: Connection | Engine,
        schema: str,
        *,
        catch_up: Callable[[], bool] | None = None,
    ) -> None:
        self.conn = conn
        self.schema = checked_identifier(schema)  # interpolated into SQL
        self.catch_up = catch_up

    def _all(self, sql: str, **params: Any) -> list[Row]:
        if isinstance(self.conn, Engine):
            with self.conn.connect() as conn:
                return self._execute(conn, sql, params)
        return self._execute(self.conn, sql, params)

    def _execute(self, conn: Connection, sql: str, params: dict[str, Any]) -> list[Row]:
        result = conn.execute(text(sql.format(s=self.schema)), params)
        return [dict(row) for row in result.mappings()]

    def _one(self, sql: str, **params: Any) -> Row | None:
        rows = self._all(sql, **params)
        return rows[0] if rows else None

    def _resource(self, sql: str, **params: Any) -> Row | None:
        """One resource by id; when missing, again once the projection has caught up.

        Each statement sees what was committed before it began (READ COMMITTED), so the second
        look sees what the projection wrote meanwhile.
        """
        row = self._one(sql, **params)
        if row is None and self.catch_up is not None and self.catch_up():
            row = self._one(sql, **params)
        return row

    # --- access: workspaces and API keys --------------------------------------------------------

    def api_key(self, key_id: str) -> Row | None:
        """One key by id (with its hash: for authentication only, never for an answer)."""
        return self._one("select * from {s}.api_keys where key_id = :id", id=key_id)

    def api_keys(self, workspace_id: str) -> list[Row]:
        return self._all(
            "select key_id, workspace_id, name, scopes, prefix, created_at, revoked_at "
            "from {s}.api_keys where workspace_id = :ws order by created_at, key_id",
            ws=workspace_id,
        )

    def workspace(self, workspace_id: str) -> Row | None:
        return self._one("select * from {s}.workspaces where workspace_id = :id", id=workspace_id)

    def workspaces(self) -> list[Row]:
        return self._all("select * from {s}.workspaces order by created_at, workspace_id")

    # --- sessions -----------------------------------------------------------------------------

    # Tenancy: every query of a resource takes the caller's workspace, and a row of another
    # workspace is not found (the routes answer 404, exactly as for an id nobody created).

    def session(self, session_id: str, *, workspace: str) -> Row | None:
        return self._resource(
            "select * from {s}.sessions where session_id = :id and workspace_id = :ws",
            id=session_id,
            ws=workspace,
        )

    def sessions(
        self, *, workspace: str, status: str | None, limit: int, offset: int
    ) -> tuple[list[Row], int]:
        where = "where workspace_id = :ws" + (" and status = :status" if status else "")
        rows = self._all(
            f"select * from {{s}}.sessions {where} "
            "order by created_at desc, session_id limit :limit offset :offset",
            ws=workspace,
            status=status,
            limit=limit,
            offset=offset,
        )
        total = self._one(
            f"select count(*) as n from {{s}}.sessions {where}", ws=workspace, status=status
        )
        return rows, int(total["n"]) if total else 0

    def runs_of_session(self, session_id: str, *, workspace: str) -> list[Row]:
        return self._all(
            "select * from {s}.runs where session_id = :id and workspace_id = :ws "
            "order by created_at, run_id",
            id=session_id,
            ws=workspace,
        )

    def samplers_of_session(self, session_id: str, *, workspace: str) -> list[Row]:
        return self._all(
            "select * from {s}.samplers where session_id = :id and workspace_id = :ws "
            "order by created_at, sampler_id",
            id=session_id,
            ws=workspace,
        )

    def checkpoints_of_session(self, session_id: str, *, workspace: str) -> list[Row]:
        return self._all(
            _CHECKPOINT + " where c.session_id = :id and c.workspace_id = :ws "
            "order by c.created_at, c.checkpoint_id",
            id=session_id,
            ws=workspace,
        )

    # --- runs, samplers, checkpoints ------------------------------------------------------------

    def runs(self, *, workspace: str, limit: int, offset: int) -> tuple[list[Row], int]:
        rows = self._all(
            "select * from {s}.runs where workspace_id = :ws "
            "order by created_at desc, run_id limit :limit offset :offset",
            ws=workspace,
            limit=limit,
            offset=offset,
        )
        total = self._one(
            "select count(*) as n from {s}.runs where workspace_id = :ws", ws=workspace
        )
        return rows, int(total["n"]) if total else 0

    def run(self, run_id: str, *, workspace: str) -> Row | None:
        return self._resource(
            "select * from {s}.runs where run_id = :id and workspace_id = :ws",
            id=run_id,
            ws=workspace,
        )

    def sampler(self, sampler_id: str, *, workspace: str) -> Row | None:
        """The sampler with its run's max_seq_len (the sampler serves the run's model)."""
        return self._resource(
            "select sp.*, r.max_seq_len from {s}.samplers sp "
            "left join {s}.runs r on r.run_id = sp.run_id "
            "where sp.sampler_id = :id and sp.workspace_id = :ws",
            id=sampler_id,
            ws=workspace,
        )

    def checkpoint(self, checkpoint_id: str, *, workspace: str) -> Row | None:
        return self._resource(
            _CHECKPOINT + " where c.checkpoint_id = :id and c.workspace_id = :ws",
            id=checkpoint_id,
            ws=workspace,
        )

    def save_settled(self, save: CommandResult, *, workspace: str) -> bool:
        """Whether an accepted SaveWeights is settled: its checkpoint is recorded on the session
        (a follow-up command, a moment after the trainer answers, so a client reading it right
        after the future finds it), or the session refused to record it (e.g. it ended)."""
        checkpoint_id = str((save.output or {}).get("checkpoint_id"))
        if self.checkpoint(checkpoint_id, workspace=workspace) is not None:
            return True
        record = self.command_result(f"{save.command_id}:record", workspace=workspace)
        return record is not None and record.status != "accepted"

    def checkpoints_of_run(
        self, run_id: str, *, workspace: str, include_deleted: bool
    ) -> list[Row]:
        status = "" if include_deleted else "and c.status = 'active'"
        return self._all(
            _CHECKPOINT + f" where c.run_id = :id and c.workspace_id = :ws {status} "
            "order by c.created_at, c.checkpoint_id",
            id=run_id,
            ws=workspace,
        )

    def checkpoints_of_workspace(
        self, *, workspace: str, limit: int, offset: int
    ) -> tuple[list[Row], int]:
        """Every live checkpoint of the workspace, across its runs, newest first."""
        rows = self._all(
            _CHECKPOINT + " where c.workspace_id = :ws and c.status = 'active' "
            "order by c.created_at desc, c.checkpoint_id limit :limit offset :offset",
            ws=workspace,
            limit=limit,
            offset=offset,
        )
        total = self._one(
            "select count(*) as n from {s}.checkpoints "
            "where workspace_id = :ws and status = 'active'",
            ws=workspace,
        )
        return rows, int(total["n"]) if total else 0

    def published_checkpoint(self, uri: str) -> Row | None:
        """A live, published checkpoint of any workspace by its URI (what publishing shares:
        its path, to start a run from; never its listings or its run)."""
        return self._one(
            _CHECKPOINT + " where c.uri = :uri and c.status = 'active' and c.public",
            uri=uri,
        )

    def shared_run(self, run_id: str) -> Row | None:
        """A run of any workspace that holds a live published checkpoint: what
        `access_scope="accessible"` adds to the caller's own runs (read only)."""
        return self._resource(
            "select * from {s}.runs r where r.run_id = :id and " + _SHARED_RUN, id=run_id
        )

    def accessible_runs(self, *, workspace: str, limit: int, offset: int) -> tuple[list[Row], int]:
        """The workspace's runs and every run with a live published checkpoint, newest first."""
        where = "where r.workspace_id = :ws or " + _SHARED_RUN
        rows = self._all(
            "select * from {s}.runs r " + where + " order by r.created_at desc, r.run_id "
            "limit :limit offset :offset",
            ws=workspace,
            limit=limit,
            offset=offset,
        )
        total = self._one("select count(*) as n from {s}.runs r " + where, ws=workspace)
        return rows, int(total["n"]) if total else 0

    def accessible_checkpoints(
        self, *, workspace: str, limit: int, offset: int
    ) -> tuple[list[Row], int]:
        """The workspace's live checkpoints and every live published one, newest first."""
        where = " where c.status = 'active' and (c.workspace_id = :ws or c.public)"
        rows = self._all(
            _CHECKPOINT + where + " order by c.created_at desc, c.checkpoint_id "
            "limit :limit offset :offset",
            ws=workspace,
            limit=limit,
            offset=offset,
        )
        total = self._one("select count(*) as n from {s}.checkpoints c" + where, ws=workspace)
        return rows, int(total["n"]) if total else 0

    def checkpoint_storage(self, *, workspace: str) -> tuple[int, int]:
        """(count, total bytes) of the workspace's live checkpoints."""
        row = self._one(
            "select count(*) as n, coalesce(sum(total_size_bytes), 0)::bigint as bytes "
            "from {s}.checkpoints where workspace_id = :ws and status = 'active'",
            ws=workspace,
        )
        return (int(row["n"]), int(row["bytes"])) if row else (0, 0)

    def events_of_workspace(
        self, *, workspace: str, types: Sequence[str], since: datetime, until: datetime
    ) -> list[Row]:
        """The workspace's events of `types` with since <= occurred_at < until, in time order."""
        return self._all(
            "select * from {s}.event_log where workspace_id = :ws and type = any(:types) "
            "and occurred_at >= :since and occurred_at < :until "
            "order by occurred_at, aggregate_id, sequence",
            ws=workspace,
            types=list(types),
            since=since,
            until=until,
        )

    # --- weight syncs ---------------------------------------------------------------------------

    def sampler_weights(self, sampler_id: str) -> Row | None:
        """What the sampler serves, and the newest sync sent to it."""
        return self._one(
            "select w.*, (select max(weights_version) from {s}.weight_syncs ws "
            "where ws.sampler_id = :id) as target_version "
            "from (select :id as sampler_id) q left join {s}.sampler_weights w using (sampler_id)",
            id=sampler_id,
        )

    def weight_syncs(
        self,
        sampler_id: str,
        *,
        workspace: str,
        command_id: str | None,
        checkpoint_id: str | None,
        limit: int,
    ) -> list[Row]:
        """Syncs of a sampler, newest first, each with how its hotload went (if it started)."""
        where = ["ws.sampler_id = :id", "ws.workspace_id = :ws"]
        if command_id is not None:
            # A save's sync is caused by its RecordCheckpoint follow-up, "<command id>:record".
            where.append("ws.command_id in (:command_id, :record_id)")
        if checkpoint_id is not None:
            where.append("ws.checkpoint_id = :checkpoint_id")
        return self._all(
            "select ws.sampler_id, ws.weights_version, ws.checkpoint_id, ws.uri, "
            "ws.content_digest, ws.checkpoint_type, ws.warmup, ws.warmup_max_retries, "
            "ws.reset_prompt_cache, ws.requested_at, ws.command_id, "
            "coalesce(h.status, 'requested') as status, h.reason, h.rolled_back, "
            "h.folders_applied, h.bytes_moved, h.fetch_ms, h.apply_ms, h.total_ms, "
            "h.warmup_attempts, h.warmup_ms, h.prompt_cache_entries_dropped, h.started_at, "
            "h.finished_at from {s}.weight_syncs ws left join {s}.hotloads h "
            "on h.sampler_id = ws.sampler_id and h.weights_version = ws.weights_version "
            f"where {' and '.join(where)} order by ws.weights_version desc limit :limit",
            id=sampler_id,
            ws=workspace,
            command_id=command_id,
            record_id=f"{command_id}:record",
            checkpoint_id=checkpoint_id,
            limit=limit,
        )

    # --- futures --------------------------------------------------------------------------------

    def command_result(self, command_id: str, *, workspace: str) -> CommandResult | None:
        """The command's result as the command-results topic carried it (the futures table is
        its projection), or None while there is none in this workspace."""
        row = self._one(
            "select command_id, command_type, aggregate_id, status, reason, field, category, "
            "events, output, correlation_id, processed_at, workspace_id "
            "from {s}.command_results where command_id = :id and workspace_id = :ws",
            id=command_id,
            ws=workspace,
        )
        return (
            None
            if row is None
            else CommandResult.model_validate({**row, "events": row["events"] or ()})
        )

    def command_result_exists(self, command_id: str) -> bool:
        """Whether any workspace's command has this id (command ids are global on Kafka: the
        processor and the workers dedupe by them; the API's are within their workspace)."""
        return (
            self._one(
                "select 1 as x from {s}.command_results where command_id = :id", id=command_id
            )
            is not None
        )
