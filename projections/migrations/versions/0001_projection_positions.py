"""Projection positions: where each projection is in each topic partition.

Every projection writes its rows and its (topic, partition, offset) in one transaction, and
resumes from here after a restart: nothing is applied twice, nothing is skipped.

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "projection_positions",
        sa.Column("projection", sa.Text, primary_key=True),
        sa.Column("topic", sa.Text, primary_key=True),
        sa.Column("partition", sa.Integer, primary_key=True),
        # The offset of the NEXT message to read, as Kafka commits it.
        sa.Column("next_offset", sa.BigInteger, nullable=False),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
    )


def downgrade() -> None:
    op.drop_table("projection_positions")
