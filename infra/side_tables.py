"""Tables that live beside the read models without being projections of the log (secret values,
Tinker sessions' liveness): each in a schema of its own, so a projection replay never touches
them, made on first use.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg

from infra.settings import checked_identifier

_made: set[tuple[str, str]] = set()  # (conninfo, schema) made by this process


def ensure_side_tables(
    conn: psycopg.Connection[Any], *, conninfo: str, schema: str, ddl: Sequence[str]
) -> None:
    """Create `schema` and run its idempotent `ddl` (create ... if not exists), once per process
    and database."""
    if (conninfo, schema) in _made:
        return
    checked_identifier(schema)
    with conn.transaction():
        # Two processes creating at once would race on the catalog: serialise them.
        conn.execute("select pg_advisory_xact_lock(hashtext(%s))", (schema,))
        conn.execute(f"create schema if not exists {schema}")
        for statement in ddl:
            conn.execute(statement)  # type: ignore[arg-type]  # composed DDL text
    _made.add((conninfo, schema))
