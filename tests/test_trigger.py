"""The trigger policy over seeded sequences of real MonitorReports (built by the monitors
from seeded windows): k debounce, cooldown, budget, insufficient/unavailable never
trigger nor reset, which signals count."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from monitors.monitor import ALARM, OK, UNAVAILABLE, MonitorConfig, MonitorReport, build_report
from monitors.monitor import monitor as run_monitor
from monitors.profile import CONFIDENCE_EDGES, ReferenceProfile
from monitors.report import INSUFFICIENT
from monitors.sources import SourceUnavailable, WindowData
from retrain.policy import Policy, Trigger
from retrain.trigger import (
    SIGNALS,
    TriggerState,
    decide,
    limit_reason,
    signals,
    started,
)
from tests import test_monitor

CLASSES = test_monitor.CLASSES
#: the monitors' tests' reference profile (a module fixture)
reference_profile = test_monitor.profile


def window(
    profile: ReferenceProfile,
    rng: np.random.Generator,
    *,
    n: int = 500,
    shift: float = 0.0,
    prior: bool = False,
    accuracy: list[float] | None = None,
) -> WindowData:
    rows = rng.standard_normal((n, 4)) + shift
    counts = profile.bin_counts(rows)
    predicted = rng.integers(0, CLASSES, n)
    if prior:
        predicted = np.where(rng.random(n) < 0.5, 3, predicted)
    top = rng.dirichlet(np.ones(CLASSES) * 0.3, n).max(axis=1)
    buckets = np.bincount(
        np.searchsorted(CONFIDENCE_EDGES, top, side="left"), minlength=len(CONFIDENCE_EDGES) + 1
    )
    data = WindowData(model="m", version="1", window_s=900, end=1e9)
    for j, feature in enumerate(profile.features):
        data.features[feature] = {label: float(counts[j, k]) for k, label in profile.bin_labels(j)}
    values, value_counts = np.unique(predicted, return_counts=True)
    data.predictions = {str(v): float(c) for v, c in zip(values, value_counts, strict=True)}
    bounds = [repr(float(b)) for b in CONFIDENCE_EDGES] + ["+Inf"]
    data.confidence = {b: float(c) for b, c in zip(bounds, buckets, strict=True)}
    steps = []
    for k, p in enumerate(accuracy or []):
        correct = int((rng.random(10) < p).sum())
        steps.append((float(k), float(correct), float(10 - correct)))
    data.feedback_steps = steps
    data.feedback = {
        "correct": sum(c for _, c, _ in steps),
        "incorrect": sum(i for _, _, i in steps),
    }
    return data


class Reports:
    """Real reports of each kind, from seeded windows."""

    def __init__(self, profile: ReferenceProfile, seed: int):
        self.profile = profile
        self.rng = np.random.default_rng(seed)

    def build(self, data: WindowData) -> MonitorReport:
        return build_report(data, self.profile, baseline=0.95)

    def one(self, expected: set[str], **shape: Any) -> MonitorReport:
        """A report where exactly `expected` alarmed (a calm part may false-alarm at its
        5% rate: the next seeded window is taken then)."""
        for _ in range(20):
            report = self.build(window(self.profile, self.rng, **shape))
            if signals(report) == expected:
                return report
        raise AssertionError(f"no window alarmed exactly on {expected}: {report.reasons}")

    def ok(self) -> MonitorReport:
        report = self.one(set(), accuracy=[0.95] * 40)
        assert report.verdict == OK, report.reasons
        return report

    def input_drift(self) -> MonitorReport:
        return self.one({"input_drift"}, shift=1.0)

    def prediction_drift(self) -> MonitorReport:
        return self.one({"prediction_drift"}, prior=True)

    def stall(self) -> MonitorReport:
        return self.one({"accuracy_stall"}, accuracy=[0.95] * 60 + [0.6] * 60)

    def insufficient(self) -> MonitorReport:
        report = self.build(window(self.profile, self.rng, n=20))
        assert report.verdict == INSUFFICIENT
        return report

    def unavailable(self) -> MonitorReport:
        class Down:
            name = "prometheus"

            def window(self, *args: Any, **kwargs: Any) -> WindowData:
                raise SourceUnavailable("connection refused")

        report = run_monitor(Down(), "m", "1", self.profile, config=MonitorConfig())  # type: ignore[arg-type]
        assert report.verdict == UNAVAILABLE
        return report


def policy(**trigger: Any) -> Policy:
    return Policy(trigger=Trigger(**trigger))


def run(
    sequence: list[MonitorReport], chosen: Policy, *, start: float = 1e9, every_s: float = 60
) -> tuple[TriggerState, list[bool], list[str]]:
    """Feed the reports in order, one check every `every_s`; a retrain decided starts."""
    state = TriggerState()
    retrains, kinds = [], []
    for i, report in enumerate(sequence):
        now = start + i * every_s
        state, decision = decide(state, report, chosen, now)
        retrains.append(decision.retrain)
        kinds.append(decision.kind)
        if decision.retrain:
            state = started(state, now)
    return state, retrains, kinds


def test_signals_of_each_kind_of_report(reference_profile: ReferenceProfile) -> None:
    reports = Reports(reference_profile, 1)
    assert signals(reports.ok()) == set()
    assert signals(reports.insufficient()) == set()
    assert signals(reports.unavailable()) == set()
    for make in (reports.input_drift, reports.prediction_drift, reports.stall):
        assert make().verdict == ALARM
    assert set(SIGNALS) == {"accuracy_stall", "input_drift", "prediction_drift"}


def test_k_consecutive_alarms_retrain_once_and_a_quiet_check_resets(
    reference_profile: ReferenceProfile,
) -> None:
    r = Reports(reference_profile, 2)
    chosen = policy(k=3, cooldown_s=0, budget_per_day=100)
    sequence = [r.input_drift(), r.input_drift(), r.ok(), r.input_drift(), r.input_drift(),
                r.input_drift(), r.input_drift()]  # fmt: skip
    state, retrains, kinds = run(sequence, chosen)
    assert retrains == [False, False, False, False, False, True, False]
    assert kinds == ["debounce", "debounce", "quiet", "debounce", "debounce", "retrain",
                     "debounce"]  # fmt: skip
    assert state.consecutive == 1 and len(state.retrains) == 1


def test_insufficient_and_unavailable_never_trigger_and_do_not_reset(
    reference_profile: ReferenceProfile,
) -> None:
    r = Reports(reference_profile, 3)
    chosen = policy(k=2, cooldown_s=0, budget_per_day=100)
    state, retrains, kinds = run([r.insufficient()] * 50 + [r.unavailable()] * 50, chosen)
    assert not any(retrains) and state.consecutive == 0
    assert set(kinds) == {INSUFFICIENT, UNAVAILABLE}
    # an alarm, then checks that cannot tell, then an alarm: two in a row
    sequence = [r.stall(), r.insufficient(), r.unavailable(), r.stall()]
    state, retrains, kinds = run(sequence, chosen)
    assert retrains == [False, False, False, True]
    decision = decide(TriggerState(1), r.unavailable(), chosen, 0)[1]
    assert "connection refused" in decision.reason and not decision.retrain


def test_only_configured_signals_count(reference_profile: ReferenceProfile) -> None:
    r = Reports(reference_profile, 4)
    default = Policy()  # on: accuracy_stall, input_drift; k 3
    _, retrains, kinds = run([r.prediction_drift()] * 6, default)
    assert not any(retrains) and kinds == ["quiet"] * 6
    decision = decide(TriggerState(2), r.prediction_drift(), default, 0)[1]
    assert "not a configured trigger" in decision.reason
    only_prediction = policy(on=["prediction_drift"], k=2)
    assert run([r.prediction_drift()] * 2, only_prediction)[1] == [False, True]
    # any mix of configured signals counts towards k
    assert run([r.stall(), r.input_drift(), r.stall()], default)[1] == [False, False, True]


def test_cooldown_blocks_until_it_ends(reference_profile: ReferenceProfile) -> None:
    r = Reports(reference_profile, 5)
    chosen = policy(k=1, cooldown_s=300, budget_per_day=100)
    alarms = [r.input_drift() for _ in range(12)]
    _, retrains, kinds = run(alarms, chosen, every_s=60)
    # a retrain at t=0, blocked at 60..240, then again at 300 and 600
    assert [i for i, fired in enumerate(retrains) if fired] == [0, 5, 10]
    assert kinds[1] == "cooldown"
    decision = decide(started(TriggerState(), 100.0), alarms[0], chosen, 160.0)[1]
    assert decision.reason == "cooldown: the last retrain started 60 s ago (cooldown_s 300)"


def test_a_trigger_storm_is_bounded_by_the_budget(reference_profile: ReferenceProfile) -> None:
    r = Reports(reference_profile, 6)
    chosen = policy(k=1, cooldown_s=0, budget_per_day=3)
    storm = [r.stall() for _ in range(10)]
    sequence = [storm[i % 10] for i in range(2 * 24 * 6)]  # every 10 min for 48 h
    state, retrains, kinds = run(sequence, chosen, every_s=600)
    starts = [i * 600 for i, fired in enumerate(retrains) if fired]
    assert len(starts) == 6, starts  # 3 a day, two days
    for t in starts:  # never more than 3 in any rolling 24 h
        assert sum(1 for s in starts if t <= s < t + 86400) <= 3
    assert "budget" in kinds
    assert limit_reason(state, chosen, 1e9 + (len(sequence) - 1) * 600).startswith(
        "budget: 3 retrain"
    )


def test_started_counts_every_kind_of_retrain_and_the_state_round_trips(
    reference_profile: ReferenceProfile,
) -> None:
    r = Reports(reference_profile, 7)
    chosen = policy(k=2, cooldown_s=3600, budget_per_day=2)
    state = started(TriggerState(consecutive=5), 1000.0)  # a manual or cron retrain
    assert state.consecutive == 0 and state.last_retrain_at == 1000.0
    state, decision = decide(state, r.input_drift(), chosen, 1100.0)
    state, decision = decide(state, r.input_drift(), chosen, 1200.0)
    assert not decision.retrain and decision.kind == "cooldown"
    restored = TriggerState.from_json(json.loads(json.dumps(state.to_json())))
    assert restored == state
    state, decision = decide(restored, r.input_drift(), chosen, 1000.0 + 3601)
    assert decision.retrain and decision.signals == ["input_drift"]
    assert json.loads(json.dumps(decision.to_json()))["kind"] == "retrain"
    # old starts fall out of the 24 h window
    assert started(state, 1000.0 + 2 * 86400).retrains == [1000.0 + 2 * 86400]
    assert limit_reason(TriggerState(), chosen, 0.0) is None


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ([], "must be an object"),
        ({"consecutive": -1}, "consecutive must be an integer >= 0"),
        ({"consecutive": True}, "consecutive must be an integer >= 0"),
        ({"last_retrain_at": "yesterday"}, "last_retrain_at must be a number"),
        ({"retrains": [1, "x"]}, "retrains must be a list of numbers"),
        ({"count": 1}, "unknown field(s) count"),
    ],
)
def test_a_damaged_state_is_refused_precisely(doc: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        TriggerState.from_json(doc)
    assert TriggerState.from_json(None) == TriggerState()
