"""One pipeline per model across processes and machines (part of
`registry.store.RegistryStore`): a lease row per model, not a process-local lock.

`lock_model` takes the row if it is free, if the caller already holds it (same owner), or
if its holder is dead (registry.lease: a process of this machine that is gone, or a
heartbeat older than `lease_s` from elsewhere); the holder renews it with
`heartbeat_model_lock` and gives it back with `unlock_model`. Taking it is one
transaction on the row (SQLite: BEGIN IMMEDIATE; PostgreSQL: SELECT ... FOR UPDATE, or the
primary key refusing a second insert, then retried), so of two callers exactly one wins.
An owner is a name unique to the holding process (e.g. "servo-up:HOST:PID").
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from registry.base import Invalid, StoreBase, aware
from registry.lease import Lease, current, dead
from registry.models import ModelLock, utcnow

log = logging.getLogger("servo.registry")


def _check(value: str, what: str, longest: int) -> str:
    if not isinstance(value, str) or not value or len(value) > longest:
        raise Invalid(f"a lock's {what} must be 1 to {longest} characters, got {value!r}")
    return value


def _lock_doc(row: ModelLock) -> dict[str, Any]:
    return {
        "model": row.model,
        "owner": row.owner,
        "purpose": row.purpose,
        "host": row.lease_host,
        "pid": row.lease_pid,
        "acquired_at": row.acquired_at,
        "heartbeat_at": row.heartbeat_at,
    }


class LocksMixin(StoreBase):
    def lock_model(self, model: str, owner: str, purpose: str = "retrain") -> bool:
        """Take `model`'s lock for `owner`; False if a live holder has it."""
        _check(model, "model", 128)
        _check(owner, "owner", 255)
        _check(purpose, "purpose", 64)
        lease = current()

        def work(session: Session) -> bool:
            now = utcnow()
            row = session.execute(
                select(ModelLock).where(ModelLock.model == model).with_for_update()
            ).scalar_one_or_none()
            if row is None:
                session.add(
                    ModelLock(
                        model=model,
                        owner=owner,
                        purpose=purpose,
                        lease_host=lease.host,
                        lease_pid=lease.pid,
                        lease_process=lease.process,
                        acquired_at=now,
                        heartbeat_at=now,
                    )
                )
                session.flush()  # a concurrent insert fails here -> retried -> sees this row
                return True
            if row.owner != owner:
                held = Lease(row.lease_host, row.lease_pid, row.lease_process)
                why = dead(held, (now - aware(row.heartbeat_at)).total_seconds(), self.lease_s)
                if why is None:
                    return False
                log.warning(
                    "model %s: lock of %s (%s) taken over by %s: %s",
                    model,
                    row.owner,
                    row.purpose,
                    owner,
                    why,
                )
                self._audit(
                    session,
                    actor=owner,
                    action="lock_taken_over",
                    subject=model,
                    detail={"from": row.owner, "purpose": purpose, "reason": why},
                )
                row.acquired_at = now
            row.owner, row.purpose, row.heartbeat_at = owner, purpose, now
            row.lease_host, row.lease_pid, row.lease_process = lease.host, lease.pid, lease.process
            return True

        return self._retry(work)

    def heartbeat_model_lock(self, model: str, owner: str) -> bool:
        """Renew `owner`'s lock on `model`; False if it does not hold it (any more)."""

        def work(session: Session) -> bool:
            done = session.execute(
                update(ModelLock)
                .where(ModelLock.model == model, ModelLock.owner == owner)
                .values(heartbeat_at=utcnow())
            )
            return bool(getattr(done, "rowcount", 0))

        return self._retry(work)

    def unlock_model(self, model: str, owner: str) -> None:
        """Give `model`'s lock back (nothing happens if `owner` does not hold it)."""
        self._retry(
            lambda session: session.execute(
                delete(ModelLock).where(ModelLock.model == model, ModelLock.owner == owner)
            )
        )

    def model_lock(self, model: str) -> dict[str, Any] | None:
        """Who holds `model`'s lock (possibly a dead holder not taken over yet), or None."""
        with self._session() as session:
            row = session.get(ModelLock, model)
            return None if row is None else _lock_doc(row)
