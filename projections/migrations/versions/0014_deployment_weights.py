"""Weight sync into deployments (issue 14 item 4): a deployment's target weights, and what each
replica serves and did with its last hotload.

Revision ID: 0014
Revises: 0013
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None

SCHEMA = "loops"
TS = sa.DateTime(timezone=True)


def deployment_columns() -> tuple[sa.Column, ...]:
    return (
        # The deployment's newest DeploymentWeightsUpdated (0 / null: the model's own weights).
        sa.Column("weights_version", sa.Integer, nullable=False, server_default="0"),
        sa.Column("weights_checkpoint_uri", sa.Text),
        sa.Column("weights_content_digest", sa.Text),
        sa.Column("weights_checkpoint_type", sa.Text),
        sa.Column("weights_updated_at", TS),
    )


def replica_columns() -> tuple[sa.Column, ...]:
    return (
        # The deployment weights version the replica serves (0: the model's own).
        sa.Column("weights_version", sa.Integer, nullable=False, server_default="0"),
        # Its last hotload: LOADING, LOADED or FAILED, which version, why it failed, and timings.
        sa.Column("hotload_status", sa.Text),
        sa.Column("hotload_weights_version", sa.Integer),
        sa.Column("hotload_reason", sa.Text),
        sa.Column("hotload_fetch_ms", sa.Float),
        sa.Column("hotload_apply_ms", sa.Float),
        sa.Column("hotload_warmup_ms", sa.Float),
        sa.Column("hotloaded_at", TS),
    )


def upgrade() -> None:
    for column in deployment_columns():
        op.add_column("deployments", column, schema=SCHEMA)
    for column in replica_columns():
        op.add_column("replicas", column, schema=SCHEMA)
    op.create_check_constraint(
        "ck_replicas_hotload_status",
        "replicas",
        "hotload_status in ('LOADING', 'LOADED', 'FAILED')",
        schema=SCHEMA,
    )


def downgrade() -> None:
    op.drop_constraint("ck_replicas_hotload_status", "replicas", schema=SCHEMA)
    for column in reversed(replica_columns()):
        op.drop_column("replicas", column.name, schema=SCHEMA)
    for column in reversed(deployment_columns()):
        op.drop_column("deployments", column.name, schema=SCHEMA)
