"""A run's user_metadata, a checkpoint's `public` flag, and the workspace-wide checkpoint list.

- `runs.user_metadata` (jsonb, null when none was given): the user's labels from `RunCreated`
  (Tinker's `user_metadata` on create_model / create-from-state; `/v1/loops` run creation).
- `checkpoints.public`: set by `CheckpointPublished`, cleared by `CheckpointUnpublished`;
  false for every checkpoint saved before, so existing rows need no backfill.
- An index for `GET /api/v1/checkpoints` (every checkpoint of a workspace, newest first).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

SCHEMA = "loops"


def upgrade() -> None:
    op.add_column("runs", sa.Column("user_metadata", JSONB), schema=SCHEMA)
    op.add_column(
        "checkpoints",
        sa.Column("public", sa.Boolean, nullable=False, server_default=sa.false()),
        schema=SCHEMA,
    )
    op.create_index(
        "ix_checkpoints_workspace", "checkpoints", ["workspace_id", "created_at"], schema=SCHEMA
    )


def downgrade() -> None:
    op.drop_index("ix_checkpoints_workspace", "checkpoints", schema=SCHEMA)
    op.drop_column("checkpoints", "public", schema=SCHEMA)
    op.drop_column("runs", "user_metadata", schema=SCHEMA)
