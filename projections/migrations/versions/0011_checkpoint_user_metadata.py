"""A checkpoint's own user_metadata.

- `checkpoints.user_metadata` (jsonb, null when none was given): the user's labels from
  `CheckpointSaved` (Tinker's `user_metadata` on save_state / save_weights_for_sampler;
  `/v1/loops` saves). Checkpoints saved before have none, so existing rows need no backfill.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-04
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

SCHEMA = "loops"


def upgrade() -> None:
    op.add_column("checkpoints", sa.Column("user_metadata", JSONB), schema=SCHEMA)


def downgrade() -> None:
    op.drop_column("checkpoints", "user_metadata", schema=SCHEMA)
