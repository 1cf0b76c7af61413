"""command_results.category: `user` (fix the request) or `server` (loopstream failed; retrying
the same request may succeed), as the command result on Kafka says. Null for results written
before the field existed; readers then infer it from the status.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

SCHEMA = "loops"


def upgrade() -> None:
    op.add_column("command_results", sa.Column("category", sa.Text), schema=SCHEMA)
    op.create_check_constraint(
        "ck_command_results_category",
        "command_results",
        "category is null or category in ('user', 'server')",
        schema=SCHEMA,
    )


def downgrade() -> None:
    op.drop_constraint("ck_command_results_category", "command_results", schema=SCHEMA)
    op.drop_column("command_results", "category", schema=SCHEMA)
