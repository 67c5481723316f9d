"""The audit log's readers, and refused attempts (part of `registry.store.RegistryStore`).

Every change the store makes is audited in the same transaction (`StoreBase._audit`).
`audit_attempt` records what was refused: a wrong role, a self-approval, a double
approval; the admin API and the CLI call it with what the caller tried.
"""

from __future__ import annotations

import math
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from registry.base import StoreBase
from registry.models import AuditEntry

#: the audit action of every refused attempt (what was tried is in detail["action"])
ATTEMPT = "attempt"
#: bounds on what an attempt stores of the caller's input (a 1 MB reason is cut)
_MAX_TEXT = 512
_MAX_ITEMS = 32


def audit_doc(row: AuditEntry) -> dict[str, Any]:
    return {
        "id": row.id,
        "at": row.at,
        "actor": row.actor,
        "action": row.action,
        "subject": row.subject,
        "detail": row.detail,
        "rollback": row.rollback,
    }


def _bounded(value: Any, depth: int = 0) -> Any:
    """`value` with long strings cut and big or deep containers trimmed (JSON-able)."""
    if isinstance(value, str):
        return value if len(value) <= _MAX_TEXT else f"{value[:_MAX_TEXT]}... ({len(value)} chars)"
    if isinstance(value, bool | int) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if depth >= 3:
        return _bounded(repr(value))
    if isinstance(value, dict):
        items = list(value.items())[:_MAX_ITEMS]
        return {str(k)[:_MAX_TEXT]: _bounded(v, depth + 1) for k, v in items}
    if isinstance(value, list | tuple):
        return [_bounded(v, depth + 1) for v in list(value)[:_MAX_ITEMS]]
    return _bounded(repr(value))


class AuditMixin(StoreBase):
    def audit(
        self,
        limit: int | None = None,
        since_id: int | None = None,
        subject: str | None = None,
        action: str | None = None,
    ) -> list[dict[str, Any]]:
        """Audit entries, oldest first. `since_id`: only those after that id (then `limit`
        pages forward: the first `limit` of them); without it, `limit` keeps the newest.
        `subject`, `action`: exact matches."""
        with self._session() as session:
            query = select(AuditEntry)
            if since_id is not None:
                query = query.where(AuditEntry.id > since_id)
            if subject is not None:
                query = query.where(AuditEntry.subject == subject)
            if action is not None:
                query = query.where(AuditEntry.action == action)
            if limit is None:
                rows = list(session.execute(query.order_by(AuditEntry.id)).scalars())
            elif since_id is not None:
                rows = list(session.execute(query.order_by(AuditEntry.id).limit(limit)).scalars())
            else:
                newest = query.order_by(AuditEntry.id.desc()).limit(limit)
                rows = list(reversed(list(session.execute(newest).scalars())))
            return [audit_doc(r) for r in rows]

    def audit_attempt(self, actor: str, action: str, subject: str, detail: dict[str, Any]) -> None:
        """A denied or failed attempt to act: stored as action "attempt" with what was tried
        in detail["action"] and the rest of `detail` (strings cut at 512 characters), so
        `audit(action="attempt")` lists every refusal. A `detail["request"]` id links it to
        that promotion request's audit."""
        record = {**_bounded(dict(detail)), "action": _bounded(action)}

        def work(session: Session) -> None:
            self._audit(
                session, actor=actor[:128], action=ATTEMPT, subject=subject[:256], detail=record
            )

        self._retry(work)
