"""the closed loop: tokens, promotion request lifecycle, model locks, loop state and events,
manual retrain requests; runs record their model and who triggered them

Revision ID: 0003
Revises: 0002

Promotion requests filed before this revision get the hash of their evidence as it is
stored now, expire 7 days after they were filed, and were last updated when filed. Audit
entries that name a promotion request (detail.request) get it in the indexed request_id.
"""

import datetime as dt
import hashlib
import json

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

EXPIRES = dt.timedelta(days=7)


def _hash(doc: object) -> str:  # registry.promotions.evidence_hash as of this revision
    text = json.dumps(
        doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )
    return hashlib.sha256(text.encode()).hexdigest()


def _json(value: object) -> object:
    return json.loads(value) if isinstance(value, str) else value


def _promotion_columns() -> None:
    with op.batch_alter_table("promotion_requests", schema=None) as batch_op:
        batch_op.add_column(sa.Column("evidence_hash", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("run_id", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("triggered_by", sa.String(length=128), nullable=True))
        batch_op.add_column(sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(
            sa.Column("status_reason", sa.Text(), server_default="", nullable=False)
        )
        batch_op.add_column(sa.Column("updated_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.create_index(batch_op.f("ix_promotion_requests_status"), ["status"], unique=False)
    bind = op.get_bind()
    table = sa.table(
        "promotion_requests",
        sa.column("id", sa.Integer()),
        sa.column("evidence", sa.JSON()),
        sa.column("created_at", sa.DateTime(timezone=True)),
        sa.column("evidence_hash", sa.String()),
        sa.column("expires_at", sa.DateTime(timezone=True)),
        sa.column("updated_at", sa.DateTime(timezone=True)),
    )
    for row in bind.execute(sa.select(table.c.id, table.c.evidence, table.c.created_at)).all():
        created = row.created_at
        if isinstance(created, str):  # SQLite without a declared type: text
            created = dt.datetime.fromisoformat(created)
        bind.execute(
            table.update()
            .where(table.c.id == row.id)
            .values(
                evidence_hash=_hash(_json(row.evidence) or {}),
                expires_at=created + EXPIRES,
                updated_at=created,
            )
        )
    with op.batch_alter_table("promotion_requests", schema=None) as batch_op:
        batch_op.alter_column("evidence_hash", existing_type=sa.String(length=64), nullable=False)
        batch_op.alter_column(
            "expires_at", existing_type=sa.DateTime(timezone=True), nullable=False
        )
        batch_op.alter_column(
            "updated_at", existing_type=sa.DateTime(timezone=True), nullable=False
        )


def _audit_request_ids() -> None:
    with op.batch_alter_table("audit_log", schema=None) as batch_op:
        batch_op.add_column(sa.Column("request_id", sa.Integer(), nullable=True))
        batch_op.create_index(batch_op.f("ix_audit_log_request_id"), ["request_id"], unique=False)
    bind = op.get_bind()
    table = sa.table(
        "audit_log",
        sa.column("id", sa.Integer()),
        sa.column("action", sa.String()),
        sa.column("detail", sa.JSON()),
        sa.column("request_id", sa.Integer()),
    )
    query = sa.select(table.c.id, table.c.detail).where(table.c.action.like("promotion%"))
    for row in bind.execute(query).all():
        detail = _json(row.detail)
        request = detail.get("request") if isinstance(detail, dict) else None
        if isinstance(request, int) and not isinstance(request, bool):
            bind.execute(table.update().where(table.c.id == row.id).values(request_id=request))


def upgrade() -> None:
    _promotion_columns()
    _audit_request_ids()
    with op.batch_alter_table("pipeline_runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("model", sa.String(length=128), nullable=True))
        batch_op.add_column(sa.Column("triggered_by", sa.String(length=128), nullable=True))
        batch_op.create_index(batch_op.f("ix_pipeline_runs_model"), ["model"], unique=False)
    op.create_table(
        "api_tokens",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("active_name", sa.String(length=64), nullable=True),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(length=128), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_by", sa.String(length=128), nullable=True),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("active_name"),
        sa.UniqueConstraint("token_hash"),
    )
    op.create_index(op.f("ix_api_tokens_name"), "api_tokens", ["name"], unique=False)
    op.create_table(
        "model_locks",
        sa.Column("model", sa.String(length=128), nullable=False),
        sa.Column("owner", sa.String(length=255), nullable=False),
        sa.Column("purpose", sa.String(length=64), nullable=False),
        sa.Column("lease_host", sa.String(length=255), nullable=False),
        sa.Column("lease_pid", sa.Integer(), nullable=False),
        sa.Column("lease_process", sa.String(length=128), nullable=False),
        sa.Column("acquired_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("model"),
    )
    op.create_table(
        "loop_states",
        sa.Column("model", sa.String(length=128), nullable=False),
        sa.Column("state", sa.String(length=32), nullable=False),
        sa.Column("paused", sa.Boolean(), nullable=False),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("model"),
    )
    op.create_table(
        "loop_events",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("model", sa.String(length=128), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_loop_events_model"), "loop_events", ["model"], unique=False)
    op.create_index(op.f("ix_loop_events_at"), "loop_events", ["at"], unique=False)
    op.create_table(
        "retrain_requests",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("model", sa.String(length=128), nullable=False),
        sa.Column("actor", sa.String(length=128), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("claimed_by", sa.String(length=255), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(
        op.f("ix_retrain_requests_claimed_at"), "retrain_requests", ["claimed_at"], unique=False
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_retrain_requests_claimed_at"), table_name="retrain_requests")
    op.drop_table("retrain_requests")
    op.drop_index(op.f("ix_loop_events_at"), table_name="loop_events")
    op.drop_index(op.f("ix_loop_events_model"), table_name="loop_events")
    op.drop_table("loop_events")
    op.drop_table("loop_states")
    op.drop_table("model_locks")
    op.drop_index(op.f("ix_api_tokens_name"), table_name="api_tokens")
    op.drop_table("api_tokens")
    with op.batch_alter_table("pipeline_runs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_pipeline_runs_model"))
        batch_op.drop_column("triggered_by")
        batch_op.drop_column("model")
    with op.batch_alter_table("audit_log", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_audit_log_request_id"))
        batch_op.drop_column("request_id")
    with op.batch_alter_table("promotion_requests", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_promotion_requests_status"))
        for column in (
            "updated_at",
            "status_reason",
            "expires_at",
            "triggered_by",
            "run_id",
            "evidence_hash",
        ):
            batch_op.drop_column(column)
