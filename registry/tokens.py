"""Bearer tokens and their roles (part of `registry.store.RegistryStore`).

A token is "servo_" and 32 random bytes (URL-safe base64), shown once when it is created;
the registry keeps only its sha256 (hex), looked up through a unique index and compared
in constant time. Names follow `TOKEN_NAME` and are unique among active tokens (a revoked
token's name may be given again). Every role may read; see `ROLES`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from registry.base import Conflict, Invalid, NotFound, StoreBase, aware
from registry.models import ApiToken, utcnow

#: viewer reads; labeler also sends feedback; operator retrains, rolls back and pauses the
#: loop; approver approves and rejects promotion requests. Every role has viewer rights.
ROLES = ("viewer", "labeler", "operator", "approver")
TOKEN_PREFIX = "servo_"
TOKEN_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
#: a well-formed token: the prefix and URL-safe base64 (a generous bound on its length)
_TOKEN = re.compile(re.escape(TOKEN_PREFIX) + r"[A-Za-z0-9_-]{16,128}")
#: last_used_at is written at most this often per token (no write per request)
LAST_USED_EVERY_S = 60.0


@dataclass(frozen=True)
class Identity:
    """Who a token is."""

    name: str
    role: str

    @property
    def roles(self) -> frozenset[str]:
        return frozenset({"viewer", self.role})


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def check_token_name(name: str) -> str:
    if not isinstance(name, str) or TOKEN_NAME.fullmatch(name) is None:
        raise Invalid(
            f"invalid token name {name!r}: 1 to 64 of a-z 0-9 . _ - starting with a letter or digit"
        )
    return name


def check_role(role: str) -> str:
    if role not in ROLES:
        raise Invalid(f"unknown role {role!r} (known: {', '.join(ROLES)})")
    return role


def _token_doc(row: ApiToken) -> dict[str, Any]:
    return {
        "name": row.name,
        "role": row.role,
        "created_at": row.created_at,
        "created_by": row.created_by,
        "revoked_at": row.revoked_at,
        "last_used_at": row.last_used_at,
    }


class TokensMixin(StoreBase):
    def create_token(self, name: str, role: str, actor: str) -> str:
        """A new token for `name` with `role`; returns it (the only time it is seen).
        Invalid: a bad name or an unknown role; Conflict: an active token has the name."""
        check_token_name(name)
        check_role(role)
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)

        def work(session: Session) -> None:
            taken = session.execute(
                select(ApiToken.id).where(ApiToken.active_name == name)
            ).scalar_one_or_none()
            if taken is not None:
                raise Conflict(f"an active token is already named {name!r} (revoke it first)")
            session.add(
                ApiToken(
                    name=name,
                    active_name=name,
                    role=role,
                    token_hash=token_digest(token),
                    created_at=utcnow(),
                    created_by=actor,
                )
            )
            session.flush()  # a concurrent create of the name fails here -> retried -> Conflict
            self._audit(
                session,
                actor=actor,
                action="token_created",
                subject=f"token:{name}",
                detail={"name": name, "role": role},
            )

        self._retry(work)
        return token

    def tokens(self) -> list[dict[str, Any]]:
        """Every token ever created (revoked ones too), oldest first; never a hash."""
        with self._session() as session:
            rows = session.execute(select(ApiToken).order_by(ApiToken.id)).scalars()
            return [_token_doc(r) for r in rows]

    def revoke_token(self, name: str, actor: str) -> None:
        """Revoke the active token named `name`; NotFound if there is none."""

        def work(session: Session) -> None:
            row = session.execute(
                select(ApiToken).where(ApiToken.active_name == name).with_for_update()
            ).scalar_one_or_none()
            if row is None:
                raise NotFound(f"no active token named {name!r}")
            row.active_name, row.revoked_at, row.revoked_by = None, utcnow(), actor
            self._audit(
                session,
                actor=actor,
                action="token_revoked",
                subject=f"token:{name}",
                detail={"name": name, "role": row.role},
            )

        self._retry(work)

    def has_tokens(self) -> bool:
        """Whether any token is active (then the admin API and feedback need one)."""
        with self._session() as session:
            found = session.execute(
                select(ApiToken.id).where(ApiToken.active_name.is_not(None)).limit(1)
            ).scalar_one_or_none()
            return found is not None

    def authenticate(self, token: str) -> Identity | None:
        """The identity of an active token; None for an unknown, revoked or malformed one."""
        if not isinstance(token, str) or _TOKEN.fullmatch(token) is None:
            return None
        digest = token_digest(token)
        with self._session() as session:
            row = session.execute(
                select(ApiToken).where(ApiToken.token_hash == digest)
            ).scalar_one_or_none()
        if row is None or row.active_name is None:
            return None
        if not hmac.compare_digest(row.token_hash, digest):
            return None
        now = utcnow()
        last = row.last_used_at
        if last is None or (now - aware(last)).total_seconds() >= LAST_USED_EVERY_S:
            self._retry(_touch(row.id, now))
        return Identity(row.name, row.role)


def _touch(token_id: int, now: dt.datetime) -> Callable[[Session], None]:
    def work(session: Session) -> None:
        before = now - dt.timedelta(seconds=LAST_USED_EVERY_S)
        session.execute(
            update(ApiToken)
            .where(ApiToken.id == token_id)
            .where((ApiToken.last_used_at.is_(None)) | (ApiToken.last_used_at < before))
            .values(last_used_at=now)
        )

    return work
