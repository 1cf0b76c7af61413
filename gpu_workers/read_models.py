"""The read models as the workers query them: one autocommit connection that is opened again
after PostgreSQL restarts or the connection breaks.

Workers only read here (is a run still active, which checkpoint does a URI name), so a query
that failed on a broken connection is asked again, with the back-off of every other
infrastructure retry; after that it is an InfrastructureError, a "server" failure the caller may
retry.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.rows import dict_row

from gpu_workers.failures import DEFAULT_RETRY, RetryPolicy, with_retries


class ReadModelConnection:
    def __init__(self, conninfo: str, *, policy: RetryPolicy = DEFAULT_RETRY) -> None:
        self.conninfo = conninfo
        self.policy = policy
        self._conn: psycopg.Connection[dict[str, Any]] | None = None

    def execute(self, sql: str, params: Any = ()) -> psycopg.Cursor[dict[str, Any]]:
        return with_retries(
            "read-model query", lambda: self._execute(sql, params), policy=self.policy
        )

    def _execute(self, sql: str, params: Any) -> psycopg.Cursor[dict[str, Any]]:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self.conninfo, autocommit=True, row_factory=dict_row)
        try:
            return self._conn.execute(sql, params)  # type: ignore[arg-type]  # composed SQL text
        except psycopg.OperationalError:
            self._conn.close()  # broken: the next try connects afresh
            self._conn = None
            raise

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
