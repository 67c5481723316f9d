"""Registry tables (SQLAlchemy 2). Only `registry.store` touches them."""

from __future__ import annotations

import datetime as dt
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

#: "failed": the version's folder was never completed (its run died or failed first)
#: "rolled_back": a canary the rollout's judge (or an operator) rolled back
VERSION_STATUSES = (
    "registered", "shadow", "canary", "production", "archived", "rejected", "failed",
    "rolled_back",
)  # fmt: skip

#: a promotion request's life: pending -> approved (its rollout runs) -> promoted, failed or
#: rolled_back; or pending -> rejected, expired (not decided in time) or void (its evidence
#: changed after filing)
PROMOTION_STATUSES = (
    "pending", "approved", "promoted", "failed", "rolled_back", "rejected", "expired", "void",
)  # fmt: skip
#: what the loop of a model is doing (registry.loop)
LOOP_STATES = (
    "watching", "retraining", "shadowing", "awaiting_approval", "rolling_out", "paused",
)  # fmt: skip
#: a canary rollout's life (registry.rollouts): running -> promoted, rolled_back or failed
ROLLOUT_STATUSES = ("running", "promoted", "rolled_back", "failed")
#: "interrupted": stopped on purpose (SIGTERM); like failed for unpublished versions
RUN_STATUSES = ("running", "succeeded", "failed", "interrupted")


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


class Endpoint(Base):
    """Where a routed version is served outside the gateway (a KServe InferenceService),
    as the reconciler (servo.reconcile) last saw it; the gateway calls `url` once `ready`."""

    __tablename__ = "endpoints"
    model: Mapped[str] = mapped_column(ForeignKey("models.name"), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    #: the deployer that made it ("kubernetes")
    backend: Mapped[str] = mapped_column(String(32))
    #: the backend's object name (the InferenceService)
    name: Mapped[str] = mapped_column(String(253))
    url: Mapped[str | None] = mapped_column(Text, nullable=True)
    ready: Mapped[bool] = mapped_column(Boolean, default=False)
    #: why it is not ready (the status conditions that are not True), "" when it is
    detail: Mapped[str] = mapped_column(Text, default="")
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
    #: the model the run retrains (None: a run from before the loop, or not a model's)
    model: Mapped[str | None] = mapped_column(String(128), nullable=True, index=True)
    #: the token (or actor) that triggered the run by hand; None when the loop did
    triggered_by: Mapped[str | None] = mapped_column(String(128), nullable=True)


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
    status: Mapped[str] = mapped_column(String(16), default="pending", index=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    #: sha256 of the evidence's canonical JSON when it was filed (registry.promotions)
    evidence_hash: Mapped[str] = mapped_column(String(64))
    run_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    #: the token that triggered the candidate's run by hand (separation of duties)
    triggered_by: Mapped[str | None] = mapped_column(String(128), nullable=True)
    expires_at: Mapped[dt.datetime] = mapped_column()
    #: why the request has its status (a rejection's reason, "evidence changed", ...)
    status_reason: Mapped[str] = mapped_column(Text, default="", server_default="")
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


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
    #: detail["request"] where it is a promotion request's id (indexed: a request's audit)
    request_id: Mapped[int | None] = mapped_column(Integer, nullable=True, index=True)


class ApiToken(Base):
    """A bearer token: only the sha256 of the token is stored, never the token."""

    __tablename__ = "api_tokens"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), index=True)
    #: the name while the token is active, NULL once revoked: unique, so two active tokens
    #: never share a name (NULLs are distinct on SQLite and PostgreSQL)
    active_name: Mapped[str | None] = mapped_column(String(64), nullable=True, unique=True)
    role: Mapped[str] = mapped_column(String(16))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str] = mapped_column(String(128))
    revoked_at: Mapped[dt.datetime | None] = mapped_column(nullable=True)
    revoked_by: Mapped[str | None] = mapped_column(String(128), nullable=True)
    last_used_at: Mapped[dt.datetime | None] = mapped_column(nullable=True)


class ModelLock(Base):
    """A lease on a model: one pipeline per model, across processes and machines."""

    __tablename__ = "model_locks"
    model: Mapped[str] = mapped_column(String(128), primary_key=True)
    owner: Mapped[str] = mapped_column(String(255))
    purpose: Mapped[str] = mapped_column(String(64))
    lease_host: Mapped[str] = mapped_column(String(255))
    lease_pid: Mapped[int] = mapped_column(Integer)
    lease_process: Mapped[str] = mapped_column(String(128))
    acquired_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    heartbeat_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class LoopState(Base):
    __tablename__ = "loop_states"
    model: Mapped[str] = mapped_column(String(128), primary_key=True)
    state: Mapped[str] = mapped_column(String(32))
    paused: Mapped[bool] = mapped_column(Boolean, default=False)
    detail: Mapped[dict[str, Any]] = mapped_column(default=dict)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class LoopEvent(Base):
    __tablename__ = "loop_events"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    model: Mapped[str] = mapped_column(String(128), index=True)
    kind: Mapped[str] = mapped_column(String(32))
    detail: Mapped[dict[str, Any]] = mapped_column(default=dict)
    at: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)


class RetrainRequest(Base):
    """A manual retrain trigger, queued until a controller claims it."""

    __tablename__ = "retrain_requests"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    model: Mapped[str] = mapped_column(String(128))
    actor: Mapped[str] = mapped_column(String(128))
    reason: Mapped[str] = mapped_column(Text, default="")
    at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    claimed_at: Mapped[dt.datetime | None] = mapped_column(nullable=True, index=True)
    claimed_by: Mapped[str | None] = mapped_column(String(255), nullable=True)


class Rollout(Base):
    """An approved request's canary rollout: the candidate takes `steps[step]` percent of
    the traffic until the judge promotes it, rolls it back, or it fails."""

    __tablename__ = "rollouts"
    __table_args__ = (
        # at most one running rollout per model, whatever the writers do
        Index(
            "ix_rollouts_one_running",
            "model",
            unique=True,
            sqlite_where=text("status = 'running'"),
            postgresql_where=text("status = 'running'"),
        ),
    )
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    request_id: Mapped[int] = mapped_column(ForeignKey("promotion_requests.id"), unique=True)
    model: Mapped[str] = mapped_column(ForeignKey("models.name"), index=True)
    #: the candidate, and the champion when the rollout started
    version: Mapped[int] = mapped_column(Integer)
    champion: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), default="running", index=True)
    #: the canary's percents, one per step (the last is 100: the candidate is champion)
    steps: Mapped[list[float]] = mapped_column(JSON)
    step: Mapped[int] = mapped_column(Integer, default=0)
    #: the judge's and the policy's settings when it started (replays use them)
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    #: the step ran past its timeout undecided: the share is kept and an alert raised
    held: Mapped[bool] = mapped_column(Boolean, default=False)
    started_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    step_started_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[dt.datetime | None] = mapped_column(nullable=True)
    #: the last decision's reason, and the verdict of the look that decided it
    reason: Mapped[str] = mapped_column(Text, default="")
    verdict: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


class RolloutLook(Base):
    """One look of a rollout's judge: the counts since the previous look and its verdict."""

    __tablename__ = "rollout_looks"
    rollout_id: Mapped[int] = mapped_column(ForeignKey("rollouts.id"), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    step: Mapped[int] = mapped_column(Integer)
    percent: Mapped[float] = mapped_column()
    #: {metric: [canary trials, canary events, champion trials, champion events]}
    counts: Mapped[dict[str, Any]] = mapped_column(default=dict)
    verdict: Mapped[dict[str, Any]] = mapped_column(default=dict)
