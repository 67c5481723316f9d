"""Canary rollouts (part of `registry.store.RegistryStore`): an approved request's candidate
takes a growing share of the traffic, step by step, while a judge (retrain.judge) looks
at the counts; each look is stored with its verdict, so a decision can be replayed.

    start_rollout ─▶ running ─advance_rollout (next step)─▶ running ...
                        ├─promote_rollout─▶ promoted     (candidate champion, old archived)
                        ├─rollback_rollout─▶ rolled_back (champion alone again, canary gone)
                        └─fail_rollout─▶ failed          (the same restore)

Each change is one transaction, audited with the previous route table as its rollback
pointer (actions canary_start, canary_step, canary_promote, canary_rollback, canary_fail:
route actions, the gateway reloads) and the request's id, so the request's audit tells
the whole rollout. While a model has a running rollout its route table belongs to it:
`promote`, `set_deployments` and `add_shadow` are refused, and the registry's `rollback`
(an operator's `servo rollback`) rolls the running rollout back. A finished rollout is
never finished again (Conflict): two processes cannot both end it.
"""

from __future__ import annotations

import math
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from registry.base import (
    Conflict,
    Invalid,
    NotFound,
    aware,
    check_reason,
    json_object,
    version_row,
)
from registry.models import (
    ROLLOUT_STATUSES,
    PromotionRequest,
    Rollout,
    RolloutLook,
    utcnow,
)
from registry.promotions import PromotionsMixin, _locked_request
from registry.routes import RoutesMixin, Row, _champion, _replace, _rows, _servable

#: the most rollouts `rollouts()` lists at once
MAX_LIST = 1000
#: what a finished rollout leaves its candidate as (a failure is no verdict on the model)
_CANDIDATE_AFTER = {"rolled_back": "rolled_back", "failed": "archived"}


def check_steps(steps: Any) -> list[float]:
    """The canary's percents: strictly increasing, each in (0, 100], the last 100."""
    if not isinstance(steps, list | tuple) or not steps:
        raise Invalid(f"steps must be a non-empty list of percents, got {steps!r}")
    out: list[float] = []
    for value in steps:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise Invalid(f"a step is a percent (a number), got {value!r}")
        percent = float(value)
        if not (math.isfinite(percent) and 0 < percent <= 100):
            raise Invalid(f"a step's percent must be within (0, 100], got {value!r}")
        if out and percent <= out[-1]:
            raise Invalid(f"steps must be strictly increasing, got {list(steps)!r}")
        out.append(percent)
    if out[-1] != 100:
        raise Invalid(f"the last step must be 100 (the candidate takes all traffic), got {out[-1]}")
    return out


def check_counts(counts: Any) -> dict[str, list[int]]:
    """{metric: [canary trials, canary events, champion trials, champion events]}: four
    integers >= 0 each, events never more than trials."""
    if not isinstance(counts, dict):
        raise Invalid(f"counts must be a JSON object, got {type(counts).__name__}")
    out: dict[str, list[int]] = {}
    for metric, values in counts.items():
        if not isinstance(metric, str) or not 0 < len(metric) <= 32:
            raise Invalid(f"a metric name is a string of 1 to 32 characters, got {metric!r}")
        if not isinstance(values, list | tuple) or len(values) != 4:
            raise Invalid(f"counts of '{metric}' must be [ct, ce, bt, be], got {values!r}")
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in values):
            raise Invalid(f"counts of '{metric}' must be integers >= 0, got {list(values)!r}")
        ct, ce, bt, be = values
        if ce > ct or be > bt:
            raise Invalid(f"counts of '{metric}' have more events than trials: {list(values)!r}")
        out[metric] = [int(v) for v in values]
    return out


def _doc(row: Rollout, looks: int | None = None) -> dict[str, Any]:
    doc = {
        "id": row.id,
        "request_id": row.request_id,
        "model": row.model,
        "version": row.version,
        "champion": row.champion,
        "status": row.status,
        "steps": list(row.steps),
        "step": row.step,
        "percent": float(row.steps[row.step]),
        "config": row.config,
        "held": bool(row.held),
        "started_at": aware(row.started_at),
        "step_started_at": aware(row.step_started_at),
        "finished_at": None if row.finished_at is None else aware(row.finished_at),
        "reason": row.reason,
        "verdict": row.verdict,
    }
    if looks is not None:
        doc["looks"] = looks
    return doc


def _look_doc(row: RolloutLook) -> dict[str, Any]:
    return {
        "seq": row.seq,
        "at": aware(row.at),
        "step": row.step,
        "percent": row.percent,
        "counts": row.counts,
        "verdict": row.verdict,
    }


def _locked(session: Session, rollout_id: int, *, running: bool = True) -> Rollout:
    row = session.execute(
        select(Rollout).where(Rollout.id == rollout_id).with_for_update()
    ).scalar_one_or_none()
    if row is None:
        raise NotFound(f"no rollout {rollout_id}")
    if running and row.status != "running":
        raise Conflict(f"rollout {rollout_id} is already {row.status}")
    return row


def _running(session: Session, model: str) -> Rollout | None:
    return session.execute(
        select(Rollout).where(Rollout.model == model, Rollout.status == "running").limit(1)
    ).scalar_one_or_none()


def _verdict(verdict: Any) -> dict[str, Any] | None:
    return None if verdict is None else json_object(verdict, "a verdict")


class RolloutsMixin(PromotionsMixin, RoutesMixin):
    def start_rollout(
        self, request_id: int, actor: str, *, steps: list[float], config: dict[str, Any]
    ) -> dict[str, Any]:
        """Start the canary rollout of an approved request: the champion stays, the
        candidate becomes the canary at `steps[0]` percent (its shadow row replaced), other
        shadows stay; `config` (the judge's and the policy's settings) is kept for replays.
        A running rollout of this request is returned as it is. Conflict: the request is
        not approved, another rollout of the model runs, no champion, the candidate is the
        champion, not servable, or another version is a canary."""
        percents = check_steps(steps)
        settings = json_object(config, "the rollout's config")

        def work(session: Session) -> dict[str, Any]:
            model = session.execute(
                select(PromotionRequest.model).where(PromotionRequest.id == request_id)
            ).scalar_one_or_none()
            if model is None:
                raise NotFound(f"no promotion request {request_id}")
            self._locked_model(session, model)
            mine = session.execute(
                select(Rollout).where(Rollout.request_id == request_id)
            ).scalar_one_or_none()
            if mine is not None and mine.status == "running":
                return _doc(mine, self._count_looks(session, mine.id))
            request = _locked_request(session, request_id)
            if mine is not None or request.status != "approved":
                ended = f" (its rollout {mine.id} is {mine.status})" if mine is not None else ""
                raise Conflict(
                    f"promotion request {request_id} is {request.status}, not approved{ended}"
                )
            other = _running(session, model)
            if other is not None:
                raise Conflict(
                    f"model '{model}' has rollout {other.id} of version {other.version} running "
                    f"(request {other.request_id}): wait for it to finish"
                )
            version = request.version
            candidate = _servable(session, model, version)
            rows = _rows(session, model)
            champion = _champion(model, rows)
            if champion == version:
                raise Conflict(f"model '{model}' version {version} is already the champion")
            for number, role, _ in rows:
                if role == "canary" and number != version:
                    raise Conflict(
                        f"model '{model}' has version {number} as its canary: remove it first"
                    )
            kept = [r for r in rows if r[0] != version]
            _replace(session, model, [*kept, (version, "canary", percents[0])])
            old_status, candidate.status = candidate.status, "canary"
            now = utcnow()
            row = Rollout(
                request_id=request_id, model=model, version=version, champion=champion,
                status="running", steps=percents, step=0, config=settings, held=False,
                started_at=now, step_started_at=now, reason="", verdict=None,
            )  # fmt: skip
            session.add(row)
            session.flush()
            self._route_audit(
                session,
                model,
                actor=actor,
                action="canary_start",
                previous=rows,
                detail={"request": request_id, "rollout": row.id, "version": version,
                        "champion": champion, "steps": percents, "percent": percents[0]},
                statuses={str(version): old_status},
            )  # fmt: skip
            return _doc(row, 0)

        return self._retry(work)

    def record_look(
        self,
        rollout_id: int,
        *,
        step: int,
        percent: float,
        counts: dict[str, list[int]],
        verdict: dict[str, Any],
    ) -> int:
        """Store one look of the judge (the counts since the previous look, the verdict);
        returns its sequence number (1, 2, ...). Conflict unless the rollout runs and is at
        `step` (a stale runner's look is refused)."""
        checked = check_counts(counts)
        doc = json_object(verdict, "a verdict")
        if isinstance(percent, bool) or not isinstance(percent, int | float):
            raise Invalid(f"percent must be a number, got {percent!r}")
        if not (math.isfinite(percent) and 0 <= percent <= 100):
            raise Invalid(f"percent must be within 0..100, got {percent!r}")

        def work(session: Session) -> int:
            row = _locked(session, rollout_id)
            if step != row.step:
                raise Conflict(f"rollout {rollout_id} is at step {row.step}, not {step}")
            last = session.execute(
                select(func.max(RolloutLook.seq)).where(RolloutLook.rollout_id == rollout_id)
            ).scalar_one()
            seq = int(last or 0) + 1
            session.add(
                RolloutLook(
                    rollout_id=rollout_id, seq=seq, at=utcnow(), step=step,
                    percent=float(percent), counts=checked, verdict=doc,
                )
            )  # fmt: skip
            return seq

        return self._retry(work)

    def rollout_looks(self, rollout_id: int) -> list[dict[str, Any]]:
        """Every look of a rollout, by sequence number."""
        with self._session() as session:
            if session.get(Rollout, rollout_id) is None:
                raise NotFound(f"no rollout {rollout_id}")
            rows = session.execute(
                select(RolloutLook)
                .where(RolloutLook.rollout_id == rollout_id)
                .order_by(RolloutLook.seq)
            ).scalars()
            return [_look_doc(r) for r in rows]

    def advance_rollout(
        self, rollout_id: int, step: int, actor: str, reason: str, verdict: dict[str, Any]
    ) -> None:
        """Move a running rollout to its next step: the canary takes `steps[step]` percent
        (below 100: the last step is `promote_rollout`). Conflict unless `step` is the next
        one and the canary is still deployed."""
        check_reason(reason)
        doc = _verdict(verdict)

        def work(session: Session) -> None:
            row = _locked(session, rollout_id)
            if step != row.step + 1 or step >= len(row.steps):
                raise Conflict(
                    f"rollout {rollout_id} is at step {row.step} of {len(row.steps)}: it can "
                    f"only advance to step {row.step + 1}, not {step}"
                )
            percent = float(row.steps[step])
            if percent >= 100:
                raise Invalid(
                    f"step {step} of rollout {rollout_id} is 100 %: promote_rollout makes "
                    "the candidate champion"
                )
            self._locked_model(session, row.model)
            rows = _rows(session, row.model)
            if (row.version, "canary") not in [(v, r) for v, r, _ in rows]:
                raise Conflict(f"model '{row.model}' version {row.version} is no longer its canary")
            changed = [(v, r, percent if v == row.version else p) for v, r, p in rows]
            _replace(session, row.model, changed)
            row.step, row.step_started_at, row.held = step, utcnow(), False
            row.reason, row.verdict = reason, doc
            self._route_audit(
                session,
                row.model,
                actor=actor,
                action="canary_step",
                previous=rows,
                detail={"request": row.request_id, "rollout": rollout_id, "step": step,
                        "percent": percent, "reason": reason, "verdict": doc},
                statuses={},
            )  # fmt: skip

        self._retry(work)

    def promote_rollout(
        self, rollout_id: int, actor: str, reason: str, verdict: dict[str, Any]
    ) -> int:
        """The candidate becomes champion (the same swap as `promote`: the old champion
        archived, the alias moves, shadows of other versions stay); the rollout and its
        request are promoted. Returns the old champion."""
        check_reason(reason)
        doc = _verdict(verdict)

        def work(session: Session) -> int:
            row = _locked(session, rollout_id)
            detail = {"reason": reason, "request": row.request_id, "rollout": rollout_id,
                      "verdict": doc}  # fmt: skip
            old = self._swap(
                session, row.model, row.version, actor=actor, action="canary_promote",
                detail=detail,
            )  # fmt: skip
            self._finish(session, row, "promoted", actor=actor, reason=reason, verdict=doc)
            return old

        return self._retry(work)

    def rollback_rollout(
        self, rollout_id: int, actor: str, reason: str, verdict: dict[str, Any] | None
    ) -> None:
        """Undo a running rollout in one step: the champion alone at 100 %, the canary row
        gone (other shadows stay), the candidate `rolled_back`; the rollout and its request
        are rolled_back. The audit entry (canary_rollback) holds the verdict."""
        self._end(rollout_id, "rolled_back", actor=actor, reason=reason, verdict=verdict)

    def fail_rollout(self, rollout_id: int, actor: str, reason: str) -> None:
        """The same restore as `rollback_rollout` for a rollout that could not go on (the
        candidate is archived, not judged); the rollout and its request are failed."""
        self._end(rollout_id, "failed", actor=actor, reason=reason, verdict=None)

    def _end(self, rollout_id: int, status: str, *, actor: str, reason: str, verdict: Any) -> None:
        check_reason(reason)
        doc = _verdict(verdict)

        def work(session: Session) -> None:
            row = _locked(session, rollout_id)
            self._restore(session, row, status, actor=actor, reason=reason, verdict=doc)

        self._retry(work)

    def hold_rollout(self, rollout_id: int, held: bool, reason: str) -> None:
        """Mark a running rollout held (its step ran past the timeout undecided: the share
        stays, an alert is up) or no longer held. Already so: nothing changes."""
        check_reason(reason)

        def work(session: Session) -> None:
            row = _locked(session, rollout_id)
            if bool(row.held) == held:
                return
            row.held = held
            self._audit(
                session,
                actor="rollout",
                action="canary_hold" if held else "canary_unhold",
                subject=row.model,
                detail={"request": row.request_id, "rollout": rollout_id, "step": row.step,
                        "held": held, "reason": reason},
            )  # fmt: skip

        self._retry(work)

    def rollout(self, rollout_id: int) -> dict[str, Any]:
        """One rollout with its number of looks ("looks")."""
        with self._session() as session:
            row = session.get(Rollout, rollout_id)
            if row is None:
                raise NotFound(f"no rollout {rollout_id}")
            return _doc(row, self._count_looks(session, rollout_id))

    def rollouts(
        self, model: str | None = None, status: str | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        """Rollouts, newest first, each with its number of looks."""
        if status is not None and status not in ROLLOUT_STATUSES:
            raise Invalid(
                f"unknown rollout status {status!r} (known: {', '.join(ROLLOUT_STATUSES)})"
            )
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIST:
            raise Invalid(f"limit must be an integer within 1..{MAX_LIST}, got {limit!r}")
        with self._session() as session:
            looks = (
                select(RolloutLook.rollout_id, func.count().label("n"))
                .group_by(RolloutLook.rollout_id)
                .subquery()
            )
            query = (
                select(Rollout, looks.c.n)
                .outerjoin(looks, looks.c.rollout_id == Rollout.id)
                .order_by(Rollout.id.desc())
                .limit(limit)
            )
            if model is not None:
                query = query.where(Rollout.model == model)
            if status is not None:
                query = query.where(Rollout.status == status)
            return [_doc(row, int(n or 0)) for row, n in session.execute(query).all()]

    def active_rollout(self, model: str) -> dict[str, Any] | None:
        """The model's running rollout, or None."""
        with self._session() as session:
            row = _running(session, model)
            return None if row is None else _doc(row, self._count_looks(session, row.id))

    # inside the transactions

    def _count_looks(self, session: Session, rollout_id: int) -> int:
        return int(
            session.execute(
                select(func.count()).where(RolloutLook.rollout_id == rollout_id)
            ).scalar_one()
        )

    def _rollback_in(
        self, session: Session, model: str, actor: str, reason: str, to: int | None
    ) -> int:
        """The registry's `rollback`: while a rollout runs, that rollout is rolled back."""
        self._locked_model(session, model)
        row = _running(session, model)
        if row is None:
            return super()._rollback_in(session, model, actor, reason, to)
        row = _locked(session, row.id)
        if to is not None and to != row.champion:
            raise Conflict(
                f"model '{model}' has rollout {row.id} of version {row.version} running: a "
                f"rollback ends it with version {row.champion} champion, not {to}"
            )
        why = reason or "rolled back by hand"
        self._restore(session, row, "rolled_back", actor=actor, reason=why, verdict=None)
        return row.champion

    def _restore(
        self,
        session: Session,
        row: Rollout,
        status: str,
        *,
        actor: str,
        reason: str,
        verdict: dict[str, Any] | None,
    ) -> None:
        model = row.model
        self._locked_model(session, model)
        rows = _rows(session, model)
        champion = next((v for v, r, _ in rows if r == "champion"), row.champion)
        kept: list[Row] = [r for r in rows if r[1] in ("shadow", "other") and r[0] != row.version]
        _replace(session, model, [(champion, "champion", 100.0), *kept])
        statuses: dict[str, str] = {}
        if champion != row.version:
            candidate = version_row(session, model, row.version, lock=True)
            statuses[str(row.version)], candidate.status = (
                candidate.status,
                _CANDIDATE_AFTER[status],
            )
        self._route_audit(
            session,
            model,
            actor=actor,
            action="canary_rollback" if status == "rolled_back" else "canary_fail",
            previous=rows,
            detail={"request": row.request_id, "rollout": row.id, "version": row.version,
                    "champion": champion, "step": row.step, "reason": reason,
                    "verdict": verdict},
            statuses=statuses,
        )  # fmt: skip
        self._finish(session, row, status, actor=actor, reason=reason, verdict=verdict)

    def _finish(
        self,
        session: Session,
        row: Rollout,
        status: str,
        *,
        actor: str,
        reason: str,
        verdict: dict[str, Any] | None,
    ) -> None:
        row.status, row.finished_at, row.reason = status, utcnow(), reason
        if verdict is not None:
            row.verdict = verdict
        request = session.get(PromotionRequest, row.request_id, with_for_update=True)
        if request is not None and request.status == "approved":
            why = f"rollout {row.id}: {reason}" if reason else f"rollout {row.id} {status}"
            self._set_status(session, request, status, why, actor=actor)
