"""Registry tables (SQLAlchemy 2). Only `registry.store` touches them."""

from __future__ import annotations

import datetime as dt
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

#: "failed": the version's folder was never completed (its run died or failed first)
VERSION_STATUSES = (
    "registered", "shadow", "canary", "production", "archived", "rejected", "failed",
)  # fmt: skip


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        dict[str, Any]: JSON,
        dt.datetime: DateTime(timezone=True),
    }


class Model(Base):
    __tablename__ = "models"
    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    #: the highest version number handed out (incremented under a row lock)
    last_version: Mapped[int] = mapped_column(Integer, default=0)


class ModelVersion(Base):
    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("model", "version"),)
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    model: Mapped[str] = mapped_column(ForeignKey("models.name"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), default="registered")
    artifact_uri: Mapped[str] = mapped_column(Text)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    run_id: Mapped[int | None] = mapped_column(ForeignKey("pipeline_runs.id"), nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    #: set last, once the version's folder is complete and in place: only servable versions
    #: can be deployed, aliased or routed
    servable: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    #: sha256 of every file of the version's folder, recorded when it was published
    artifact_hashes: Mapped[dict[str, Any]] = mapped_column(
        default=dict, server_default=text("'{}'")
    )


class Alias(Base):
    __tablename__ = "aliases"
    model: Mapped[str] = mapped_column(ForeignKey("models.name"), primary_key=True)
    alias: Mapped[str] = mapped_column(String(32), primary_key=True)
    version: Mapped[int] = mapped_column(Integer)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_by: Mapped[str] = mapped_column(String(128))


class AliasHistory(Base):
    """Append-only: every move of an alias, who and when."""

    __tablename__ = "alias_history"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    model: Mapped[str] = mapped_column(String(128), index=True)
    alias: Mapped[str] = mapped_column(String(32))
    old_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    new_version: Mapped[int] = mapped_column(Integer)
    actor: Mapped[str] = mapped_column(String(128))
    reason: Mapped[str] = mapped_column(Text, default="")
    at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Deployment(Base):
    """The route table the gateway reads: one row per (model, version) with its role."""

    __tablename__ = "deployments"
    model: Mapped[str] = mapped_column(ForeignKey("models.name"), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    role: Mapped[str] = mapped_column(String(16))  # champion, canary, shadow, other
    percent: Mapped[float] = mapped_column(default=100.0)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class PipelineRun(Base):
    __tablename__ = "pipeline_runs"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    pipeline: Mapped[str] = mapped_column(String(128))
    trigger: Mapped[str] = mapped_column(String(32), default="manual")
    status: Mapped[str] = mapped_column(String(16), default="running", index=True)
    parameters: Mapped[dict[str, Any]] = mapped_column(default=dict)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    started_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[dt.datetime | None] = mapped_column(nullable=True)
    # the lease of the process that runs it (registry.lease): a running run whose process
    # is gone (same machine) or whose heartbeat is older than the lease (elsewhere) failed
    lease_host: Mapped[str | None] = mapped_column(String(255), nullable=True)
    lease_pid: Mapped[int | None] = mapped_column(Integer, nullable=True)
    #: boot id, pid namespace and start time of the process: survives pid reuse
    lease_process: Mapped[str | None] = mapped_column(String(128), nullable=True)
    heartbeat_at: Mapped[dt.datetime | None] = mapped_column(nullable=True)
    #: temporary folders the run owns while it may exist (removed when it is found dead)
    scratch: Mapped[list[str] | None] = mapped_column(JSON(none_as_null=True), nullable=True)


class StepRun(Base):
    __tablename__ = "step_runs"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("pipeline_runs.id"), index=True)
    step: Mapped[str] = mapped_column(String(128))
    status: Mapped[str] = mapped_column(String(16))  # succeeded, cached, failed, skipped
    cache_key: Mapped[str | None] = mapped_column(String(128), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=1)
    parameters: Mapped[dict[str, Any]] = mapped_column(default=dict)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    duration_s: Mapped[float] = mapped_column(default=0.0)
    log_uri: Mapped[str | None] = mapped_column(Text, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)


class Artifact(Base):
    __tablename__ = "artifacts"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("pipeline_runs.id"), index=True)
    step: Mapped[str] = mapped_column(String(128))
    name: Mapped[str] = mapped_column(String(128))
    direction: Mapped[str] = mapped_column(String(8))  # input, output
    uri: Mapped[str] = mapped_column(Text)
    content_hash: Mapped[str] = mapped_column(String(128))
    size: Mapped[int] = mapped_column(Integer)


class PromotionRequest(Base):
    __tablename__ = "promotion_requests"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    model: Mapped[str] = mapped_column(ForeignKey("models.name"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    evidence: Mapped[dict[str, Any]] = mapped_column(default=dict)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Decision(Base):
    __tablename__ = "decisions"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    request_id: Mapped[int] = mapped_column(ForeignKey("promotion_requests.id"), index=True)
    decision: Mapped[str] = mapped_column(String(16))  # approved, rejected
    actor: Mapped[str] = mapped_column(String(128))
    reason: Mapped[str] = mapped_column(Text, default="")
    at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class AuditEntry(Base):
    """Append-only audit log; `rollback` points at the state to restore, where one exists."""

    __tablename__ = "audit_log"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    actor: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(64))
    subject: Mapped[str] = mapped_column(String(256))
    detail: Mapped[dict[str, Any]] = mapped_column(default=dict)
    rollback: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
