"""Read models of the Loops context, the command futures, and the generic event log.

All of them live in the `loops` schema, one schema per projection, so that replay can build a
shadow copy (`loops__shadow`) next to the live one and swap the two by renaming schemas in one
transaction. Every value in these tables comes from an event or a command result, never from the
clock of the database (no `now()` defaults): a replay then produces byte-identical rows, which is
what the replay checksums compare.

Entity tables carry `version`, the aggregate `sequence` of the last event applied to the row;
upserts only win against a lower version, so an event applied twice changes nothing.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

SCHEMA = "loops"
TS = sa.DateTime(timezone=True)


def _entity_columns() -> list[sa.Column]:
    return [
        sa.Column("version", sa.BigInteger, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
    ]


def upgrade() -> None:
    op.execute(f"create schema if not exists {SCHEMA}")

    op.create_table(
        "sessions",
        sa.Column("session_id", sa.Text, primary_key=True),
        sa.Column("base_model", sa.Text, nullable=False),
        sa.Column("project", sa.Text),
        sa.Column("name", sa.Text),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("end_reason", sa.Text),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("ended_at", TS),
        *_entity_columns(),
        sa.CheckConstraint("status in ('active', 'ended')", name="ck_sessions_status"),
        schema=SCHEMA,
    )
    op.create_table(
        "runs",
        sa.Column("run_id", sa.Text, primary_key=True),
        sa.Column("session_id", sa.Text, nullable=False),
        sa.Column("sampler_id", sa.Text, nullable=False),
        sa.Column("base_model", sa.Text, nullable=False),
        sa.Column("max_seq_len", sa.Integer, nullable=False),
        sa.Column("lora_rank", sa.Integer, nullable=False),
        sa.Column("from_checkpoint", sa.Text),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("stop_reason", sa.Text),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("stopped_at", TS),
        *_entity_columns(),
        sa.CheckConstraint("status in ('active', 'stopped')", name="ck_runs_status"),
        schema=SCHEMA,
    )
    op.create_index("ix_runs_session", "runs", ["session_id"], schema=SCHEMA)
    op.create_table(
        "samplers",
        sa.Column("sampler_id", sa.Text, primary_key=True),
        sa.Column("run_id", sa.Text, nullable=False),
        sa.Column("session_id", sa.Text, nullable=False),
        sa.Column("base_model", sa.Text, nullable=False),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("stop_reason", sa.Text),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("stopped_at", TS),
        *_entity_columns(),
        sa.CheckConstraint("status in ('active', 'stopped')", name="ck_samplers_status"),
        schema=SCHEMA,
    )
    op.create_index("ix_samplers_run", "samplers", ["run_id"], schema=SCHEMA)
    op.create_table(
        "checkpoints",
        sa.Column("checkpoint_id", sa.Text, primary_key=True),
        sa.Column("run_id", sa.Text, nullable=False),
        sa.Column("session_id", sa.Text, nullable=False),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("uri", sa.Text, nullable=False),
        sa.Column("files", JSONB, nullable=False),
        sa.Column("total_size_bytes", sa.BigInteger, nullable=False),
        sa.Column("step", sa.Integer),
        sa.Column("expires_at", TS),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("delete_reason", sa.Text),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("deleted_at", TS),
        *_entity_columns(),
        sa.CheckConstraint("status in ('active', 'deleted')", name="ck_checkpoints_status"),
        sa.CheckConstraint("kind in ('weights', 'sampler_weights')", name="ck_checkpoints_kind"),
        schema=SCHEMA,
    )
    # Not unique: the command side owns naming rules; a projection records, it does not judge.
    op.create_index(
        "ix_checkpoints_run_kind_name", "checkpoints", ["run_id", "kind", "name"], schema=SCHEMA
    )
    op.create_index("ix_checkpoints_uri", "checkpoints", ["uri"], schema=SCHEMA)

    # The futures table: the API long-polls it by command_id.
    op.create_table(
        "command_results",
        sa.Column("command_id", sa.Text, primary_key=True),
        sa.Column("command_type", sa.Text),
        sa.Column("aggregate_id", sa.Text),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("reason", sa.Text),
        sa.Column("field", sa.Text),
        sa.Column("events", JSONB, nullable=False),
        sa.Column("correlation_id", sa.Text),
        sa.Column("processed_at", TS, nullable=False),
        sa.Column("kafka_partition", sa.Integer, nullable=False),
        sa.Column("kafka_offset", sa.BigInteger, nullable=False),
        sa.CheckConstraint("status in ('accepted', 'rejected')", name="ck_command_results_status"),
        schema=SCHEMA,
    )
    op.create_index(
        "ix_command_results_aggregate", "command_results", ["aggregate_id"], schema=SCHEMA
    )

    op.create_table(
        "event_log",
        sa.Column("event_id", sa.Text, primary_key=True),
        sa.Column("aggregate_type", sa.Text, nullable=False),
        sa.Column("aggregate_id", sa.Text, nullable=False),
        sa.Column("sequence", sa.BigInteger, nullable=False),
        sa.Column("type", sa.Text, nullable=False),
        sa.Column("schema_version", sa.Integer, nullable=False),
        sa.Column("occurred_at", TS, nullable=False),
        sa.Column("command_id", sa.Text),
        sa.Column("causation_id", sa.Text),
        sa.Column("correlation_id", sa.Text),
        sa.Column("actor", sa.Text, nullable=False),
        # As it was on the wire (before upcasting): the audit trail shows what was written.
        sa.Column("payload", JSONB, nullable=False),
        sa.Column("kafka_partition", sa.Integer, nullable=False),
        sa.Column("kafka_offset", sa.BigInteger, nullable=False),
        sa.UniqueConstraint("aggregate_id", "sequence", name="uq_event_log_aggregate_sequence"),
        schema=SCHEMA,
    )
    op.create_index("ix_event_log_correlation", "event_log", ["correlation_id"], schema=SCHEMA)
    op.create_index("ix_event_log_causation", "event_log", ["causation_id"], schema=SCHEMA)
    op.create_index("ix_event_log_type_time", "event_log", ["type", "occurred_at"], schema=SCHEMA)
    op.create_index("ix_event_log_time", "event_log", ["occurred_at"], schema=SCHEMA)


def downgrade() -> None:
    # Positions without their rows would make a re-upgraded projection skip the whole log.
    op.execute(
        f"delete from projection_positions where projection in ('{SCHEMA}', '{SCHEMA}__shadow')"
    )
    op.execute(f"drop schema if exists {SCHEMA} cascade")
    # A replay's shadow belongs to this revision too.
    op.execute(f"drop schema if exists {SCHEMA}__shadow cascade")
