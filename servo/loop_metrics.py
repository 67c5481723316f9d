"""The loop's metrics on the gateway's `/metrics`: a custom Prometheus collector that reads
the registry (not the hot path), cached for `ttl_s` so a scrape costs a few queries at most
every `ttl_s` seconds.

- `servo_pipeline_runs_total{model,trigger,status}`: pipeline runs recorded in the registry
- `servo_pipeline_step_seconds{step}`: a summary (`_count`, `_sum`) of the steps that ran
  (cache hits excluded)
- `servo_promotions_total{model,decision}`: promotion requests by their status (pending,
  approved, promoted, rejected, expired, void, rolled_back)
- `servo_model_info{model,version,stage}`: 1 per deployed version (stage: champion,
  canary, shadow)
- `servo_loop_state{model,state}`: 1 for the loop's current state of each model, 0 for
  the others (watching, retraining, shadowing, awaiting_approval, rolling_out, paused)
- `servo_rollout_canary_percent{model}`: the canary's share of traffic (0: no canary)
- `servo_rollout_held{model}`: 1 while the model's running rollout is held (a step past
  its timeout, undecided: an alert)
- `servo_rollout_e_value{model,metric,test}`: the judge's e-values at its last look
  (test: rollback, over the whole rollout; promotion, this step), from this process's
  runners (`verdicts`)
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    SummaryMetricFamily,
)

log = logging.getLogger("servo.loop")

LOOP_STATES = ("watching", "retraining", "shadowing", "awaiting_approval", "rolling_out", "paused")


@dataclass
class LoopNumbers:
    runs: dict[tuple[str, str, str], int] = field(default_factory=dict)
    steps: dict[str, tuple[int, float]] = field(default_factory=dict)
    promotions: dict[tuple[str, str], int] = field(default_factory=dict)
    info: set[tuple[str, str, str]] = field(default_factory=set)
    states: dict[str, str] = field(default_factory=dict)
    canary: dict[str, float] = field(default_factory=dict)
    held: dict[str, bool] = field(default_factory=dict)


class LoopMetrics:
    """Register with `registry.register(LoopMetrics(store))`; `collect()` answers from a
    snapshot of the registry at most `ttl_s` old (a registry that cannot be read keeps the
    last snapshot and logs why)."""

    def __init__(
        self,
        store: Any,
        *,
        ttl_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        max_runs: int = 100_000,
        verdicts: Callable[[], Mapping[str, tuple[int, Any]]] | None = None,
    ):
        self.store = store
        #: model -> (rollout id, last Verdict) of the running canaries (read per scrape)
        self.verdicts = verdicts
        self.ttl_s = ttl_s
        self.clock = clock
        self.max_runs = max_runs
        self._lock = threading.Lock()
        self._numbers = LoopNumbers()
        self._read_at: float | None = None
        #: step durations of finished runs never change: read each run once
        self._run_steps: dict[int, list[tuple[str, float]]] = {}

    def describe(self) -> list[Metric]:
        return []

    def _read(self) -> LoopNumbers:
        numbers = LoopNumbers()
        for run in self.store.runs(self.max_runs, recover=False):
            model = str(run.get("model") or run.get("pipeline") or "")
            key = (model, str(run.get("trigger") or ""), str(run["status"]))
            numbers.runs[key] = numbers.runs.get(key, 0) + 1
            if run["status"] == "running":
                continue
            steps = self._run_steps.get(run["id"])
            if steps is None:
                doc = self.store.run(run["id"], recover=False)
                steps = [
                    (str(s["step"]), float(s["duration_s"] or 0.0))
                    for s in doc["steps"]
                    if s["status"] in ("succeeded", "failed")
                ]
                self._run_steps[run["id"]] = steps
            for step, seconds in steps:
                count, total = numbers.steps.get(step, (0, 0.0))
                numbers.steps[step] = (count + 1, total + seconds)
        for request in self.store.promotions():
            pair = (str(request["model"]), str(request["status"]))
            numbers.promotions[pair] = numbers.promotions.get(pair, 0) + 1
        for model, rows in self.store.deployments().items():
            numbers.canary[model] = 0.0
            numbers.held[model] = False
            for row in rows:
                numbers.info.add((model, str(row["version"]), str(row["role"])))
                if row["role"] == "canary":
                    numbers.canary[model] = float(row["percent"])
        rollouts = getattr(self.store, "rollouts", None)
        if callable(rollouts):
            for doc in rollouts(status="running"):
                numbers.held[str(doc["model"])] = bool(doc["held"])
        states = getattr(self.store, "loop_states", None)
        if callable(states):
            for model, doc in states().items():
                numbers.states[model] = "paused" if doc.get("paused") else str(doc["state"])
        return numbers

    def numbers(self) -> LoopNumbers:
        with self._lock:
            now = self.clock()
            if self._read_at is None or now - self._read_at >= self.ttl_s:
                try:
                    self._numbers = self._read()
                except Exception as exc:  # a scrape must not fail because the registry did
                    log.warning("loop metrics not read from the registry: %s", exc)
                self._read_at = now
            return self._numbers

    def collect(self) -> Iterator[Metric]:
        numbers = self.numbers()
        runs = CounterMetricFamily(
            "servo_pipeline_runs", "Pipeline runs recorded in the registry.",
            labels=["model", "trigger", "status"],
        )  # fmt: skip
        for (model, trigger, status), count in sorted(numbers.runs.items()):
            runs.add_metric([model, trigger, status], count)
        steps = SummaryMetricFamily(
            "servo_pipeline_step_seconds", "Duration of the pipeline steps that ran.",
            labels=["step"],
        )  # fmt: skip
        for step, (count, total) in sorted(numbers.steps.items()):
            steps.add_metric([step], count_value=count, sum_value=total)
        promotions = CounterMetricFamily(
            "servo_promotions", "Promotion requests by their status.",
            labels=["model", "decision"],
        )  # fmt: skip
        for (model, decision), count in sorted(numbers.promotions.items()):
            promotions.add_metric([model, decision], count)
        info = GaugeMetricFamily(
            "servo_model_info", "1 for each deployed model version and its stage.",
            labels=["model", "version", "stage"],
        )  # fmt: skip
        for model, version, stage in sorted(numbers.info):
            info.add_metric([model, version, stage], 1.0)
        state = GaugeMetricFamily(
            "servo_loop_state", "1 for the loop's current state of each model.",
            labels=["model", "state"],
        )  # fmt: skip
        for model, current in sorted(numbers.states.items()):
            for name in LOOP_STATES:
                state.add_metric([model, name], 1.0 if name == current else 0.0)
        canary = GaugeMetricFamily(
            "servo_rollout_canary_percent", "The canary's share of traffic (percent).",
            labels=["model"],
        )  # fmt: skip
        for model, percent in sorted(numbers.canary.items()):
            canary.add_metric([model], percent)
        held = GaugeMetricFamily(
            "servo_rollout_held", "1 while the model's rollout is held (undecided past its "
            "step timeout).", labels=["model"],
        )  # fmt: skip
        for model, flag in sorted(numbers.held.items()):
            held.add_metric([model], 1.0 if flag else 0.0)
        yield runs
        yield steps
        yield promotions
        yield info
        yield state
        yield canary
        yield held
        yield self._e_values()

    def _e_values(self) -> Metric:
        family = GaugeMetricFamily(
            "servo_rollout_e_value", "The canary judge's e-values at its last look.",
            labels=["model", "metric", "test"],
        )  # fmt: skip
        try:
            verdicts = dict(self.verdicts()) if self.verdicts is not None else {}
        except Exception as exc:
            log.warning("rollout e-values not read: %s", exc)
            verdicts = {}
        for model, (_, verdict) in sorted(verdicts.items()):
            for test, values in (("rollback", verdict.rollback_e),
                                 ("promotion", verdict.promote_e)):  # fmt: skip
                for metric, value in sorted(values.items()):
                    family.add_metric([model, metric, test], float(value))
        return family
