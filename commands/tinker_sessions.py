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
) -> None:
    """The liveness row of a new Tinker session, owned by `workspace_id`; its clock starts."""
    conn.execute(
        f"insert into {_table(settings)} (tinker_session_id, workspace_id) values (%s, %s) "
        "on conflict (tinker_session_id) do nothing",
        (tinker_session_id, workspace_id),
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
) -> None:
    """Mark the session finished. With `workspace_id` (a client's finish), only a session of
    that workspace; None (the janitor's own decision) any."""
    conn.execute(
        f"insert into {_table(settings)} as t "
        "(tinker_session_id, finished_at, finish_reason, workspace_id) "
        "values (%s, now(), %s, %s) on conflict (tinker_session_id) do update set "
        "finished_at = coalesce(t.finished_at, now()), "
        "finish_reason = coalesce(t.finish_reason, excluded.finish_reason) "
        "where excluded.workspace_id is null "
        "or coalesce(t.workspace_id, %s) = excluded.workspace_id",
        (tinker_session_id, reason, workspace_id, DEFAULT_WORKSPACE),
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
