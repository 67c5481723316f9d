"""The route table the gateway reads (deployments), and the loop's changes to it (part of
`registry.store.RegistryStore`): a candidate in shadow, its promotion to champion, a
rollback. Each change is one transaction and one audit entry whose `rollback` holds the
previous deployments (and the version statuses and champion alias it changed)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from registry.base import (
    Conflict,
    Invalid,
    NotFound,
    RegistryError,
    StoreBase,
    check_reason,
    not_servable,
    version_row,
)
from registry.endpoints import ENDPOINT_DELETE, ENDPOINT_SET
from registry.models import (
    VERSION_STATUSES,
    Alias,
    AliasHistory,
    AuditEntry,
    Deployment,
    Endpoint,
    ModelVersion,
    PromotionRequest,
    Rollout,
    utcnow,
)

#: the audit actions that change deployments (the gateway reloads after each); the canary
#: ones are registry.rollouts', the endpoint ones registry.endpoints'
ROUTE_ACTIONS = (
    "deploy", "shadow_add", "shadow_remove", "promote", "rollback",
    "canary_start", "canary_step", "canary_promote", "canary_rollback", "canary_fail",
    ENDPOINT_SET, ENDPOINT_DELETE,
)  # fmt: skip
Row = tuple[int, str, float]


def _rows(session: Session, model: str) -> list[Row]:
    found = session.execute(
        select(Deployment).where(Deployment.model == model).order_by(Deployment.version)
    ).scalars()
    return [(d.version, d.role, d.percent) for d in found]


def _replace(session: Session, model: str, rows: list[Row]) -> None:
    session.execute(delete(Deployment).where(Deployment.model == model))
    for version, role, percent in rows:
        session.add(
            Deployment(
                model=model, version=version, role=role, percent=percent, updated_at=utcnow()
            )
        )


def _champion(model: str, rows: list[Row]) -> int:
    for version, role, _ in rows:
        if role == "champion":
            return version
    raise Conflict(f"model '{model}' has no champion deployed (deploy one first)")


def refuse_while_rolling_out(session: Session, model: str, what: str) -> None:
    """Conflict naming the rollout when `model` has one running: the route table is the
    rollout's until it ends."""
    running = session.execute(
        select(Rollout.id, Rollout.version)
        .where(Rollout.model == model, Rollout.status == "running")
        .limit(1)
    ).first()
    if running is not None:
        raise Conflict(
            f"model '{model}' has rollout {running.id} of version {running.version} running: "
            f"{what} is refused until it ends (`servo rollouts rollback {running.id}` ends it)"
        )


def _servable(session: Session, model: str, version: int) -> ModelVersion:
    row = version_row(session, model, version, lock=True)
    if not row.servable:
        raise Conflict(not_servable(row))
    return row


class RoutesMixin(StoreBase):
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
            refuse_while_rolling_out(session, model, "setting its deployments")
            for version, _, _ in rows:
                row = version_row(session, model, version)
                if not row.servable:
                    raise RegistryError(not_servable(row))
            previous = [list(r) for r in _rows(session, model)]
            _replace(session, model, rows)
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
        """Every model's deployments with each version's artifact URI, whether it is
        servable (a deployment made before versions had the flag may point at one that is
        not: the gateway skips it) and `url`: where another backend serves it once its
        endpoint is ready (registry.endpoints), else None (the gateway loads the folder)."""
        with self._session() as session:
            rows = session.execute(
                select(Deployment, ModelVersion.artifact_uri, ModelVersion.servable, Endpoint.url)
                .join(
                    ModelVersion,
                    (ModelVersion.model == Deployment.model)
                    & (ModelVersion.version == Deployment.version),
                )
                .outerjoin(
                    Endpoint,
                    (Endpoint.model == Deployment.model)
                    & (Endpoint.version == Deployment.version)
                    & Endpoint.ready,
                )
                .order_by(Deployment.model, Deployment.version)
            ).all()
            out: dict[str, list[dict[str, Any]]] = {}
            for deployment, uri, servable, url in rows:
                out.setdefault(deployment.model, []).append(
                    {
                        "version": deployment.version,
                        "role": deployment.role,
                        "percent": deployment.percent,
                        "artifact_uri": uri,
                        "servable": bool(servable),
                        "url": url,
                    }
                )
            return out

    def deployments_revision(self) -> int:
        """Changes whenever any deployment or endpoint changes (the last such change's
        audit id)."""
        with self._session() as session:
            last = session.execute(
                select(AuditEntry.id)
                .where(AuditEntry.action.in_(ROUTE_ACTIONS))
                .order_by(AuditEntry.id.desc())
                .limit(1)
            ).scalar_one_or_none()
            return int(last or 0)

    # the loop's route changes

    def add_shadow(self, model: str, version: int, actor: str, reason: str = "") -> None:
        """Deploy `version` in shadow (a copy of the traffic, never answering) next to the
        champion and canary rows; its status becomes "shadow". Already a shadow: nothing
        changes. Conflict: no champion, the version has another role, or is not servable."""
        check_reason(reason)

        def work(session: Session) -> None:
            self._locked_model(session, model)
            refuse_while_rolling_out(session, model, f"a shadow of version {version}")
            target = _servable(session, model, version)
            rows = _rows(session, model)
            _champion(model, rows)
            role = next((r for v, r, _ in rows if v == version), None)
            if role == "shadow":
                return
            if role is not None:
                raise Conflict(f"model '{model}' version {version} is already the {role}")
            _replace(session, model, [*rows, (version, "shadow", 100.0)])
            old_status, target.status = target.status, "shadow"
            self._route_audit(
                session,
                model,
                actor=actor,
                action="shadow_add",
                previous=rows,
                detail={"version": version, "reason": reason},
                statuses={str(version): old_status},
            )

        self._retry(work)

    def remove_shadow(
        self, model: str, version: int, actor: str, reason: str = "", status: str = "rejected"
    ) -> None:
        """Stop shadowing `version`; its status becomes `status` (rejected by default).
        Conflict: it is not a shadow of the model."""
        check_reason(reason)
        if status not in VERSION_STATUSES:
            raise Invalid(f"unknown status {status!r} (known: {', '.join(VERSION_STATUSES)})")

        def work(session: Session) -> None:
            self._locked_model(session, model)
            target = version_row(session, model, version, lock=True)
            rows = _rows(session, model)
            if (version, "shadow") not in [(v, r) for v, r, _ in rows]:
                raise Conflict(f"model '{model}' version {version} is not deployed in shadow")
            _replace(session, model, [r for r in rows if r[0] != version])
            old_status, target.status = target.status, status
            self._route_audit(
                session,
                model,
                actor=actor,
                action="shadow_remove",
                previous=rows,
                detail={"version": version, "reason": reason, "status": status},
                statuses={str(version): old_status},
            )

        self._retry(work)

    def promote(
        self, model: str, version: int, actor: str, reason: str = "", request_id: int | None = None
    ) -> int:
        """Make `version` the champion in one transaction: deployments become the champion
        plus the shadows of other versions (its own shadow row and any canary go), the old
        champion is archived, `version` is in production, the alias "champion" moves.
        With `request_id`: the approved request of this version it carries out (Conflict
        otherwise). Returns the old champion's version."""
        check_reason(reason)

        def work(session: Session) -> int:
            self._locked_model(session, model)
            refuse_while_rolling_out(session, model, f"a promotion of version {version}")
            if request_id is not None:
                request = session.get(PromotionRequest, request_id)
                if request is None:
                    raise NotFound(f"no promotion request {request_id}")
                if (request.model, request.version) != (model, version):
                    raise Conflict(
                        f"promotion request {request_id} is for {request.model}/"
                        f"{request.version}, not {model}/{version}"
                    )
                if request.status != "approved":
                    raise Conflict(
                        f"promotion request {request_id} is {request.status}, not approved"
                    )
            detail = {"reason": reason, "request": request_id}
            return self._swap(session, model, version, actor=actor, action="promote", detail=detail)

        return self._retry(work)

    def rollback(self, model: str, actor: str, reason: str = "", to: int | None = None) -> int:
        """Make the previous champion (the alias history's, or `to`) the champion again,
        the same swap as `promote` (the version rolled back from is archived). Returns the
        new champion. Conflict: no previous champion, or it is not servable. While a canary
        rollout of the model runs, it rolls that rollout back instead (registry.rollouts):
        the champion stays, the canary goes."""
        check_reason(reason)
        return self._retry(lambda session: self._rollback_in(session, model, actor, reason, to))

    def _rollback_in(
        self, session: Session, model: str, actor: str, reason: str, to: int | None
    ) -> int:
        self._locked_model(session, model)
        current = _champion(model, _rows(session, model))
        target = to
        if target is None:
            target = session.execute(
                select(AliasHistory.old_version)
                .where(
                    AliasHistory.model == model,
                    AliasHistory.alias == "champion",
                    AliasHistory.new_version == current,
                )
                .order_by(AliasHistory.id.desc())
                .limit(1)
            ).scalar_one_or_none()
            if target is None:
                raise Conflict(
                    f"model '{model}' has no previous champion in its alias history to roll "
                    f"back to from version {current}: name the version to roll back to"
                )
        detail = {"reason": reason, "to": to}
        self._swap(session, model, target, actor=actor, action="rollback", detail=detail)
        return target

    def _swap(
        self,
        session: Session,
        model: str,
        version: int,
        *,
        actor: str,
        action: str,
        detail: dict[str, Any],
    ) -> int:
        self._locked_model(session, model)
        target = _servable(session, model, version)
        rows = _rows(session, model)
        old = _champion(model, rows)
        if old == version:
            raise Conflict(f"model '{model}' version {version} is already the champion")
        kept = [r for r in rows if r[1] in ("shadow", "other") and r[0] != version]
        _replace(session, model, [(version, "champion", 100.0), *kept])
        statuses: dict[str, str] = {}
        for number, role, _ in rows:
            if number != version and role in {"champion", "canary"}:
                row = version_row(session, model, number, lock=True)
                statuses[str(number)], row.status = row.status, "archived"
        statuses[str(version)], target.status = target.status, "production"
        alias = session.get(Alias, (model, "champion"))
        was = alias.version if alias is not None else None
        now = utcnow()
        if alias is None:
            session.add(
                Alias(
                    model=model, alias="champion", version=version, updated_by=actor, updated_at=now
                )
            )
        else:
            alias.version, alias.updated_by, alias.updated_at = version, actor, now
        session.add(
            AliasHistory(
                model=model,
                alias="champion",
                old_version=was,
                new_version=version,
                actor=actor,
                reason=detail["reason"],
                at=now,
            )
        )
        self._route_audit(
            session,
            model,
            actor=actor,
            action=action,
            previous=rows,
            detail={**detail, "from": old, "version": version},
            statuses=statuses,
            alias={"alias": "champion", "version": was},
        )
        return old

    def _route_audit(
        self,
        session: Session,
        model: str,
        *,
        actor: str,
        action: str,
        previous: list[Row],
        detail: dict[str, Any],
        statuses: dict[str, str],
        alias: dict[str, Any] | None = None,
    ) -> None:
        rollback: dict[str, Any] = {
            "deployments": [list(r) for r in previous],
            "statuses": statuses,
        }
        if alias is not None:
            rollback["alias"] = alias
        now_rows = [list(r) for r in _rows(session, model)]
        self._audit(
            session,
            actor=actor,
            action=action,
            subject=model,
            detail={**detail, "deployments": now_rows},
            rollback=rollback,
        )
