"""The registry's only door to its tables: model versions, aliases with history,
deployments and the loop's route changes (registry.routes), the endpoints of versions
served outside the gateway (registry.endpoints), canary rollouts and their
judge's looks (registry.rollouts), pipeline runs and lineage
(registry.runs), promotion requests (registry.promotions), tokens (registry.tokens), model
locks (registry.locks), the loop's state and events (registry.loop), and an append-only
audit log (registry.audit).

SQLite (WAL) by default, PostgreSQL by URL. Writers never corrupt or lose each other's
writes: version numbers are handed out under a lock on the model's row (SQLite: every
write transaction is `BEGIN IMMEDIATE`; PostgreSQL: `SELECT ... FOR UPDATE`), and a
transaction that loses a race is retried.

A version is servable only once its folder is complete: a pipeline reserves the number
(`register_version(..., servable=False)`), writes the folder, and `publish_version` sets
its URI, file hashes and the servable flag in one transaction, last. Only servable
versions can be deployed or aliased.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from registry.audit import AuditMixin
from registry.base import (
    LEASE_S,
    MIGRATIONS,
    Conflict,
    Invalid,
    NotFound,
    PermissionDenied,
    RegistryError,
    alembic_config,
    not_servable,
    upgrade,
    version_row,
)
from registry.endpoints import EndpointInfo, EndpointsMixin
from registry.locks import LocksMixin
from registry.loop import LoopMixin
from registry.models import (
    LOOP_STATES,
    PROMOTION_STATUSES,
    ROLLOUT_STATUSES,
    VERSION_STATUSES,
    Alias,
    AliasHistory,
    Model,
    ModelVersion,
    PipelineRun,
    utcnow,
)
from registry.promotions import PromotionsMixin, evidence_hash
from registry.rollouts import RolloutsMixin
from registry.routes import RoutesMixin
from registry.runs import RunsMixin
from registry.tokens import ROLES, Identity, TokensMixin

__all__ = [
    "LEASE_S",
    "LOOP_STATES",
    "MIGRATIONS",
    "PROMOTION_STATUSES",
    "ROLES",
    "ROLLOUT_STATUSES",
    "VERSION_STATUSES",
    "Conflict",
    "EndpointInfo",
    "Identity",
    "Invalid",
    "NotFound",
    "PermissionDenied",
    "RegistryError",
    "RegistryStore",
    "VersionInfo",
    "alembic_config",
    "evidence_hash",
    "not_servable",
    "upgrade",
]


@dataclass(frozen=True)
class VersionInfo:
    model: str
    version: int
    status: str
    artifact_uri: str
    metrics: dict[str, Any]
    run_id: int | None
    created_at: dt.datetime
    #: its folder is complete and in place (see the module docstring)
    servable: bool = True
    #: file name -> "sha256:HEX" of the version's folder, as published
    artifact_hashes: dict[str, str] = field(default_factory=dict)


def _info(row: ModelVersion) -> VersionInfo:
    return VersionInfo(
        row.model,
        row.version,
        row.status,
        row.artifact_uri,
        dict(row.metrics),
        row.run_id,
        row.created_at,
        bool(row.servable),
        dict(row.artifact_hashes or {}),
    )


class RegistryStore(
    AuditMixin,
    EndpointsMixin,
    TokensMixin,
    RolloutsMixin,
    PromotionsMixin,
    RoutesMixin,
    LocksMixin,
    LoopMixin,
    RunsMixin,
):
    # model versions

    def register_version(
        self,
        model: str,
        artifact_uri: str,
        metrics: dict[str, Any] | None = None,
        run_id: int | None = None,
        actor: str = "pipeline",
        *,
        servable: bool = True,
        artifact_hashes: dict[str, str] | None = None,
    ) -> int:
        """A new version of `model` (created on first use); returns its number. With
        `servable=False` the number is reserved for `run_id`, which writes the folder and
        then calls `publish_version`; if the run dies first, the version is marked failed."""
        if not servable and run_id is None:
            raise RegistryError("an unpublished version needs the run that will publish it")

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
                    servable=servable,
                    artifact_hashes=dict(artifact_hashes or {}),
                )
            )
            self._audit(
                session,
                actor=actor,
                action="register",
                subject=f"{model}/{version}",
                detail={"artifact_uri": artifact_uri, "run_id": run_id, "servable": servable},
            )
            return version

        return self._retry(work)

    def version(self, model: str, version: int) -> VersionInfo:
        with self._session() as session:
            return _info(version_row(session, model, version))

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

    def publish_version(
        self,
        model: str,
        version: int,
        artifact_uri: str,
        artifact_hashes: dict[str, str],
        actor: str = "pipeline",
    ) -> None:
        """Make a reserved version servable: its folder is complete, fsynced and in place.
        URI, hashes and the flag are set in one transaction; a version that was marked
        failed (its run was found dead) cannot be published."""

        def work(session: Session) -> None:
            row = version_row(session, model, version, lock=True)
            if row.status == "failed":
                raise RegistryError(f"model '{model}' version {version} was marked failed")
            if row.run_id is not None:
                run = session.get(PipelineRun, row.run_id)
                if run is not None and run.status != "running":
                    raise RegistryError(f"pipeline run {row.run_id} is no longer running")
            row.artifact_uri, row.artifact_hashes = artifact_uri, dict(artifact_hashes)
            row.servable = True
            self._audit(
                session,
                actor=actor,
                action="publish",
                subject=f"{model}/{version}",
                detail={"artifact_uri": artifact_uri, "artifact_hashes": artifact_hashes},
            )

        self._retry(work)

    def set_status(self, model: str, version: int, status: str, actor: str) -> None:
        if status not in VERSION_STATUSES:
            raise RegistryError(f"unknown status {status!r} (known: {', '.join(VERSION_STATUSES)})")

        def work(session: Session) -> None:
            row = version_row(session, model, version, lock=True)
            if not row.servable and status not in ("failed", "rejected", "archived"):
                raise RegistryError(not_servable(row))
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
            target = version_row(session, model, version)  # NotFound if there is none
            if not target.servable:
                raise RegistryError(not_servable(target))
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

    def aliases(self, model: str) -> dict[str, int]:
        with self._session() as session:
            rows = session.execute(select(Alias).where(Alias.model == model)).scalars()
            return {r.alias: r.version for r in rows}
