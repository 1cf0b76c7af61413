"""projection_failures: every log record the projection could not apply, kept in the read schema.

A record that cannot be decoded, that a projector raises on, or whose rows PostgreSQL refuses is
still dead-lettered, and the projection goes on (no poison pill); but the read model then differs
from the log, so it says so here. The row is written in the batch's transaction, together with
the positions that move past the record: it exists exactly when the record was skipped.

It lives in the projection's schema (not `public`), so a replay's shadow gets its own copy
filled by the same code and a swap brings the failures of the rows it swaps in. Like every read
model it takes its values from the log only (`logged_at` is the Kafka record's timestamp, not
`now()`), so a replay gives the same rows.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-28
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

SCHEMA = "loops"


def upgrade() -> None:
    op.create_table(
        "projection_failures",
        sa.Column("topic", sa.Text, primary_key=True),
        sa.Column("partition", sa.Integer, primary_key=True),
        sa.Column("kafka_offset", sa.BigInteger, primary_key=True),
        sa.Column("kafka_key", sa.Text),
        sa.Column("logged_at", sa.DateTime(timezone=True)),
        # What could be read of the record (nothing of a non-JSON one but its key).
        sa.Column("event_id", sa.Text),
        sa.Column("event_type", sa.Text),
        sa.Column("aggregate_type", sa.Text),
        sa.Column("aggregate_id", sa.Text),
        sa.Column("sequence", sa.BigInteger),
        sa.Column("error_type", sa.Text, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        schema=SCHEMA,
    )
    op.create_index(
        "ix_projection_failures_logged_at", "projection_failures", ["logged_at"], schema=SCHEMA
    )


def downgrade() -> None:
    op.drop_table("projection_failures", schema=SCHEMA)
