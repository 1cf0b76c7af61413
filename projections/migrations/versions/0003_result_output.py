"""command_results.output: what a worker computed for a work request (loss, tokens, ...).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

SCHEMA = "loops"


def upgrade() -> None:
    op.add_column("command_results", sa.Column("output", JSONB), schema=SCHEMA)


def downgrade() -> None:
    op.drop_column("command_results", "output", schema=SCHEMA)
