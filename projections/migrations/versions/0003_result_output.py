"""command_results.output: what a worker computed for a work request (loss, tokens, ...), and
the `failed` status (a worker could not do the work; resubmitting may succeed).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

SCHEMA = "loops"


def upgrade() -> None:
    # json, not jsonb: generated text may hold U+0000, which jsonb (and PostgreSQL text)
    # cannot store, and a result the futures table refuses would leave its caller waiting.
    op.add_column("command_results", sa.Column("output", sa.JSON), schema=SCHEMA)
    op.drop_constraint("ck_command_results_status", "command_results", schema=SCHEMA)
    op.create_check_constraint(
        "ck_command_results_status",
        "command_results",
        "status in ('accepted', 'rejected', 'failed')",
        schema=SCHEMA,
    )


def downgrade() -> None:
    op.drop_constraint("ck_command_results_status", "command_results", schema=SCHEMA)
    op.create_check_constraint(
        "ck_command_results_status",
        "command_results",
        "status in ('accepted', 'rejected')",
        schema=SCHEMA,
    )
    op.drop_column("command_results", "output", schema=SCHEMA)
