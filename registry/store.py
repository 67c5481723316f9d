"""The registry's only door to its tables: model versions, aliases with history,
deployments, pipeline runs and lineage, and an append-only audit log.

SQLite (WAL) by default, PostgreSQL by URL. Writers never corrupt or lose each other's
writes: version numbers are handed out under a lock on the model's row (SQLite: every
write transaction is `BEGIN IMMEDIATE`; PostgreSQL: `SELECT ... FOR UPDATE`), and a
transaction that loses a race is retried.
"""

from __future__ import annotations

import ast
import datetime as dt
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Engine, create_engine, delete, event, select
from sqlalchemy import text as sql_text
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from registry.models import (
    VERSION_STATUSES,
    Alias,
    AliasHistory,
    Artifact,
    AuditEntry,
    Decision,
    Deployment,
    Model,
    ModelVersion,
    PipelineRun,
    PromotionRequest,
    StepRun,
    utcnow,
)

T = TypeVar("T")


class RegistryError(Exception):
    pass


class NotFound(RegistryError):
    pass


class PermissionDenied(RegistryError):
    pass


@dataclass(frozen=True)
class VersionInfo:
    model: str
    version: int
    status: str
    artifact_uri: str
    metrics: dict[str, Any]
    run_id: int | None
    created_at: dt.datetime


def _info(row: ModelVersion) -> VersionInfo:
    return VersionInfo(
        row.model,
        row.version,
        row.status,
        row.artifact_uri,
        dict(row.metrics),
        row.run_id,
        row.created_at,
    )


def _sqlite_engine(url: str) -> Engine:
    engine = create_engine(url, connect_args={"timeout": 30, "isolation_level": None})

    @event.listens_for(engine, "connect")
    def _pragmas(connection: Any, _: Any) -> None:
        cursor = connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection: Any) -> None:
        # take the write lock up front: two writers queue instead of deadlocking
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


class RegistryStore:
    def __init__(self, url: str):
        self.url = url
        self.engine = (
            _sqlite_engine(url)
            if url.startswith("sqlite")
            else create_engine(url, pool_pre_ping=True)
        )
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def create_schema(self) -> None:
        """Bring the database to the latest schema with the Alembic migrations."""
        upgrade(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def _session(self) -> Iterator[Session]:
        with self._sessions.begin() as session:
            yield session

    def _retry(self, work: Callable[[Session], T], attempts: int = 20) -> T:
        for attempt in range(attempts):
            try:
                with self._session() as session:
                    return work(session)
            except (IntegrityError, OperationalError, DBAPIError) as exc:
                if attempt == attempts - 1 or not _retryable(exc):
                    raise
                time.sleep(0.01 * (attempt + 1))
        raise AssertionError("unreachable")

    def _locked_model(self, session: Session, name: str) -> Model:
        row = session.execute(
            select(Model).where(Model.name == name).with_for_update()
        ).scalar_one_or_none()
        if row is None:
            row = Model(name=name, last_version=0, created_at=utcnow())
            session.add(row)
            session.flush()  # a concurrent insert of the same name fails here -> retry
        return row

    def _audit(
        self,
        session: Session,
        *,
        actor: str,
        action: str,
        subject: str,
        detail: dict[str, Any],
        rollback: dict[str, Any] | None = None,
    ) -> None:
        session.add(
            AuditEntry(
                actor=actor,
                action=action,
                subject=subject,
                detail=detail,
                rollback=rollback,
                at=utcnow(),
            )
        )

    # model versions

    def register_version(
        self,
        model: str,
        artifact_uri: str,
        metrics: dict[str, Any] | None = None,
        run_id: int | None = None,
        actor: str = "pipeline",
    ) -> int:
        """A new version of `model` (created on first use); returns its number."""

        def work(session: Session) -> int:
            row = self._locked_model(session, model)
            row.last_version += 1
            version = row.last_version
            session.add(
                ModelVersion(
                    model=model,
                    version=version,
                    artifact_uri=artifact_uri,
                    metrics=dict(metrics or {}),
                    run_id=run_id,
                    status="registered",
                    created_at=utcnow(),
                )
            )
            self._audit(
                session,
                actor=actor,
                action="register",
                subject=f"{model}/{version}",
                detail={"artifact_uri": artifact_uri, "run_id": run_id},
            )
            return version

        return self._retry(work)

    def version(self, model: str, version: int) -> VersionInfo:
        with self._session() as session:
            return _info(_version_row(session, model, version))

    def versions(self, model: str) -> list[VersionInfo]:
        with self._session() as session:
            rows = session.execute(
                select(ModelVersion)
                .where(ModelVersion.model == model)
                .order_by(ModelVersion.version)
            ).scalars()
            return [_info(r) for r in rows]

    def models(self) -> list[str]:
        with self._session() as session:
            return list(session.execute(select(Model.name).order_by(Model.name)).scalars())

    def set_artifact_uri(self, model: str, version: int, uri: str) -> None:
        def work(session: Session) -> None:
            _version_row(session, model, version, lock=True).artifact_uri = uri

        self._retry(work)

    def set_status(self, model: str, version: int, status: str, actor: str) -> None:
        if status not in VERSION_STATUSES:
            raise RegistryError(f"unknown status {status!r} (known: {', '.join(VERSION_STATUSES)})")

        def work(session: Session) -> None:
            row = _version_row(session, model, version, lock=True)
            old, row.status = row.status, status
            self._audit(
                session,
                actor=actor,
                action="status",
                subject=f"{model}/{version}",
                detail={"from": old, "to": status},
                rollback={"status": old},
            )

        self._retry(work)

    # aliases

    def set_alias(
        self, model: str, alias: str, version: int, actor: str, reason: str = ""
    ) -> int | None:
        """Point `alias` at `version`; returns the version it pointed at before."""

        def work(session: Session) -> int | None:
            self._locked_model(session, model)
            _version_row(session, model, version)  # NotFound if there is none
            row = session.get(Alias, (model, alias))
            old = row.version if row is not None else None
            if row is None:
                session.add(
                    Alias(
                        model=model,
                        alias=alias,
                        version=version,
                        updated_by=actor,
                        updated_at=utcnow(),
                    )
                )
            else:
                row.version, row.updated_by, row.updated_at = version, actor, utcnow()
            session.add(
                AliasHistory(
                    model=model,
                    alias=alias,
                    old_version=old,
                    new_version=version,
                    actor=actor,
                    reason=reason,
                    at=utcnow(),
                )
            )
            self._audit(
                session,
                actor=actor,
                action="alias",
                subject=f"{model}@{alias}",
                detail={"from": old, "to": version, "reason": reason},
                rollback={"alias": alias, "version": old},
            )
            return old

        return self._retry(work)

    def alias(self, model: str, alias: str) -> int | None:
        with self._session() as session:
            row = session.get(Alias, (model, alias))
            return row.version if row is not None else None

    def alias_history(self, model: str) -> list[dict[str, Any]]:
        with self._session() as session:
            rows = session.execute(
                select(AliasHistory).where(AliasHistory.model == model).order_by(AliasHistory.id)
            ).scalars()
            return [
                {
                    "alias": r.alias,
                    "from": r.old_version,
                    "to": r.new_version,
                    "actor": r.actor,
                    "reason": r.reason,
                    "at": r.at,
                }
                for r in rows
            ]

    # pipeline runs and lineage

    def start_run(self, pipeline: str, trigger: str, parameters: dict[str, Any]) -> int:
        def work(session: Session) -> int:
            run = PipelineRun(
                pipeline=pipeline,
                trigger=trigger,
                parameters=parameters,
                status="running",
                started_at=utcnow(),
            )
            session.add(run)
            session.flush()
            return run.id

        return self._retry(work)

    def finish_run(self, run_id: int, status: str, error: str | None = None) -> None:
        def work(session: Session) -> None:
            run = session.get(PipelineRun, run_id)
            if run is None:
                raise NotFound(f"no pipeline run {run_id}")
            run.status, run.error, run.finished_at = status, error, utcnow()

        self._retry(work)

    def record_step(self, run_id: int, step: str, **fields: Any) -> None:
        self._retry(lambda session: session.add(StepRun(run_id=run_id, step=step, **fields)))

    def record_artifact(self, run_id: int, step: str, **fields: Any) -> None:
        self._retry(lambda session: session.add(Artifact(run_id=run_id, step=step, **fields)))

    def runs(self, limit: int = 50) -> list[dict[str, Any]]:
        with self._session() as session:
            rows = session.execute(
                select(PipelineRun).order_by(PipelineRun.id.desc()).limit(limit)
            ).scalars()
            return [_run_doc(r) for r in rows]

    def run(self, run_id: int) -> dict[str, Any]:
        """One run with its steps and artifacts (its lineage)."""
        with self._session() as session:
            run = session.get(PipelineRun, run_id)
            if run is None:
                raise NotFound(f"no pipeline run {run_id}")
            steps = session.execute(
                select(StepRun).where(StepRun.run_id == run_id).order_by(StepRun.id)
            ).scalars()
            artifacts = session.execute(
                select(Artifact).where(Artifact.run_id == run_id).order_by(Artifact.id)
            ).scalars()
            return {
                **_run_doc(run),
                "steps": [
                    {
                        "step": s.step,
                        "status": s.status,
                        "cache_key": s.cache_key,
                        "attempts": s.attempts,
                        "duration_s": s.duration_s,
                        "parameters": s.parameters,
                        "metrics": s.metrics,
                        "log_uri": s.log_uri,
                        "error": s.error,
                    }
                    for s in steps
                ],
                "artifacts": [
                    {
                        "step": a.step,
                        "name": a.name,
                        "direction": a.direction,
                        "uri": a.uri,
                        "content_hash": a.content_hash,
                        "size": a.size,
                    }
                    for a in artifacts
                ],
            }

    def aliases(self, model: str) -> dict[str, int]:
        with self._session() as session:
            rows = session.execute(select(Alias).where(Alias.model == model)).scalars()
            return {r.alias: r.version for r in rows}

    # promotion requests: evidence, then one decision

    def file_promotion(self, model: str, version: int, evidence: dict[str, Any], actor: str) -> int:
        """An append-only request to promote `version`, with its evidence document."""

        def work(session: Session) -> int:
            _version_row(session, model, version)
            request = PromotionRequest(model=model, version=version, evidence=evidence,
                                       status="pending", created_at=utcnow())  # fmt: skip
            session.add(request)
            session.flush()
            self._audit(
                session,
                actor=actor,
                action="promotion_filed",
                subject=f"{model}/{version}",
                detail={"request": request.id},
            )
            return request.id

        return self._retry(work)

    def decide(self, request_id: int, decision: str, actor: str, roles: set[str],
               reason: str = "") -> None:  # fmt: skip
        """Approve or reject a pending request; needs the `approver` role. The request's
        evidence never changes; the decision is a row of its own."""
        if decision not in ("approved", "rejected"):
            raise RegistryError(f"decision must be approved or rejected, got {decision!r}")
        if "approver" not in roles:
            raise PermissionDenied(f"{actor} may not decide promotions (needs role approver)")

        def work(session: Session) -> None:
            request = session.execute(
                select(PromotionRequest).where(PromotionRequest.id == request_id).with_for_update()
            ).scalar_one_or_none()
            if request is None:
                raise NotFound(f"no promotion request {request_id}")
            if request.status != "pending":
                raise RegistryError(f"promotion request {request_id} is already {request.status}")
            request.status = decision
            session.add(Decision(request_id=request_id, decision=decision, actor=actor,
                                 reason=reason, at=utcnow()))  # fmt: skip
            self._audit(
                session,
                actor=actor,
                action=f"promotion_{decision}",
                subject=f"{request.model}/{request.version}",
                detail={"request": request_id, "reason": reason},
            )

        self._retry(work)

    def promotions(
        self, model: str | None = None, status: str | None = None
    ) -> list[dict[str, Any]]:
        with self._session() as session:
            query = select(PromotionRequest).order_by(PromotionRequest.id)
            if model is not None:
                query = query.where(PromotionRequest.model == model)
            if status is not None:
                query = query.where(PromotionRequest.status == status)
            requests = list(session.execute(query).scalars())
            decisions = {
                d.request_id: d
                for d in session.execute(
                    select(Decision).where(Decision.request_id.in_([r.id for r in requests]))
                ).scalars()
            }
            return [
                {
                    "id": r.id,
                    "model": r.model,
                    "version": r.version,
                    "status": r.status,
                    "evidence": r.evidence,
                    "created_at": r.created_at,
                    "decision": None
                    if r.id not in decisions
                    else {
                        "decision": decisions[r.id].decision,
                        "actor": decisions[r.id].actor,
                        "reason": decisions[r.id].reason,
                        "at": decisions[r.id].at,
                    },
                }
                for r in requests
            ]

    # deployments (the route table the gateway reads)

    def set_deployments(
        self, model: str, rows: list[tuple[int, str, float]], actor: str, reason: str = ""
    ) -> None:
        """Replace `model`'s deployments with (version, role, percent) rows in one
        transaction; the audit entry keeps the previous rows for rollback."""
        roles = [role for _, role, _ in rows]
        if roles.count("champion") != 1 or roles.count("canary") > 1:
            raise RegistryError("a deployment needs exactly one champion and at most one canary")
        if len({version for version, _, _ in rows}) != len(rows):
            raise RegistryError("a version can have only one role")
        for _, role, percent in rows:
            if role not in ("champion", "canary", "shadow", "other"):
                raise RegistryError(f"unknown role {role!r}")
            if not 0 <= percent <= 100:
                raise RegistryError(f"percent {percent} is not within 0..100")

        def work(session: Session) -> None:
            self._locked_model(session, model)
            for version, _, _ in rows:
                _version_row(session, model, version)
            old = session.execute(select(Deployment).where(Deployment.model == model)).scalars()
            previous = [[d.version, d.role, d.percent] for d in old]
            session.execute(delete(Deployment).where(Deployment.model == model))
            for version, role, percent in rows:
                session.add(
                    Deployment(
                        model=model,
                        version=version,
                        role=role,
                        percent=percent,
                        updated_at=utcnow(),
                    )
                )
            self._audit(
                session,
                actor=actor,
                action="deploy",
                subject=model,
                detail={"deployments": [list(r) for r in rows], "reason": reason},
                rollback={"deployments": previous},
            )

        self._retry(work)

    def deployments(self) -> dict[str, list[dict[str, Any]]]:
        """Every model's deployments with each version's artifact URI."""
        with self._session() as session:
            rows = session.execute(
                select(Deployment, ModelVersion.artifact_uri)
                .join(
                    ModelVersion,
                    (ModelVersion.model == Deployment.model)
                    & (ModelVersion.version == Deployment.version),
                )
                .order_by(Deployment.model, Deployment.version)
            ).all()
            out: dict[str, list[dict[str, Any]]] = {}
            for deployment, uri in rows:
                out.setdefault(deployment.model, []).append(
                    {
                        "version": deployment.version,
                        "role": deployment.role,
                        "percent": deployment.percent,
                        "artifact_uri": uri,
                    }
                )
            return out

    def deployments_revision(self) -> int:
        """Changes whenever any deployment changes (the last deploy's audit id)."""
        with self._session() as session:
            last = session.execute(
                select(AuditEntry.id).where(AuditEntry.action == "deploy")
                .order_by(AuditEntry.id.desc()).limit(1)
            ).scalar_one_or_none()  # fmt: skip
            return int(last or 0)

    def audit(self) -> list[dict[str, Any]]:
        with self._session() as session:
            rows = session.execute(select(AuditEntry).order_by(AuditEntry.id)).scalars()
            return [
                {
                    "id": r.id,
                    "at": r.at,
                    "actor": r.actor,
                    "action": r.action,
                    "subject": r.subject,
                    "detail": r.detail,
                    "rollback": r.rollback,
                }
                for r in rows
            ]


def _version_row(session: Session, model: str, version: int, lock: bool = False) -> ModelVersion:
    query = select(ModelVersion).where(ModelVersion.model == model, ModelVersion.version == version)
    row = session.execute(query.with_for_update() if lock else query).scalar_one_or_none()
    if row is None:
        raise NotFound(f"model '{model}' has no version {version}")
    return row


def _run_doc(run: PipelineRun) -> dict[str, Any]:
    return {
        "id": run.id,
        "pipeline": run.pipeline,
        "trigger": run.trigger,
        "status": run.status,
        "parameters": run.parameters,
        "error": run.error,
        "started_at": run.started_at,
        "finished_at": run.finished_at,
    }


MIGRATIONS = Path(__file__).parent / "migrations"


def alembic_config(engine: Engine) -> Any:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False))
    return config


def _migration_heads(folder: Path = MIGRATIONS / "versions") -> set[str] | None:
    """The newest revision(s) of the migrations, read from their files without importing
    Alembic (a CLI command that finds the schema current skips Alembic altogether); None
    when a file does not read as expected (then Alembic decides)."""
    revisions: set[str] = set()
    parents: set[str] = set()
    for path in folder.glob("*.py"):
        found: dict[str, Any] = {}
        for line in path.read_text().splitlines():
            key, sep, value = line.partition("=")
            key = key.split(":", 1)[0].strip()  # `revision: str = "0002"` too
            if sep and key in ("revision", "down_revision") and line[0] != " ":
                try:
                    found[key] = ast.literal_eval(value.strip())
                except (ValueError, SyntaxError):
                    return None
        revision, down = found.get("revision"), found.get("down_revision")
        if not isinstance(revision, str):
            return None
        revisions.add(revision)
        parents.update([down] if isinstance(down, str) else (down or ()))
    heads = revisions - parents
    return heads or None


def _at_head(engine: Engine) -> bool:
    heads = _migration_heads()
    if heads is None:
        return False
    try:
        with engine.connect() as connection:
            rows = connection.execute(sql_text("SELECT version_num FROM alembic_version"))
            current = {str(row[0]) for row in rows}
    except DBAPIError:  # no version table yet: a new database
        return False
    return current == heads


def upgrade(engine: Engine, revision: str = "head") -> None:
    if revision == "head" and _at_head(engine):
        return
    from alembic import command

    config = alembic_config(engine)
    with engine.connect() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)
        if connection.in_transaction():
            connection.commit()


def _retryable(exc: Exception) -> bool:
    text = str(exc).lower()
    return isinstance(exc, IntegrityError) or any(
        marker in text
        for marker in ("database is locked", "could not serialize", "deadlock", "busy")
    )
