"""Read model of the gateway's async predict requests: one row per request, its status (Baseten's
names), times, webhook outcome and the S3 key of its output.

Revision ID: 0013
Revises: 0012
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

SCHEMA = "loops"
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "async_requests",
        sa.Column("request_id", sa.Text, primary_key=True),
        sa.Column("workspace_id", sa.Text, nullable=False),
        sa.Column("model_id", sa.Text, nullable=False),
        sa.Column("deployment_id", sa.Text, nullable=False),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("priority", sa.SmallInteger, nullable=False),
        sa.Column("max_time_in_queue_seconds", sa.Integer, nullable=False),
        sa.Column("webhook_endpoint", sa.Text),
        sa.Column("submitted_at", TS, nullable=False),
        sa.Column("queued_at", TS, nullable=False),
        sa.Column("started_at", TS),
        sa.Column("completed_at", TS),
        sa.Column("replica_id", sa.Text),
        sa.Column("output_key", sa.Text),
        sa.Column("output_bytes", sa.BigInteger),
        sa.Column("output_sha256", sa.Text),
        sa.Column("error_code", sa.Text),
        sa.Column("error", sa.Text),
        sa.Column("webhook_status", sa.Text, nullable=False),
        sa.Column("webhook_attempts", sa.Integer, nullable=False),
        sa.Column("webhook_last_error", sa.Text),
        sa.Column("webhook_done_at", TS),
        sa.Column("version", sa.BigInteger, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.CheckConstraint(
            "status in ('QUEUED', 'IN_PROGRESS', 'SUCCEEDED', 'FAILED', 'EXPIRED', "
            "'WEBHOOK_FAILED')",
            name="ck_async_requests_status",
        ),
        sa.CheckConstraint(
            "webhook_status in ('NONE', 'PENDING', 'DELIVERED', 'FAILED')",
            name="ck_async_requests_webhook_status",
        ),
        schema=SCHEMA,
    )
    op.create_index(
        "ix_async_requests_deployment", "async_requests", ["deployment_id", "status"],
        schema=SCHEMA,
    )  # fmt: skip


def downgrade() -> None:
    op.drop_index("ix_async_requests_deployment", "async_requests", schema=SCHEMA)
    op.drop_table("async_requests", schema=SCHEMA)
