"""The trigger policy: monitor reports in, retrain decisions out (pure: no I/O, no clock).

Per model, over its sequence of checks:
- a check whose verdict is `insufficient_data` or `unavailable` never retrains, and
  neither counts nor resets the debounce (it says nothing either way);
- a check where a configured signal (`trigger.on`) alarmed counts; `k` of them in a row
  retrain, unless a retrain started less than `cooldown_s` ago or `budget_per_day`
  retrains started in the last 24 h (the decision's reason says which);
- any other check (ok, or an alarm only on signals not configured) resets the count.

The count is not reset by a decision to retrain, only by `started()` (a retrain that
could not start, say because another process holds the model, is decided again at the
next alarmed check) or by a quiet check. The state is JSON, so a restart keeps debounce,
cooldown and budget.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from monitors.monitor import ALARM, STALLED, UNAVAILABLE, MonitorReport
from monitors.report import DRIFT, INSUFFICIENT
from retrain.policy import Policy, Trigger

SIGNALS = ("accuracy_stall", "input_drift", "prediction_drift")
DAY_S = 86400.0


def signals(report: MonitorReport) -> set[str]:
    """The signals that alarmed in this report: `accuracy_stall` (the stall detector
    fired), `input_drift` (the input features drifted), `prediction_drift` (the predicted
    class or the confidence distribution drifted). Empty unless the verdict is alarm."""
    if report.verdict != ALARM:
        return set()
    found: set[str] = set()
    if report.accuracy is not None and report.accuracy.verdict == STALLED:
        found.add("accuracy_stall")
    if report.features is not None and report.features.verdict == DRIFT:
        found.add("input_drift")
    if any(p is not None and p.verdict == DRIFT for p in (report.predictions, report.confidence)):
        found.add("prediction_drift")
    return found


@dataclass
class TriggerState:
    #: alarmed checks in a row (on a configured signal)
    consecutive: int = 0
    #: when the last retrain started (Unix seconds)
    last_retrain_at: float | None = None
    #: start times of the retrains of the last 24 h
    retrains: list[float] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "consecutive": self.consecutive,
            "last_retrain_at": self.last_retrain_at,
            "retrains": list(self.retrains),
        }

    @classmethod
    def from_json(cls, doc: Any) -> TriggerState:
        """The state `to_json` wrote; ValueError naming the field for anything else."""
        if doc is None:
            return cls()
        if not isinstance(doc, dict):
            raise ValueError(f"trigger state must be an object, got {type(doc).__name__}")
        unknown = set(doc) - {"consecutive", "last_retrain_at", "retrains"}
        if unknown:
            raise ValueError(f"trigger state: unknown field(s) {', '.join(sorted(unknown))}")
        consecutive = doc.get("consecutive", 0)
        if isinstance(consecutive, bool) or not isinstance(consecutive, int) or consecutive < 0:
            raise ValueError(
                f"trigger state: consecutive must be an integer >= 0, got {consecutive!r}"
            )
        last = doc.get("last_retrain_at")
        if last is not None and not _number(last):
            raise ValueError(f"trigger state: last_retrain_at must be a number, got {last!r}")
        retrains = doc.get("retrains", [])
        if not isinstance(retrains, list) or not all(_number(t) for t in retrains):
            raise ValueError(f"trigger state: retrains must be a list of numbers, got {retrains!r}")
        return cls(
            consecutive,
            None if last is None else float(last),
            sorted(float(t) for t in retrains),
        )


@dataclass(frozen=True)
class Decision:
    retrain: bool
    reason: str
    #: the configured signals that alarmed in this check
    signals: list[str]
    #: retrain, debounce, cooldown, budget, quiet, insufficient_data, unavailable
    kind: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "retrain": self.retrain,
            "reason": self.reason,
            "signals": list(self.signals),
            "kind": self.kind,
        }


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _trigger(policy: Policy | Trigger) -> Trigger:
    return policy.trigger if isinstance(policy, Policy) else policy


def _recent(retrains: list[float], now: float) -> list[float]:
    return [t for t in retrains if now - t < DAY_S]


def limit_reason(state: TriggerState, policy: Policy | Trigger, now: float) -> str | None:
    """Why a retrain may not start now (cooldown or budget), or None when it may. The
    controller asks it again under the model's lock, with the state rebuilt from the
    registry's runs."""
    trigger = _trigger(policy)
    if state.last_retrain_at is not None and now - state.last_retrain_at < trigger.cooldown_s:
        ago = now - state.last_retrain_at
        return (
            f"cooldown: the last retrain started {ago:.0f} s ago "
            f"(cooldown_s {trigger.cooldown_s:g})"
        )
    recent = _recent(state.retrains, now)
    if len(recent) >= trigger.budget_per_day:
        return (
            f"budget: {len(recent)} retrain(s) started in the last 24 h "
            f"(budget_per_day {trigger.budget_per_day})"
        )
    return None


def decide(
    state: TriggerState, report: MonitorReport, policy: Policy | Trigger, now: float
) -> tuple[TriggerState, Decision]:
    """The state after this check and what to do (see the module's doc)."""
    trigger = _trigger(policy)
    retrains = _recent(state.retrains, now)
    if report.verdict in (INSUFFICIENT, UNAVAILABLE):
        why = f": {report.error}" if report.error else ""
        kept = TriggerState(state.consecutive, state.last_retrain_at, retrains)
        reason = f"{report.verdict}{why}; no decision (count stays {state.consecutive})"
        return kept, Decision(False, reason, [], report.verdict)
    fired = signals(report)
    configured: set[str] = set(trigger.on)
    alarmed = [s for s in SIGNALS if s in fired and s in configured]
    if not alarmed:
        quiet = TriggerState(0, state.last_retrain_at, retrains)
        if fired:
            names = ", ".join(sorted(fired))
            reason = f"alarm on {names}, not a configured trigger (on: {', '.join(trigger.on)})"
        else:
            reason = f"verdict {report.verdict}; count reset"
        return quiet, Decision(False, reason, [], "quiet")
    count = state.consecutive + 1
    after = TriggerState(count, state.last_retrain_at, retrains)
    names = ", ".join(alarmed)
    if count < trigger.k:
        reason = f"debounce: {names} on {count} of {trigger.k} consecutive checks"
        return after, Decision(False, reason, alarmed, "debounce")
    limit = limit_reason(after, trigger, now)
    if limit is not None:
        return after, Decision(False, limit, alarmed, limit.split(":", 1)[0])
    reason = f"{names} on {count} consecutive checks (k {trigger.k})"
    return after, Decision(True, reason, alarmed, "retrain")


def started(state: TriggerState, now: float) -> TriggerState:
    """A retrain started at `now` (any trigger: alarm, cron, manual): the cooldown and
    budget count from it, and the debounce starts again."""
    return TriggerState(0, now, [*_recent(state.retrains, now), now])


__all__ = [
    "SIGNALS",
    "Decision",
    "TriggerState",
    "decide",
    "limit_reason",
    "signals",
    "started",
]
