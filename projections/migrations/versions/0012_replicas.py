"""Read model of deployment replicas (issue 14): one row per replica the controller started,
with its status and timings. A stopped or failed replica keeps its row.

Revision ID: 0012
Revises: 0011
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

SCHEMA = "loops"
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "replicas",
        sa.Column("replica_id", sa.Text, primary_key=True),
        sa.Column("deployment_id", sa.Text, nullable=False),
        sa.Column("model_id", sa.Text, nullable=False),
        sa.Column("workspace_id", sa.Text, nullable=False),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("reason", sa.Text),
        sa.Column("replaces", sa.Text),
        sa.Column("instance_type", sa.Text, nullable=False),
        sa.Column("actor_name", sa.Text),
        sa.Column("content_digest", sa.Text),
        sa.Column("checkpoint_id", sa.Text),
        sa.Column("node_ip", sa.Text),
        sa.Column("pid", sa.Integer),
        sa.Column("start_ms", sa.Float),
        sa.Column("load_ms", sa.Float),
        sa.Column("predict_concurrency", sa.Integer),
        sa.Column("requested_at", TS, nullable=False),
        sa.Column("ready_at", TS),
        sa.Column("stopped_at", TS),
        sa.Column("version", sa.BigInteger, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.CheckConstraint(
            "status in ('REQUESTED', 'STARTING', 'READY', 'DRAINING', 'STOPPED', 'FAILED')",
            name="ck_replicas_status",
        ),
        schema=SCHEMA,
    )
    op.create_index(
        "ix_replicas_deployment", "replicas", ["deployment_id", "status"], schema=SCHEMA
    )


def downgrade() -> None:
    op.drop_index("ix_replicas_deployment", "replicas", schema=SCHEMA)
    op.drop_table("replicas", schema=SCHEMA)
