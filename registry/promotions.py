"""Promotion requests (part of `registry.store.RegistryStore`): a request with its
evidence, hashed when it is filed; one decision (an approver's, or the gates'); then the
rollout's outcome.

    pending ─decide/auto_decide─▶ approved ─finish_promotion─▶ promoted | failed | rolled_back
       │                            (a rollout runs: one per model at a time; a canary
       │                             rollout, registry.rollouts, ends the request itself)
       ├─▶ rejected   (decided so)
       ├─▶ expired    (not decided before expires_at)
       └─▶ void       (the stored evidence no longer matches its hash)

`evidence_hash` is THE canonical hash of an evidence document: an approval binds to it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Collection
from typing import Any

from sqlalchemy import case, select
from sqlalchemy.orm import Session

from registry.audit import audit_doc
from registry.base import (
    Conflict,
    Invalid,
    NotFound,
    PermissionDenied,
    RegistryError,
    StoreBase,
    aware,
    canonical_json,
    check_reason,
    json_object,
    version_row,
)
from registry.models import AuditEntry, Decision, PromotionRequest, Rollout, utcnow

DEFAULT_EXPIRES_S = 7 * 86400
#: the statuses finish_promotion sets, and those each may follow
_FINISH_FROM = {
    "promoted": ("approved",),
    "failed": ("approved",),
    "rolled_back": ("approved", "promoted"),
}


def evidence_hash(doc: dict[str, Any]) -> str:
    """sha256 (hex) of the canonical JSON of `doc`: sorted keys, no spaces, UTF-8, no NaN
    or infinity (ValueError), the one hash every part of Servo uses for evidence."""
    return hashlib.sha256(canonical_json(doc).encode()).hexdigest()


def _canonical_evidence(evidence: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The evidence as it will read back from the database, and its hash."""
    doc = json_object(evidence, "evidence")
    return doc, evidence_hash(doc)


def _decision_doc(row: Decision | None) -> dict[str, Any] | None:
    if row is None:
        return None
    return {"decision": row.decision, "actor": row.actor, "reason": row.reason, "at": row.at}


def _request_doc(row: PromotionRequest, decision: Decision | None) -> dict[str, Any]:
    return {
        "id": row.id,
        "model": row.model,
        "version": row.version,
        "status": row.status,
        "status_reason": row.status_reason,
        "evidence": row.evidence,
        "evidence_hash": row.evidence_hash,
        "run_id": row.run_id,
        "triggered_by": row.triggered_by,
        "created_at": row.created_at,
        "updated_at": row.updated_at,
        "expires_at": row.expires_at,
        "decision": _decision_doc(decision),
    }


def _locked_request(session: Session, request_id: int) -> PromotionRequest:
    request = session.execute(
        select(PromotionRequest).where(PromotionRequest.id == request_id).with_for_update()
    ).scalar_one_or_none()
    if request is None:
        raise NotFound(f"no promotion request {request_id}")
    return request


class PromotionsMixin(StoreBase):
    def file_promotion(
        self,
        model: str,
        version: int,
        evidence: dict[str, Any],
        actor: str,
        *,
        run_id: int | None = None,
        triggered_by: str | None = None,
        expires_s: float = DEFAULT_EXPIRES_S,
    ) -> int:
        """A pending request to promote `version`, with its evidence (stored as canonical
        JSON and hashed); it expires after `expires_s`. Returns its id."""
        doc, digest = _canonical_evidence(evidence)
        if not expires_s > 0:
            raise Invalid(f"expires_s must be > 0, got {expires_s}")

        def work(session: Session) -> int:
            version_row(session, model, version)
            now = utcnow()
            request = PromotionRequest(
                model=model,
                version=version,
                evidence=doc,
                evidence_hash=digest,
                status="pending",
                run_id=run_id,
                triggered_by=triggered_by,
                created_at=now,
                updated_at=now,
                expires_at=now + dt.timedelta(seconds=expires_s),
                status_reason="",
            )
            session.add(request)
            session.flush()
            self._audit(
                session,
                actor=actor,
                action="promotion_filed",
                subject=f"{model}/{version}",
                detail={
                    "request": request.id,
                    "evidence_hash": digest,
                    "run_id": run_id,
                    "triggered_by": triggered_by,
                },
            )
            return request.id

        return self._retry(work)

    def promotion(self, request_id: int) -> dict[str, Any]:
        """One request with its decision and its audit entries (those naming it)."""
        with self._session() as session:
            row = session.get(PromotionRequest, request_id)
            if row is None:
                raise NotFound(f"no promotion request {request_id}")
            decision = session.execute(
                select(Decision)
                .where(Decision.request_id == request_id)
                .order_by(Decision.id.desc())
                .limit(1)
            ).scalar_one_or_none()
            audit = session.execute(
                select(AuditEntry)
                .where(AuditEntry.request_id == request_id)
                .order_by(AuditEntry.id)
            ).scalars()
            return {**_request_doc(row, decision), "audit": [audit_doc(a) for a in audit]}

    def promotions(
        self, model: str | None = None, status: str | None = None
    ) -> list[dict[str, Any]]:
        """Requests (with evidence and decision, without audit): pending first, then the
        newest first."""
        with self._session() as session:
            pending_first = case((PromotionRequest.status == "pending", 0), else_=1)
            query = select(PromotionRequest).order_by(pending_first, PromotionRequest.id.desc())
            if model is not None:
                query = query.where(PromotionRequest.model == model)
            if status is not None:
                query = query.where(PromotionRequest.status == status)
            requests = list(session.execute(query).scalars())
            decisions = {
                d.request_id: d
                for d in session.execute(
                    select(Decision)
                    .where(Decision.request_id.in_([r.id for r in requests]))
                    .order_by(Decision.id)
                ).scalars()
            }
            return [_request_doc(r, decisions.get(r.id)) for r in requests]

    def decide(
        self,
        request_id: int,
        decision: str,
        actor: str,
        roles: Collection[str],
        reason: str = "",
        *,
        evidence_hash: str | None = None,
        separation_of_duties: bool = True,
    ) -> dict[str, Any]:
        """An approver's decision on a pending request; returns the updated request.

        Refused (nothing changes, except where said): Invalid (not approved/rejected, a
        reason over 4096 characters); PermissionDenied (no approver role; with
        `separation_of_duties`, the actor triggered the candidate's run); NotFound;
        Conflict: not pending, expired (then marked expired), the evidence no longer
        matches its hash (then marked void), `evidence_hash` is not the stored one (the
        approver saw other evidence), or an approval while another request of the model
        is approved (its rollout runs). The caller audits refusals (audit_attempt)."""
        _check_decision(decision, reason)
        if "approver" not in roles:
            raise PermissionDenied(f"{actor} may not decide promotions (needs role approver)")
        sod = actor if separation_of_duties else None
        return self._decide(
            request_id, decision, actor, reason, seen_hash=evidence_hash, sod_actor=sod
        )

    def auto_decide(
        self, request_id: int, decision: str, reason: str, actor: str = "gates"
    ) -> dict[str, Any]:
        """The gates' or the policy's decision: the state checks of `decide`, no role."""
        _check_decision(decision, reason)
        return self._decide(request_id, decision, actor, reason, seen_hash=None, sod_actor=None)

    def _decide(
        self,
        request_id: int,
        decision: str,
        actor: str,
        reason: str,
        *,
        seen_hash: str | None,
        sod_actor: str | None,
    ) -> dict[str, Any]:
        def work(session: Session) -> RegistryError | None:
            model = session.execute(
                select(PromotionRequest.model).where(PromotionRequest.id == request_id)
            ).scalar_one_or_none()
            if model is None:
                raise NotFound(f"no promotion request {request_id}")
            self._locked_model(session, model)  # one decision per model at a time
            request = _locked_request(session, request_id)
            if request.status != "pending":
                raise Conflict(f"promotion request {request_id} is already {request.status}")
            now = utcnow()
            if now > aware(request.expires_at):
                why = f"expired at {aware(request.expires_at).isoformat()}, before a decision"
                self._set_status(session, request, "expired", why, actor="registry")
                return Conflict(f"promotion request {request_id} {why}")
            if evidence_hash(request.evidence) != request.evidence_hash:
                why = "its evidence changed after it was filed (the hash no longer matches)"
                self._set_status(session, request, "void", why, actor="registry")
                return Conflict(f"promotion request {request_id} is void: {why}")
            if seen_hash is not None and seen_hash != request.evidence_hash:
                raise Conflict(
                    f"promotion request {request_id} has evidence {request.evidence_hash}, "
                    f"not the {seen_hash} you saw: read it again before deciding"
                )
            if sod_actor is not None and request.triggered_by == sod_actor:
                raise PermissionDenied(
                    f"{sod_actor} triggered the run of this candidate and may not decide its "
                    "promotion (separation of duties)"
                )
            if decision == "approved":
                running = session.execute(
                    select(PromotionRequest.id)
                    .where(
                        PromotionRequest.model == request.model,
                        PromotionRequest.status == "approved",
                        PromotionRequest.id != request_id,
                    )
                    .limit(1)
                ).scalar_one_or_none()
                if running is not None:
                    raise Conflict(
                        f"promotion request {running} of model '{request.model}' is approved and "
                        "its rollout is running: wait for it to finish"
                    )
            session.add(
                Decision(
                    request_id=request_id, decision=decision, actor=actor, reason=reason, at=now
                )
            )
            self._set_status(
                session, request, decision, reason, actor=actor, action=f"promotion_{decision}"
            )
            return None

        refused = self._retry(work)
        if refused is not None:  # a state change committed (expired, void), then refused
            raise refused
        return self.promotion(request_id)

    def finish_promotion(self, request_id: int, status: str, actor: str, reason: str = "") -> None:
        """The outcome of an approved request's rollout: promoted, failed or rolled_back
        (rolled_back also after promoted). Conflict from any other status."""
        if status not in _FINISH_FROM:
            raise Invalid(f"a rollout ends promoted, failed or rolled_back, not {status!r}")
        check_reason(reason)

        def work(session: Session) -> None:
            request = _locked_request(session, request_id)
            rollout = session.execute(
                select(Rollout.id).where(
                    Rollout.request_id == request_id, Rollout.status == "running"
                )
            ).scalar_one_or_none()
            if rollout is not None:
                raise Conflict(
                    f"promotion request {request_id} has rollout {rollout} running: it ends "
                    "the request (promote, roll back or fail the rollout)"
                )
            if request.status not in _FINISH_FROM[status]:
                raise Conflict(
                    f"promotion request {request_id} is {request.status}: it cannot become {status}"
                )
            self._set_status(session, request, status, reason, actor=actor)

        self._retry(work)

    def expire_promotions(self) -> list[int]:
        """Mark expired the pending requests past their expiry; returns their ids."""

        def work(session: Session) -> list[int]:
            now = utcnow()
            rows = session.execute(
                select(PromotionRequest)
                .where(PromotionRequest.status == "pending", PromotionRequest.expires_at < now)
                .order_by(PromotionRequest.id)
                .with_for_update()
            ).scalars()
            expired = []
            for request in rows:
                why = f"expired at {aware(request.expires_at).isoformat()}, before a decision"
                self._set_status(session, request, "expired", why, actor="registry")
                expired.append(request.id)
            return expired

        return self._retry(work)

    def _set_status(
        self,
        session: Session,
        request: PromotionRequest,
        status: str,
        reason: str,
        *,
        actor: str,
        action: str | None = None,
    ) -> None:
        old = request.status
        request.status, request.status_reason, request.updated_at = status, reason, utcnow()
        self._audit(
            session,
            actor=actor,
            action=action or f"promotion_{status}",
            subject=f"{request.model}/{request.version}",
            detail={"request": request.id, "from": old, "to": status, "reason": reason},
        )


def _check_decision(decision: str, reason: str) -> None:
    if decision not in ("approved", "rejected"):
        raise Invalid(f"decision must be approved or rejected, got {decision!r}")
    check_reason(reason)
