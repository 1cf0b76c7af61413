"""Polling the read models the way an API client polls futures."""

from __future__ import annotations

import time
from typing import Any

import psycopg
from psycopg.rows import dict_row

from infra.settings import Settings


def wait_for_result(
    settings: Settings, request_id: str, *, timeout_s: float = 60
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    with psycopg.connect(settings.pg_conninfo, autocommit=True, row_factory=dict_row) as conn:
        while time.monotonic() < deadline:
            row = conn.execute(
                f"select * from {settings.read_schema}.command_results where command_id = %s",
                (request_id,),
            ).fetchone()
            if row is not None:
                return row
            time.sleep(0.05)
    raise TimeoutError(f"no result for {request_id} in {timeout_s}s")


def query(settings: Settings, sql: str, *params: object) -> list[dict[str, Any]]:
    with psycopg.connect(settings.pg_conninfo, autocommit=True, row_factory=dict_row) as conn:
        return conn.execute(sql.format(schema=settings.read_schema), params).fetchall()
