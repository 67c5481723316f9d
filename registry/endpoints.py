"""Where routed versions are served outside the gateway (part of
`registry.store.RegistryStore`): one `endpoints` row per (model, version) that another
backend serves (a KServe InferenceService), written by the reconciler
(servo.reconcile). A ready endpoint's URL is what `deployments()` gives the gateway for
that version; each change is one transaction and one audit entry whose action is in
`registry.routes.ROUTE_ACTIONS`, so gateways re-read their routes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from registry.base import Invalid, StoreBase, version_row
from registry.models import Endpoint, utcnow

ENDPOINT_SET, ENDPOINT_DELETE = "endpoint_set", "endpoint_delete"
#: the longest detail kept (KServe condition messages can be long)
_DETAIL_MAX = 2000


@dataclass(frozen=True)
class EndpointInfo:
    model: str
    version: int
    backend: str
    name: str
    url: str | None
    ready: bool
    detail: str
    updated_at: Any


def _info(row: Endpoint) -> EndpointInfo:
    return EndpointInfo(
        row.model, row.version, row.backend, row.name, row.url, row.ready, row.detail,
        row.updated_at,
    )  # fmt: skip


class EndpointsMixin(StoreBase):
    def set_endpoint(
        self,
        model: str,
        version: int,
        *,
        backend: str,
        name: str,
        url: str | None,
        ready: bool,
        detail: str = "",
        actor: str = "reconciler",
    ) -> bool:
        """Record how `model` `version` is served by `backend` now. Nothing is written
        when the row already says so (False); a change is one transaction with its audit
        entry (True). A ready endpoint needs a URL."""
        if ready and not url:
            raise Invalid(f"model '{model}' version {version}: a ready endpoint needs a url")
        if not backend or not name:
            raise Invalid("an endpoint needs its backend and its object name")
        detail = detail[:_DETAIL_MAX]

        def work(session: Session) -> bool:
            version_row(session, model, version)
            row = session.get(Endpoint, (model, version), with_for_update=True)
            now = (backend, name, url, ready, detail)
            if row is not None and (row.backend, row.name, row.url, row.ready, row.detail) == now:
                return False
            before = None if row is None else _doc(row)
            if row is None:
                row = Endpoint(model=model, version=version)
                session.add(row)
            row.backend, row.name, row.url, row.ready, row.detail = now
            row.updated_at = utcnow()
            self._audit(
                session,
                actor=actor,
                action=ENDPOINT_SET,
                subject=model,
                detail={"version": version, **_doc(row)},
                rollback={"endpoint": before},
            )
            return True

        return self._retry(work)

    def endpoints(self, model: str | None = None) -> list[EndpointInfo]:
        """The endpoints (of `model`), by model and version."""
        with self._session() as session:
            query = select(Endpoint).order_by(Endpoint.model, Endpoint.version)
            if model is not None:
                query = query.where(Endpoint.model == model)
            return [_info(row) for row in session.execute(query).scalars()]

    def delete_endpoint(
        self, model: str, version: int, actor: str = "reconciler", reason: str = ""
    ) -> bool:
        """Forget `model` `version`'s endpoint (its backend object is gone); False when
        there was none."""

        def work(session: Session) -> bool:
            row = session.get(Endpoint, (model, version), with_for_update=True)
            if row is None:
                return False
            before = _doc(row)
            session.delete(row)
            self._audit(
                session,
                actor=actor,
                action=ENDPOINT_DELETE,
                subject=model,
                detail={"version": version, "reason": reason},
                rollback={"endpoint": before},
            )
            return True

        return self._retry(work)


def _doc(row: Endpoint) -> dict[str, Any]:
    return {"backend": row.backend, "name": row.name, "url": row.url, "ready": row.ready,
            "detail": row.detail}  # fmt: skip
