"""Tenancy of the read models: every table a route reads names the workspace of its rows.

`workspace_id` comes from the event envelope (the command result, for `command_results`); rows
written before tenancy, and events that name none, belong to the `default` workspace, which is
also the column's default, so existing rows need no backfill. The API filters on it: a row of
another workspace reads as missing.

`hotloads` and `sampler_weights` are written by sampler events and read only after the sampler
itself was found in the caller's workspace, so they carry no column of their own.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

SCHEMA = "loops"
DEFAULT_WORKSPACE = "default"

TABLES = (
    "sessions",
    "runs",
    "samplers",
    "checkpoints",
    "promotions",
    "weight_syncs",
    "command_results",
    "event_log",
)


def upgrade() -> None:
    for table in TABLES:
        op.add_column(
            table,
            sa.Column(
                "workspace_id",
                sa.Text,
                nullable=False,
                server_default=sa.text(f"'{DEFAULT_WORKSPACE}'"),
            ),
            schema=SCHEMA,
        )
    # Listings are per workspace, newest first.
    op.create_index(
        "ix_sessions_workspace", "sessions", ["workspace_id", "created_at"], schema=SCHEMA
    )
    # Audit and replay read one workspace's events in log order.
    op.create_index(
        "ix_event_log_workspace",
        "event_log",
        ["workspace_id", "aggregate_id", "sequence"],
        schema=SCHEMA,
    )


def downgrade() -> None:
    op.drop_index("ix_event_log_workspace", "event_log", schema=SCHEMA)
    op.drop_index("ix_sessions_workspace", "sessions", schema=SCHEMA)
    for table in reversed(TABLES):
        op.drop_column(table, "workspace_id", schema=SCHEMA)
