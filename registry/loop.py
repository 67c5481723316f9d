"""The loop's state in the registry (part of `registry.store.RegistryStore`): what each
model's loop is doing (and its persisted detail: debounce, cooldown, budget), pauses,
an event log of its decisions, and manual retrain requests queued for a controller.

A restarted controller reads all of it back; two controllers on one registry share it
(a request is claimed by one of them only)."""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from registry.base import Invalid, NotFound, StoreBase, check_reason, json_object
from registry.models import LOOP_STATES, LoopEvent, LoopState, Model, RetrainRequest, utcnow

_KIND = re.compile(r"[a-z][a-z0-9_]{0,31}")


def _utc(at: dt.datetime) -> dt.datetime:
    """A bound in UTC (what the database holds); a naive one is taken as UTC."""
    return at.replace(tzinfo=dt.UTC) if at.tzinfo is None else at.astimezone(dt.UTC)


def _state_doc(row: LoopState) -> dict[str, Any]:
    return {
        "state": row.state,
        "paused": bool(row.paused),
        "detail": row.detail,
        "updated_at": row.updated_at,
    }


def _event_doc(row: LoopEvent) -> dict[str, Any]:
    return {"id": row.id, "model": row.model, "kind": row.kind, "detail": row.detail, "at": row.at}


class LoopMixin(StoreBase):
    # state and pause

    def _loop_row(self, session: Session, model: str) -> LoopState:
        row = session.execute(
            select(LoopState).where(LoopState.model == model).with_for_update()
        ).scalar_one_or_none()
        if row is None:
            row = LoopState(
                model=model, state="watching", paused=False, detail={}, updated_at=utcnow()
            )
            session.add(row)
            session.flush()  # a concurrent insert fails here -> retried
        return row

    def set_loop_state(
        self,
        model: str,
        state: str,
        detail: dict[str, Any] | None = None,
        *,
        only_if: str | None = None,
    ) -> bool:
        """Record what `model`'s loop does now; `detail` replaces the stored detail (None
        keeps it). A pause is separate (pause_loop) and survives state changes. With
        `only_if`, nothing changes unless the stored state is that one (a process that
        does not hold the model's lock must not overwrite the holder's state with what it
        read before); returns whether it was written."""
        if state not in LOOP_STATES:
            raise Invalid(f"unknown loop state {state!r} (known: {', '.join(LOOP_STATES)})")
        doc = None if detail is None else json_object(detail, "a loop state's detail")

        def work(session: Session) -> bool:
            row = self._loop_row(session, model)
            if only_if is not None and row.state != only_if:
                return False
            row.state, row.updated_at = state, utcnow()
            if doc is not None:
                row.detail = doc
            return True

        return self._retry(work)

    def loop_states(self) -> dict[str, dict[str, Any]]:
        """model -> {state, paused, detail, updated_at}."""
        with self._session() as session:
            rows = session.execute(select(LoopState).order_by(LoopState.model)).scalars()
            return {r.model: _state_doc(r) for r in rows}

    def pause_loop(self, model: str, actor: str, reason: str = "") -> None:
        """Pause `model`'s loop (no check alarms, no retrain, no promotion until resumed);
        audited "loop_paused". NotFound: no such model. Already paused: nothing changes."""
        self._set_paused(model, actor, reason, True)

    def resume_loop(self, model: str, actor: str, reason: str = "") -> None:
        """Resume a paused loop; audited "loop_resumed"."""
        self._set_paused(model, actor, reason, False)

    def _set_paused(self, model: str, actor: str, reason: str, paused: bool) -> None:
        check_reason(reason)

        def work(session: Session) -> None:
            _known(session, model)
            row = self._loop_row(session, model)
            if bool(row.paused) == paused:
                return
            row.paused, row.updated_at = paused, utcnow()
            self._audit(
                session,
                actor=actor,
                action="loop_paused" if paused else "loop_resumed",
                subject=model,
                detail={"reason": reason},
            )

        self._retry(work)

    # events

    def record_loop_event(self, model: str, kind: str, detail: dict[str, Any]) -> int:
        """Append an event (check, alarm, retrain_started, ..., skipped); returns its id."""
        if not isinstance(kind, str) or _KIND.fullmatch(kind) is None:
            raise Invalid(f"invalid event kind {kind!r}: 1 to 32 of a-z 0-9 _ from a letter")
        doc = json_object(detail, "an event's detail")

        def work(session: Session) -> int:
            event = LoopEvent(model=model, kind=kind, detail=doc, at=utcnow())
            session.add(event)
            session.flush()
            return event.id

        return self._retry(work)

    def loop_events(
        self,
        model: str,
        kinds: list[str] | None = None,
        since: dt.datetime | None = None,
        limit: int | None = None,
    ) -> list[dict[str, Any]]:
        """`model`'s events (of `kinds`, at or after `since`), newest last; `limit` keeps
        the newest."""
        with self._session() as session:
            query = select(LoopEvent).where(LoopEvent.model == model)
            if kinds is not None:
                query = query.where(LoopEvent.kind.in_(list(kinds)))
            if since is not None:
                query = query.where(LoopEvent.at >= _utc(since))
            query = query.order_by(LoopEvent.id.desc())
            if limit is not None:
                query = query.limit(limit)
            rows = list(session.execute(query).scalars())
            return [_event_doc(r) for r in reversed(rows)]

    # manual retrain requests

    def request_retrain(self, model: str, actor: str, reason: str = "") -> int:
        """Queue a retrain of `model` by hand (a controller claims it); audited
        "retrain_requested". NotFound: no such model. Returns the request's id."""
        check_reason(reason)

        def work(session: Session) -> int:
            _known(session, model)
            request = RetrainRequest(model=model, actor=actor, reason=reason, at=utcnow())
            session.add(request)
            session.flush()
            self._audit(
                session,
                actor=actor,
                action="retrain_requested",
                subject=model,
                detail={"retrain_request": request.id, "reason": reason},
            )
            return request.id

        return self._retry(work)

    def take_retrain_requests(
        self, claimed_by: str = "", models: list[str] | None = None
    ) -> list[dict[str, Any]]:
        """Claim the pending retrain requests (of `models`), oldest first: {id, model, actor,
        reason, at}. Claimed in one transaction: a request is never returned twice."""

        def work(session: Session) -> list[dict[str, Any]]:
            query = select(RetrainRequest).where(RetrainRequest.claimed_at.is_(None))
            if models is not None:
                query = query.where(RetrainRequest.model.in_(list(models)))
            rows = list(
                session.execute(query.order_by(RetrainRequest.id).with_for_update()).scalars()
            )
            now = utcnow()
            for row in rows:
                row.claimed_at, row.claimed_by = now, claimed_by[:255]
            return [
                {"id": r.id, "model": r.model, "actor": r.actor, "reason": r.reason, "at": r.at}
                for r in rows
            ]

        return self._retry(work)


def _known(session: Session, model: str) -> None:
    if session.get(Model, model) is None:
        raise NotFound(f"no model named {model!r}")
