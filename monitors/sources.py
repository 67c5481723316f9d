"""Where the monitors read the gateway's numbers: a real Prometheus over its HTTP API, or,
embedded, the gateway's own `CollectorRegistry` snapshotted over time. Both answer one
question: for one model version, how much did each counter grow over a window?

The metric names are the gateway's (DESIGN.md, "Metric schema"); both sources return the
same `WindowData`, and one contract test suite runs against both.
"""

from __future__ import annotations

import json
import math
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

FEATURE_BINS = "servo_feature_bin_total"
PREDICTIONS = "servo_prediction_total"
CONFIDENCE = "servo_prediction_confidence_bucket"
FEEDBACK = "servo_feedback_total"
DELAY = "servo_feedback_delay_seconds_bucket"
#: points per series in one range query (Prometheus refuses more than 11,000)
MAX_POINTS = 10_000


class SourceUnavailable(RuntimeError):
    """The source could not answer, or answered with partial or stale data: a report says
    `unavailable`, never "no drift"."""


@dataclass
class WindowData:
    """How much each of one version's counters grew over [end - window_s, end]."""

    model: str
    version: str
    window_s: float
    end: float
    #: how much of the window the source really covers (less when its history is shorter)
    covered_s: float | None = None
    #: feature -> bin label -> count
    features: dict[str, dict[str, float]] = field(default_factory=dict)
    #: predicted class -> count (all variants of the version)
    predictions: dict[str, float] = field(default_factory=dict)
    #: top-class confidence: bucket upper bound ("0.1", ..., "+Inf") -> count in that bucket
    confidence: dict[str, float] = field(default_factory=dict)
    #: labels by outcome ("correct", "incorrect")
    feedback: dict[str, float] = field(default_factory=dict)
    #: label delay: bucket upper bound in seconds -> count in that bucket
    delay: dict[str, float] = field(default_factory=dict)
    #: (time, correct, incorrect) per step over the detector's history, oldest first
    feedback_steps: list[tuple[float, float, float]] = field(default_factory=list)


class MetricsSource(Protocol):
    name: str

    def window(
        self, model: str, version: str, window_s: float, *, history_s: float, step_s: float
    ) -> WindowData: ...


def _buckets(cumulative: Mapping[str, float]) -> dict[str, float]:
    """Prometheus `le` buckets (cumulative) -> counts per bucket."""
    ordered = sorted(cumulative.items(), key=lambda item: float(item[0]))
    out: dict[str, float] = {}
    previous = 0.0
    for bound, value in ordered:
        out[bound] = max(0.0, value - previous)
        previous = max(previous, value)
    return out


def _fill(data: WindowData, name: str, labels: Mapping[str, str], value: float) -> None:
    if name == FEATURE_BINS:
        data.features.setdefault(labels["feature"], {})[labels["bin"]] = value
    elif name == PREDICTIONS:
        key = labels["class"]
        data.predictions[key] = data.predictions.get(key, 0.0) + value
    elif name == CONFIDENCE:
        key = labels["le"]
        data.confidence[key] = data.confidence.get(key, 0.0) + value
    elif name == FEEDBACK:
        data.feedback[labels["outcome"]] = value
    elif name == DELAY:
        data.delay[labels["le"]] = value


# --- Prometheus ---------------------------------------------------------------------------


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _duration(seconds: float) -> str:
    return f"{max(1, round(seconds))}s"


class PrometheusSource:
    """PromQL over Prometheus' HTTP API: `increase(metric[window])` per series, evaluated at
    the time of the newest sample of the version's series (so the window is not stretched
    past the last scrape). Any HTTP error, timeout, failed query, partial answer (warnings)
    or stale data (no sample for `stale_after_s`) raises SourceUnavailable."""

    name = "prometheus"

    def __init__(self, url: str, *, timeout_s: float = 5.0, stale_after_s: float = 120.0):
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.stale_after_s = stale_after_s

    def _get(self, path: str, params: Mapping[str, str]) -> Any:
        query = urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(
                f"{self.url}{path}?{query}", timeout=self.timeout_s
            ) as response:
                doc = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:300].decode("utf-8", "replace")
            raise SourceUnavailable(f"Prometheus answered HTTP {exc.code}: {detail}") from None
        except (OSError, ValueError) as exc:
            raise SourceUnavailable(f"Prometheus at {self.url} unreachable: {exc}") from None
        if doc.get("status") != "success":
            raise SourceUnavailable(f"Prometheus query failed: {doc.get('error', doc)}")
        if doc.get("warnings"):
            raise SourceUnavailable(f"Prometheus returned partial data: {doc['warnings']}")
        return doc["data"]

    def query(self, promql: str, at: float | None = None) -> list[dict[str, Any]]:
        params = {"query": promql}
        if at is not None:
            params["time"] = repr(at)
        data = self._get("/api/v1/query", params)
        result: list[dict[str, Any]] = data["result"]
        return result

    def window(
        self, model: str, version: str, window_s: float, *, history_s: float, step_s: float
    ) -> WindowData:
        selector = f"model={_quote(model)},version={_quote(version)}"
        newest = self.query(f"max(timestamp({FEEDBACK}{{{selector}}}))")
        now = time.time()
        if not newest:
            raise SourceUnavailable(
                f"Prometheus has no series of {model} version {version} (not scraped yet?)"
            )
        end = float(newest[0]["value"][1])
        if now - end > self.stale_after_s:
            raise SourceUnavailable(
                f"the newest sample of {model} version {version} is {now - end:.0f} s old "
                f"(the gateway is not being scraped)"
            )
        data = WindowData(model=model, version=version, window_s=window_s, end=end)
        span = _duration(window_s)
        groups = {
            FEATURE_BINS: "feature, bin",
            PREDICTIONS: "class",
            CONFIDENCE: "le",
            FEEDBACK: "outcome",
            DELAY: "le",
        }
        for metric, by in groups.items():
            promql = f"sum by ({by}) (increase({metric}{{{selector}}}[{span}]))"
            for series in self.query(promql, at=end):
                value = float(series["value"][1])
                _fill(data, metric, series["metric"], value if math.isfinite(value) else 0.0)
        data.confidence = _buckets(data.confidence)
        data.delay = _buckets(data.delay)
        data.feedback_steps = self._steps(selector, end, history_s, step_s)
        return data

    def _steps(
        self, selector: str, end: float, history_s: float, step_s: float
    ) -> list[tuple[float, float, float]]:
        step_s = max(step_s, history_s / MAX_POINTS)  # Prometheus answers at most 11,000
        promql = f"sum by (outcome) (increase({FEEDBACK}{{{selector}}}[{_duration(step_s)}]))"
        params = {
            "query": promql,
            "start": repr(end - history_s + step_s),
            "end": repr(end),
            "step": _duration(step_s),
        }
        data = self._get("/api/v1/query_range", params)
        steps: dict[float, list[float]] = {}
        for series in data["result"]:
            outcome = series["metric"].get("outcome")
            column = 0 if outcome == "correct" else 1 if outcome == "incorrect" else None
            if column is None:
                continue
            for at, value in series["values"]:
                number = float(value)
                steps.setdefault(float(at), [0.0, 0.0])[column] = (
                    round(number) if math.isfinite(number) else 0.0
                )
        return [(at, c, i) for at, (c, i) in sorted(steps.items())]


# --- embedded -----------------------------------------------------------------------------

Snapshot = dict[tuple[str, tuple[tuple[str, str], ...]], float]
WANTED = (FEATURE_BINS, PREDICTIONS, CONFIDENCE, FEEDBACK, DELAY)


class Collectable(Protocol):
    def collect(self) -> Iterable[Any]: ...


class EmbeddedSource:
    """The same numbers from a `CollectorRegistry` in this process (the embedded gateway's):
    `snapshot()` records the counters (call it every step, e.g. from the scheduler; a
    window takes one too, unless `fresh=False`). A window is the newest snapshot minus the
    newest one at or before its start (or the oldest kept, when the history is shorter:
    `covered_s` then says how long it really covered).

    Memory stays bounded: snapshots are whole for `full_s` (the longest window asked
    for), then keep only the feedback counters (the stall detector's history) for
    `keep_s`."""

    name = "embedded"

    def __init__(
        self,
        registry: Collectable,
        *,
        full_s: float = 3600.0,
        keep_s: float = 86400.0,
        clock: Callable[[], float] = time.time,
    ):
        self.registry = registry
        self.full_s = full_s
        self.keep_s = keep_s
        self.clock = clock
        #: (time, values, whole?)
        self._snapshots: deque[tuple[float, Snapshot, bool]] = deque()
        self.snapshot()

    def snapshot(self) -> None:
        values: Snapshot = {}
        for family in self.registry.collect():
            for sample in family.samples:
                if sample.name in WANTED:
                    key = (sample.name, tuple(sorted(sample.labels.items())))
                    values[key] = float(sample.value)
        now = self.clock()
        self._snapshots.append((now, values, True))
        while len(self._snapshots) > 2 and self._snapshots[1][0] < now - self.keep_s:
            self._snapshots.popleft()
        for i, (taken, old, whole) in enumerate(self._snapshots):
            if taken >= now - self.full_s:
                break
            if whole:  # past the longest window: only the label stream is still needed
                kept = {k: v for k, v in old.items() if k[0] == FEEDBACK}
                self._snapshots[i] = (taken, kept, False)

    def _base(self, moment: float) -> tuple[float, Snapshot]:
        whole = [(t, v) for t, v, full in self._snapshots if full]
        chosen = whole[0]
        for taken, values in whole:
            if taken > moment:
                break
            chosen = (taken, values)
        return chosen

    @staticmethod
    def _growth(
        newer: Snapshot, older: Snapshot, model: str, version: str
    ) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        out = {}
        for key, value in newer.items():
            labels = dict(key[1])
            if labels.get("model") != model or labels.get("version") != version:
                continue
            before = older.get(key, 0.0)
            out[key] = value - before if value >= before else value  # a reset starts at 0
        return out

    def window(
        self,
        model: str,
        version: str,
        window_s: float,
        *,
        history_s: float,
        step_s: float,
        fresh: bool = True,
    ) -> WindowData:
        if fresh:
            self.snapshot()
        end, newest, _ = self._snapshots[-1]
        start, base = self._base(end - window_s)
        data = WindowData(
            model=model, version=version, window_s=window_s, end=end,
            covered_s=min(window_s, end - start),
        )  # fmt: skip
        for (name, labels), value in self._growth(newest, base, model, version).items():
            _fill(data, name, dict(labels), value)
        data.confidence = _buckets(data.confidence)
        data.delay = _buckets(data.delay)
        previous: Snapshot | None = None
        for taken, values, _ in self._snapshots:
            if taken < end - history_s:
                continue
            if previous is not None:
                growth = self._growth(values, previous, model, version)
                by_outcome = {
                    dict(labels).get("outcome"): value
                    for (name, labels), value in growth.items()
                    if name == FEEDBACK
                }
                data.feedback_steps.append(
                    (taken, by_outcome.get("correct", 0.0), by_outcome.get("incorrect", 0.0))
                )
            previous = values
        return data
