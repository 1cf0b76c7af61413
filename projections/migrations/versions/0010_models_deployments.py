"""Read models of the serving half: `models` and their `deployments` (issue 14, first slice).

Both are written by the model aggregate's events and versioned by its sequence. A deleted
deployment keeps its row (status DELETED, `deleted_at`): the API hides it (404), replay and
audit still see it.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

SCHEMA = "loops"
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "models",
        sa.Column("model_id", sa.Text, primary_key=True),
        sa.Column("workspace_id", sa.Text, nullable=False),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("source", sa.Text, nullable=False),
        sa.Column("checkpoint_uri", sa.Text),
        sa.Column("run_id", sa.Text),
        sa.Column("checkpoint_type", sa.Text),
        sa.Column("chain_position", sa.Integer),
        sa.Column("lora_rank", sa.Integer),
        sa.Column("content_digest", sa.Text),
        sa.Column("base_model", sa.Text, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("version", sa.BigInteger, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.CheckConstraint("source in ('checkpoint', 'base_model')", name="ck_models_source"),
        schema=SCHEMA,
    )
    op.create_index("ix_models_workspace", "models", ["workspace_id", "created_at"], schema=SCHEMA)
    op.create_table(
        "deployments",
        sa.Column("deployment_id", sa.Text, primary_key=True),
        sa.Column("model_id", sa.Text, nullable=False),
        sa.Column("workspace_id", sa.Text, nullable=False),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("number", sa.Integer, nullable=False),
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("instance_type", sa.Text, nullable=False),
        sa.Column("accelerator", sa.Text),
        sa.Column("gpu_count", sa.Integer, nullable=False),
        sa.Column("cpu", sa.Text),
        sa.Column("memory", sa.Text),
        sa.Column("requested_instance_type", sa.Text),
        sa.Column("min_replica", sa.Integer, nullable=False),
        sa.Column("max_replica", sa.Integer, nullable=False),
        sa.Column("copied_from", sa.Text),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("deactivated_at", TS),
        sa.Column("deleted_at", TS),
        sa.Column("version", sa.BigInteger, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.CheckConstraint(
            "status in ('ACTIVE', 'INACTIVE', 'DELETED')", name="ck_deployments_status"
        ),
        sa.CheckConstraint("kind in ('published', 'development')", name="ck_deployments_kind"),
        schema=SCHEMA,
    )
    op.create_index("ix_deployments_model", "deployments", ["model_id", "number"], schema=SCHEMA)


def downgrade() -> None:
    op.drop_index("ix_deployments_model", "deployments", schema=SCHEMA)
    op.drop_table("deployments", schema=SCHEMA)
    op.drop_index("ix_models_workspace", "models", schema=SCHEMA)
    op.drop_table("models", schema=SCHEMA)
