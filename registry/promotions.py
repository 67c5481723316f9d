"""Promotion requests: an append-only request with its evidence, then one decision by an
approver (part of `registry.store.RegistryStore`)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from registry.base import NotFound, PermissionDenied, RegistryError, StoreBase, version_row
from registry.models import Decision, PromotionRequest, utcnow


class PromotionsMixin(StoreBase):
    # promotion requests: evidence, then one decision

    def file_promotion(self, model: str, version: int, evidence: dict[str, Any], actor: str) -> int:
        """An append-only request to promote `version`, with its evidence document."""

        def work(session: Session) -> int:
            version_row(session, model, version)
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
