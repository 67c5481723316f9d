"""canary rollouts and the looks of their judge

Revision ID: 0004
Revises: 0003

New tables only: `rollouts` (one per approved request carried out as a canary, at most one
running per model: a partial unique index) and `rollout_looks` (each look's counts and
verdict, so a decision can be replayed). Existing rows are untouched.
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

RUNNING = sa.text("status = 'running'")


def upgrade() -> None:
    op.create_table(
        "rollouts",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("request_id", sa.Integer(), nullable=False),
        sa.Column("model", sa.String(length=128), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("champion", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("steps", sa.JSON(), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("held", sa.Boolean(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("step_started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("verdict", sa.JSON(), nullable=True),
        sa.ForeignKeyConstraint(["model"], ["models.name"]),
        sa.ForeignKeyConstraint(["request_id"], ["promotion_requests.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("request_id"),
    )
    op.create_index(op.f("ix_rollouts_model"), "rollouts", ["model"], unique=False)
    op.create_index(op.f("ix_rollouts_status"), "rollouts", ["status"], unique=False)
    op.create_index(
        "ix_rollouts_one_running",
        "rollouts",
        ["model"],
        unique=True,
        sqlite_where=RUNNING,
        postgresql_where=RUNNING,
    )
    op.create_table(
        "rollout_looks",
        sa.Column("rollout_id", sa.Integer(), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("percent", sa.Double(), nullable=False),
        sa.Column("counts", sa.JSON(), nullable=False),
        sa.Column("verdict", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(["rollout_id"], ["rollouts.id"]),
        sa.PrimaryKeyConstraint("rollout_id", "seq"),
    )


def downgrade() -> None:
    op.drop_table("rollout_looks")
    op.drop_index("ix_rollouts_one_running", table_name="rollouts")
    op.drop_index(op.f("ix_rollouts_status"), table_name="rollouts")
    op.drop_index(op.f("ix_rollouts_model"), table_name="rollouts")
    op.drop_table("rollouts")
