"""endpoints: where a routed version is served outside the gateway

Revision ID: 0005
Revises: 0004

A new table only: `endpoints`, one row per (model, version) served by another backend (a
KServe InferenceService made by the Kubernetes deployer's reconciler): its object name,
status URL, whether it is Ready and, when not, why. Existing rows are untouched.
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "endpoints",
        sa.Column("model", sa.String(length=128), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("backend", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=253), nullable=False),
        sa.Column("url", sa.Text(), nullable=True),
        sa.Column("ready", sa.Boolean(), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["model"], ["models.name"]),
        sa.PrimaryKeyConstraint("model", "version"),
    )


def downgrade() -> None:
    op.drop_table("endpoints")
