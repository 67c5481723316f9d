"""run leases, scratch folders; servable versions with file hashes

Revision ID: 0002
Revises: 0001

A run records its process (lease_host, lease_pid, lease_process), a heartbeat and its
temporary folders, so the recovery check can mark it failed when it dies. A version is
servable once its folder is complete; versions registered before this revision are
servable if they have an artifact URI (the URI was set after the folder was written).
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("model_versions", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("servable", sa.Boolean(), server_default=sa.false(), nullable=False)
        )
        batch_op.add_column(
            sa.Column("artifact_hashes", sa.JSON(), server_default=sa.text("'{}'"), nullable=False)
        )
    op.execute("UPDATE model_versions SET servable = (artifact_uri <> '')")
    with op.batch_alter_table("pipeline_runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("lease_host", sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column("lease_pid", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("lease_process", sa.String(length=128), nullable=True))
        batch_op.add_column(sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("scratch", sa.JSON(), nullable=True))
        batch_op.create_index(batch_op.f("ix_pipeline_runs_status"), ["status"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("pipeline_runs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_pipeline_runs_status"))
        batch_op.drop_column("scratch")
        batch_op.drop_column("heartbeat_at")
        batch_op.drop_column("lease_process")
        batch_op.drop_column("lease_pid")
        batch_op.drop_column("lease_host")
    with op.batch_alter_table("model_versions", schema=None) as batch_op:
        batch_op.drop_column("artifact_hashes")
        batch_op.drop_column("servable")
