"""Weight sync read models: checkpoint kinds and promotion, syncs sent to samplers, and what each
sampler serves.

- `checkpoints` gains the chain facts (`checkpoint_type`, `chain_position`); `promotions` lists
  the environments each checkpoint was promoted to.
- `weight_syncs`: one row per `WeightsReady` (session aggregate), numbered per sampler.
- `hotloads`: how each numbered sync went on the sampler (sampler aggregate): started,
  succeeded or failed, with timings and bytes.
- `sampler_weights`: per sampler, whether a worker hosts it and which weights it serves.

The last two are written by sampler events and the first by session events: each table takes its
`version` from one aggregate only, which is what the version guard needs.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
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
    op.add_column("checkpoints", sa.Column("checkpoint_type", sa.Text), schema=SCHEMA)
    op.add_column("checkpoints", sa.Column("chain_position", sa.Integer), schema=SCHEMA)
    op.create_table(
        "promotions",
        sa.Column("checkpoint_id", sa.Text, primary_key=True),
        sa.Column("environment", sa.Text, primary_key=True),
        sa.Column("run_id", sa.Text, nullable=False),
        sa.Column("session_id", sa.Text, nullable=False),
        sa.Column("uri", sa.Text, nullable=False),
        sa.Column("promoted_at", TS, nullable=False),
        schema=SCHEMA,
    )
    op.create_table(
        "weight_syncs",
        sa.Column("sampler_id", sa.Text, primary_key=True),
        sa.Column("weights_version", sa.Integer, primary_key=True),
        sa.Column("run_id", sa.Text, nullable=False),
        sa.Column("session_id", sa.Text, nullable=False),
        sa.Column("checkpoint_id", sa.Text, nullable=False),
        sa.Column("uri", sa.Text, nullable=False),
        sa.Column("content_digest", sa.Text, nullable=False),
        sa.Column("checkpoint_type", sa.Text),
        sa.Column("warmup", sa.Boolean, nullable=False),
        sa.Column("warmup_max_retries", sa.Integer, nullable=False),
        sa.Column("reset_prompt_cache", sa.Boolean, nullable=False),
        sa.Column("requested_at", TS, nullable=False),
        # The command behind the sync (a RecordCheckpoint "<save request>:record", or a
        # HotloadWeights): how a client finds the sync its request caused.
        sa.Column("command_id", sa.Text),
        *_entity_columns(),
        schema=SCHEMA,
    )
    op.create_index("ix_weight_syncs_command", "weight_syncs", ["command_id"], schema=SCHEMA)
    op.create_table(
        "hotloads",
        sa.Column("sampler_id", sa.Text, primary_key=True),
        sa.Column("weights_version", sa.Integer, primary_key=True),
        sa.Column("checkpoint_id", sa.Text),
        sa.Column("uri", sa.Text),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("reason", sa.Text),
        sa.Column("rolled_back", sa.Boolean),
        sa.Column("checkpoint_type", sa.Text),
        sa.Column("folders_applied", sa.Integer),
        sa.Column("bytes_moved", sa.BigInteger),
        sa.Column("fetch_ms", sa.Float),
        sa.Column("apply_ms", sa.Float),
        sa.Column("total_ms", sa.Float),
        sa.Column("warmup_attempts", sa.Integer),
        sa.Column("warmup_ms", sa.Float),
        sa.Column("prompt_cache_entries_dropped", sa.Integer),
        sa.Column("started_at", TS),
        sa.Column("finished_at", TS),
        *_entity_columns(),
        sa.CheckConstraint(
            "status in ('started', 'succeeded', 'failed')", name="ck_hotloads_status"
        ),
        schema=SCHEMA,
    )
    op.create_table(
        "sampler_weights",
        sa.Column("sampler_id", sa.Text, primary_key=True),
        sa.Column("ready_at", TS),
        sa.Column("serving_version", sa.Integer),
        sa.Column("serving_checkpoint_id", sa.Text),
        sa.Column("serving_uri", sa.Text),
        sa.Column("serving_digest", sa.Text),
        sa.Column("last_hotload_version", sa.Integer),
        sa.Column("last_hotload_status", sa.Text),
        sa.Column("last_hotload_reason", sa.Text),
        sa.Column("last_hotload_at", TS),
        *_entity_columns(),
        schema=SCHEMA,
    )


def downgrade() -> None:
    op.drop_table("sampler_weights", schema=SCHEMA)
    op.drop_table("hotloads", schema=SCHEMA)
    op.drop_table("weight_syncs", schema=SCHEMA)
    op.drop_table("promotions", schema=SCHEMA)
    op.drop_column("checkpoints", "chain_position", schema=SCHEMA)
    op.drop_column("checkpoints", "checkpoint_type", schema=SCHEMA)
