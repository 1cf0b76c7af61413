"""Tinker sessions end: on the SDK's finish, or when their heartbeats stop.

A Tinker session (one SDK ServiceClient) only groups models and samplers; each of its models
lives in a loops session of its own, named `tinker <model_id>` (api/tinker/routes.py,
api/tinker/ids.py). Ending the Tinker session ends those loops sessions (`EndSession`), which
stops their runs and samplers, and the workers release the engines.

Heartbeats are liveness, not domain facts: the SDK sends one every 10 s, so they are one row
per Tinker session in PostgreSQL (`<read schema>_tinker.sessions`, its own schema so a
projection replay never touches it), written at most every HEARTBEAT_WRITE_S, never a Kafka
event per heartbeat. The janitor rebuilds which loops sessions belong to which Tinker session
from the event log (`SessionCreated`/`SessionEnded`), reads the rows, and decides with
`sessions_to_end`. Its command ids derive from the loops session, so a decision repeated (by a
restarted janitor, or by the finish route that sends the same commands at once) is a duplicate.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from commands.bus import CommandBus
from commands.envelope import DEFAULT_WORKSPACE, CommandEnvelope
from events.loops import DomainEvent, SessionCreated, SessionEnded
from infra.settings import Settings
from infra.side_tables import ensure_side_tables

NAME_PREFIX = "tinker "  # a loops session made for a Tinker model: "tinker <model_id>"
HEARTBEAT_WRITE_S = 5  # heartbeats closer together than this update nothing
# <tinker session>:train:<n>, or <tinker session>-smp<k>:train:0 for a base-model sampler.
_MODEL_ID = re.compile(r"^(?P<session>[a-z0-9][a-z0-9-]*?)(?:-smp\d+)?:train:\d+$")


def tinker_session_of(model_id: str) -> str | None:
    match = _MODEL_ID.match(model_id)
    return match["session"] if match else None


def end_command_id(loops_session_id: str) -> str:
    return f"tinker-end:{loops_session_id}"


def end_session(
    loops_session_id: str, reason: str, workspace_id: str = DEFAULT_WORKSPACE
) -> CommandEnvelope:
    # In the session's own workspace: the processor refuses a command reaching into another's.
    return CommandEnvelope(
        command_id=end_command_id(loops_session_id),
        type="EndSession",
        aggregate_id=loops_session_id,
        actor="tinker",
        workspace_id=workspace_id,
        payload={"reason": reason},
    )


# --- the decision (pure) -------------------------------------------------------------------


@dataclass(frozen=True)
class OpenLoopsSession:
    """A loops session of a Tinker model that has not ended, as the event log says."""

    session_id: str
    tinker_session_id: str
    created_at: datetime
    workspace_id: str = DEFAULT_WORKSPACE


@dataclass(frozen=True)
class Liveness:
    last_heartbeat_at: datetime
    finished_at: datetime | None = None


def sessions_to_end(
    open_sessions: Iterable[OpenLoopsSession],
    liveness: Mapping[str, Liveness],
    *,
    now: datetime,
    timeout_s: float,
) -> list[tuple[str, str]]:
    """(loops session id, reason) of each open session whose Tinker session finished or has
    been quiet for `timeout_s`. A Tinker session never heard from counts from its model's
    creation (a session made before heartbeats were recorded times out too)."""
    due = []
    for open_session in open_sessions:
        seen = liveness.get(open_session.tinker_session_id)
        if seen is not None and seen.finished_at is not None:
            due.append((open_session.session_id, "tinker session finished"))
            continue
        last = open_session.created_at
        if seen is not None:
            last = max(last, seen.last_heartbeat_at)
        if now - last >= timedelta(seconds=timeout_s):
            due.append(
                (open_session.session_id, f"tinker session sent no heartbeat for {timeout_s:g}s")
            )
    return due


# --- the liveness rows -----------------------------------------------------------------------


def _table(settings: Settings) -> str:
    return f"{settings.read_schema}_tinker.sessions"


def _samplers_table(settings: Settings) -> str:
    return f"{settings.read_schema}_tinker.samplers"


def ensure_table(conn: psycopg.Connection[Any], settings: Settings) -> None:
    ensure_side_tables(
        conn,
        conninfo=settings.pg_conninfo,
        schema=f"{settings.read_schema}_tinker",
        ddl=(
            f"create table if not exists {_table(settings)} ("
            "tinker_session_id text primary key, "
            "created_at timestamptz not null default now(), "
            "last_heartbeat_at timestamptz not null default now(), "
            "finished_at timestamptz, "
            "finish_reason text)",
            # The workspace whose client created the Tinker session (null: made before
            # tenancy, the default workspace's).
            f"alter table {_table(settings)} add column if not exists workspace_id text",
            # What the client gave at create_session, and how its client said it finished
            # (`close(status, detail)`: success, errored or interrupted).
            f"alter table {_table(settings)} add column if not exists user_metadata jsonb",
            f"alter table {_table(settings)} add column if not exists display_name text",
            f"alter table {_table(settings)} add column if not exists finish_status text",
            f"alter table {_table(settings)} add column if not exists finish_detail text",
            # The sampling session ids the API handed out in each Tinker session.
            f"create table if not exists {_samplers_table(settings)} ("
            "sampling_session_id text primary key, "
            "tinker_session_id text not null, "
            "workspace_id text not null, "
            "created_at timestamptz not null default now())",
            f"create index if not exists samplers_by_session on {_samplers_table(settings)} "
            "(tinker_session_id)",
        ),
    )


def owner_of(
    conn: psycopg.Connection[Any], settings: Settings, tinker_session_id: str
) -> str | None:
    """The workspace a Tinker session belongs to; None if it has no row (never seen)."""
    row = conn.execute(
        f"select coalesce(workspace_id, %s) from {_table(settings)} where tinker_session_id = %s",
        (DEFAULT_WORKSPACE, tinker_session_id),
    ).fetchone()
    return None if row is None else str(row[0])


def start(
    conn: psycopg.Connection[Any],
    settings: Settings,
    tinker_session_id: str,
    workspace_id: str = DEFAULT_WORKSPACE,
    *,
    user_metadata: Mapping[str, str] | None = None,
    display_name: str | None = None,
) -> None:
    """The liveness row of a new Tinker session, owned by `workspace_id`; its clock starts."""
    conn.execute(
        f"insert into {_table(settings)} "
        "(tinker_session_id, workspace_id, user_metadata, display_name) values (%s, %s, %s, %s) "
        "on conflict (tinker_session_id) do nothing",
        (
            tinker_session_id,
            workspace_id,
            None if user_metadata is None else Jsonb(dict(user_metadata)),
            display_name,
        ),
    )


def heartbeat(
    conn: psycopg.Connection[Any],
    settings: Settings,
    tinker_session_id: str,
    workspace_id: str = DEFAULT_WORKSPACE,
) -> bool | None:
    """Record a heartbeat (cheaply: at most one write per HEARTBEAT_WRITE_S). True while the
    session lives; False once it has finished or was ended (the SDK then stops beating); None
    when `workspace_id` has no such session (a heartbeat never creates one: a row per made-up
    id would be free storage for anyone with a key)."""
    table = _table(settings)
    row = conn.execute(
        f"select finished_at, coalesce(workspace_id, %s) from {table} where tinker_session_id = %s",
        (DEFAULT_WORKSPACE, tinker_session_id),
    ).fetchone()
    if row is None or row[1] != workspace_id:
        return None
    if row[0] is not None:
        return False
    conn.execute(
        f"update {table} set last_heartbeat_at = now() where tinker_session_id = %s "
        f"and finished_at is null and last_heartbeat_at < now() - interval '{HEARTBEAT_WRITE_S} "
        "seconds'",
        (tinker_session_id,),
    )
    return True


def finish(
    conn: psycopg.Connection[Any],
    settings: Settings,
    tinker_session_id: str,
    reason: str,
    workspace_id: str | None = None,
    *,
    status: str | None = None,
    detail: str | None = None,
) -> None:
    """Mark the session finished. With `workspace_id` (a client's finish), only a session of
    that workspace; None (the janitor's own decision) any. `status`/`detail`: what the client
    said (`close("success" | "errored" | "interrupted", detail)`). The first finish wins."""
    conn.execute(
        f"insert into {_table(settings)} as t "
        "(tinker_session_id, finished_at, finish_reason, workspace_id, finish_status, "
        "finish_detail) "
        "values (%s, now(), %s, %s, %s, %s) on conflict (tinker_session_id) do update set "
        "finished_at = coalesce(t.finished_at, now()), "
        "finish_reason = coalesce(t.finish_reason, excluded.finish_reason), "
        "finish_status = case when t.finished_at is null then excluded.finish_status "
        "else t.finish_status end, "
        "finish_detail = case when t.finished_at is null then excluded.finish_detail "
        "else t.finish_detail end "
        "where excluded.workspace_id is null "
        "or coalesce(t.workspace_id, %s) = excluded.workspace_id",
        (tinker_session_id, reason, workspace_id, status, detail, DEFAULT_WORKSPACE),
    )


def liveness_of(
    conn: psycopg.Connection[Any], settings: Settings, tinker_session_ids: Iterable[str]
) -> dict[str, Liveness]:
    rows = conn.execute(
        f"select tinker_session_id, last_heartbeat_at, finished_at from {_table(settings)} "
        "where tinker_session_id = any(%s)",
        (list(tinker_session_ids),),
    ).fetchall()
    return {row[0]: Liveness(row[1], row[2]) for row in rows}


# --- what the RestClient reads (get_session, list_sessions, search_sessions) -----------------

CLIENT_FINISH_STATUSES = ("success", "errored", "interrupted")


@dataclass(frozen=True)
class SessionInfo:
    """A Tinker session's row, with the live checkpoints of its runs."""

    tinker_session_id: str
    workspace_id: str
    created_at: datetime
    last_heartbeat_at: datetime
    finished_at: datetime | None
    finish_status: str | None  # what the client's close said; None: it did not say
    finish_detail: str | None
    user_metadata: dict[str, str] | None
    display_name: str | None
    checkpoints_count: int
    checkpoint_storage_bytes: int


def status_of(info: SessionInfo, *, now: datetime, timeout_s: float) -> dict[str, Any] | None:
    """Tinker's `SessionStatus`: `client_finished` with the reason its client's close gave;
    `active` while it has heartbeats within `timeout_s`; otherwise None ("neither finished nor
    known to be running": ended by the janitor for silence, or silent without models).
    loopstream never cancels or fails a session, so `cancelled`/`failed` never occur."""
    if info.finished_at is not None:
        if info.finish_status in CLIENT_FINISH_STATUSES:
            return {
                "type": "client_finished",
                "reason": {"type": info.finish_status},
                "detail": info.finish_detail,
            }
        return None
    if now - info.last_heartbeat_at < timedelta(seconds=timeout_s):
        return {"type": "active"}
    return None


@dataclass(frozen=True)
class SessionQuery:
    """search_sessions' filters, as loopstream reads them (api/tinker/rest.py)."""

    workspace_id: str
    session_id: str | None = None  # with display_words: either matches
    display_words: tuple[str, ...] = ()  # case-insensitive, each must appear in the name
    user_metadata: Mapping[str, str] | None = None  # every pair must hold
    active: bool = True  # statuses to match (all three: no status filter)
    finish_statuses: tuple[str, ...] = CLIENT_FINISH_STATUSES
    any_status: bool = True


def _session_select(settings: Settings) -> str:
    # Checkpoints of the session's runs: `<session>-train-<n>` and, for base-model samplers,
    # `<session>-smp<k>-train-0` (api/tinker/ids.py); session ids have no `-`, `_` or `%`.
    return (
        "select t.tinker_session_id, coalesce(t.workspace_id, %(default)s), t.created_at, "
        "t.last_heartbeat_at, t.finished_at, t.finish_status, t.finish_detail, "
        "t.user_metadata, t.display_name, coalesce(c.n, 0), coalesce(c.bytes, 0) "
        f"from {_table(settings)} t left join lateral ("
        "select count(*) as n, sum(total_size_bytes)::bigint as bytes "
        f"from {settings.read_schema}.checkpoints "
        "where workspace_id = coalesce(t.workspace_id, %(default)s) and status = 'active' "
        "and (run_id like t.tinker_session_id || '-train-%%' "
        "or run_id like t.tinker_session_id || '-smp%%-train-%%')) c on true "
    )


def _info(row: tuple[Any, ...]) -> SessionInfo:
    return SessionInfo(
        tinker_session_id=row[0],
        workspace_id=row[1],
        created_at=row[2],
        last_heartbeat_at=row[3],
        finished_at=row[4],
        finish_status=row[5],
        finish_detail=row[6],
        user_metadata=row[7],
        display_name=row[8],
        checkpoints_count=int(row[9]),
        checkpoint_storage_bytes=int(row[10]),
    )


def session_info(
    conn: psycopg.Connection[Any], settings: Settings, tinker_session_id: str, workspace_id: str
) -> SessionInfo | None:
    """The session if `workspace_id` owns it; None otherwise (another's is as missing)."""
    row = conn.execute(
        _session_select(settings) + "where t.tinker_session_id = %(id)s "
        "and coalesce(t.workspace_id, %(default)s) = %(ws)s",
        {"id": tinker_session_id, "ws": workspace_id, "default": DEFAULT_WORKSPACE},
    ).fetchone()
    return None if row is None else _info(row)


def session_ids(
    conn: psycopg.Connection[Any], settings: Settings, workspace_id: str, *, limit: int, offset: int
) -> list[str]:
    """The workspace's Tinker sessions, newest first."""
    rows = conn.execute(
        f"select tinker_session_id from {_table(settings)} "
        "where coalesce(workspace_id, %s) = %s "
        "order by created_at desc, tinker_session_id desc limit %s offset %s",
        (DEFAULT_WORKSPACE, workspace_id, limit, offset),
    ).fetchall()
    return [row[0] for row in rows]


def search(
    conn: psycopg.Connection[Any],
    settings: Settings,
    query: SessionQuery,
    *,
    timeout_s: float,
    limit: int,
    after: tuple[datetime, str] | None = None,
) -> list[SessionInfo]:
    """One page of the workspace's sessions matching `query`, newest first (created_at, then
    id, both descending), starting after the cursor `after`."""
    where = ["coalesce(t.workspace_id, %(default)s) = %(ws)s"]
    params: dict[str, Any] = {"ws": query.workspace_id, "default": DEFAULT_WORKSPACE}
    named = []
    if query.session_id is not None:
        named.append("t.tinker_session_id = %(id)s")
        params["id"] = query.session_id
    if query.display_words:
        words = []
        for i, word in enumerate(query.display_words):
            words.append(f"strpos(lower(t.display_name), %(w{i})s) > 0")
            params[f"w{i}"] = word.lower()
        named.append("(" + " and ".join(words) + ")")
    if named:
        where.append("(" + " or ".join(named) + ")")
    if query.user_metadata:
        where.append("t.user_metadata @> %(meta)s")
        params["meta"] = Jsonb(dict(query.user_metadata))
    if not query.any_status:
        statuses = ["false"]
        if query.active:
            statuses.append("(t.finished_at is null and t.last_heartbeat_at > now() - %(timeout)s)")
            params["timeout"] = timedelta(seconds=timeout_s)
        if query.finish_statuses:
            statuses.append("(t.finished_at is not null and t.finish_status = any(%(fin)s))")
            params["fin"] = list(query.finish_statuses)
        where.append("(" + " or ".join(statuses) + ")")
    if after is not None:
        where.append("(t.created_at, t.tinker_session_id) < (%(after_at)s, %(after_id)s)")
        params["after_at"], params["after_id"] = after
    params["limit"] = limit
    rows = conn.execute(
        _session_select(settings) + "where " + " and ".join(where)
        + " order by t.created_at desc, t.tinker_session_id desc limit %(limit)s",
        params,
    ).fetchall()  # fmt: skip
    return [_info(row) for row in rows]


def training_runs_of(
    conn: psycopg.Connection[Any], settings: Settings, tinker_session_id: str, workspace_id: str
) -> list[str]:
    """The loops run ids of the session's training clients (`<session>-train-<n>`), oldest
    first; base-model samplers' runs are not training clients."""
    rows = conn.execute(
        f"select run_id from {settings.read_schema}.runs "
        "where workspace_id = %s and run_id like %s order by created_at, run_id",
        (workspace_id, f"{tinker_session_id}-train-%"),
    ).fetchall()
    return [row[0] for row in rows]


def record_sampler(
    conn: psycopg.Connection[Any],
    settings: Settings,
    *,
    tinker_session_id: str,
    sampling_session_id: str,
    workspace_id: str,
) -> None:
    """A sampling session id handed out in a Tinker session (get_session lists them)."""
    conn.execute(
        f"insert into {_samplers_table(settings)} "
        "(sampling_session_id, tinker_session_id, workspace_id) values (%s, %s, %s) "
        "on conflict (sampling_session_id) do nothing",
        (sampling_session_id, tinker_session_id, workspace_id),
    )


def samplers_of(
    conn: psycopg.Connection[Any], settings: Settings, tinker_session_id: str, workspace_id: str
) -> list[str]:
    rows = conn.execute(
        f"select sampling_session_id from {_samplers_table(settings)} "
        "where tinker_session_id = %s and workspace_id = %s "
        "order by created_at, sampling_session_id",
        (tinker_session_id, workspace_id),
    ).fetchall()
    return [row[0] for row in rows]


# --- the janitor's part ----------------------------------------------------------------------

CHECK_EVERY_S = 1.0  # how often the rows are read


class TinkerSessionReaper:
    """Ends the loops sessions of finished or silent Tinker sessions. State: the open Tinker
    loops sessions, rebuilt from the event log by the janitor that feeds `observe`."""

    def __init__(self, settings: Settings, bus: CommandBus) -> None:
        self.settings = settings
        self.bus = bus
        self.open: dict[str, OpenLoopsSession] = {}
        self.sent: set[str] = set()  # loops sessions this process asked to end
        self.next_check: datetime | None = None
        self.conn = psycopg.connect(settings.pg_conninfo, autocommit=True)
        ensure_table(self.conn, settings)

    def observe(
        self, event: DomainEvent, occurred_at: datetime, workspace_id: str | None = None
    ) -> None:
        if isinstance(event, SessionCreated) and (event.name or "").startswith(NAME_PREFIX):
            tinker_session = tinker_session_of(event.name.removeprefix(NAME_PREFIX))  # type: ignore[union-attr]
            if tinker_session is not None:
                self.open[event.session_id] = OpenLoopsSession(
                    event.session_id, tinker_session, occurred_at, workspace_id or DEFAULT_WORKSPACE
                )
        elif isinstance(event, SessionEnded):
            self.open.pop(event.session_id, None)
            self.sent.discard(event.session_id)

    def end_due(self, *, now: datetime) -> list[str]:
        """Send EndSession for each due loops session (once per process); their ids."""
        if not self.open or (self.next_check is not None and now < self.next_check):
            return []
        self.next_check = now + timedelta(seconds=CHECK_EVERY_S)
        pending = [o for o in self.open.values() if o.session_id not in self.sent]
        liveness = liveness_of(self.conn, self.settings, {o.tinker_session_id for o in pending})
        due = sessions_to_end(
            pending, liveness, now=now, timeout_s=self.settings.tinker_session_timeout_s
        )
        if due:
            self.bus.send_many(
                end_session(session_id, reason, self.open[session_id].workspace_id)
                for session_id, reason in due
            )
            self.sent.update(session_id for session_id, _ in due)
            # A silent session is over: a heartbeat that comes back late is told so (410).
            for tinker_session in {
                self.open[session_id].tinker_session_id for session_id, _ in due
            }:
                finish(self.conn, self.settings, tinker_session, "no heartbeat")
        return [session_id for session_id, _ in due]
