"""alembic migrations apply to a real PostgreSQL (a throwaway database on the stack's server)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import psycopg
import pytest
from alembic import command
from alembic.script import ScriptDirectory

from infra.settings import Settings
from projections.db import alembic_config, migrate


@pytest.fixture
def scratch_settings(settings: Settings) -> Iterator[Settings]:
    name = f"test_{uuid.uuid4().hex[:12]}"
    admin = settings.pg_conninfo.replace(f"dbname={settings.pg_database}", "dbname=postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'create database "{name}"')
    yield settings.model_copy(update={"pg_database": name})
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'drop database "{name}" with (force)')


def _tables(settings: Settings) -> set[str]:
    with psycopg.connect(settings.pg_conninfo) as conn:
        rows = conn.execute(
            "select table_name from information_schema.tables where table_schema = 'public'"
        ).fetchall()
    return {row[0] for row in rows}


def test_migrations_upgrade_to_head_and_back_to_base(scratch_settings: Settings) -> None:
    migrate(scratch_settings, "head")

    head = ScriptDirectory.from_config(alembic_config(scratch_settings)).get_current_head()
    with psycopg.connect(scratch_settings.pg_conninfo) as conn:
        (version,) = conn.execute("select version_num from alembic_version").fetchone()
    assert version == head
    assert {"projection_positions", "alembic_version"} <= _tables(scratch_settings)

    command.downgrade(alembic_config(scratch_settings), "base")
    assert _tables(scratch_settings) == {"alembic_version"}


def test_migrating_twice_is_harmless(scratch_settings: Settings) -> None:
    migrate(scratch_settings, "head")
    migrate(scratch_settings, "head")
    assert "projection_positions" in _tables(scratch_settings)
