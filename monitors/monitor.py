"""One model version's health over one window: input drift per feature, prediction and
confidence drift, accuracy from delayed labels with a stall detector, all in one
`MonitorReport` (JSON, Prometheus gauges, a table for people).

Overall verdict, in order:
- `unavailable`: the source could not answer (or answered partially); never "no drift";
- `alarm`: inputs, predictions or confidence drifted, or accuracy stalled (`reasons` says
  which);
- `insufficient_data`: neither the inputs nor the labels have enough samples to tell;
- `ok`: otherwise (parts without enough data say so in their own verdicts).
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from monitors.detectors import make_detector, wilson_interval
from monitors.profile import CONFIDENCE_EDGES, ReferenceProfile
from monitors.report import (
    DRIFT,
    INSUFFICIENT,
    DriftReport,
    distribution_drift,
    feature_drift,
    flat_histograms,
)
from monitors.sources import MetricsSource, SourceUnavailable, WindowData

OK, ALARM, UNAVAILABLE, STALLED = "ok", "alarm", "unavailable", "stalled"


@dataclass
class AccuracyReport:
    labelled: int
    correct: int
    accuracy: float | None
    wilson_low: float | None
    wilson_high: float | None
    predicted: int
    #: labelled / predicted rows in the window (None: nothing predicted)
    coverage: float | None
    #: label delay quantiles, as the upper bound of the histogram bucket they fall in
    delay_p50_s: float | None
    delay_p90_s: float | None
    baseline: float | None
    tolerance: float
    detector: str
    drift_detected: bool
    #: labels into the detector's history when it fired, and when (Unix seconds)
    detected_at_label: int | None
    detected_at: float | None
    history_labels: int
    verdict: str


@dataclass
class MonitorConfig:
    window_s: float = 900.0
    #: the detector's history (the matured label stream it runs over) and its resolution
    history_s: float = 86400.0
    step_s: float = 60.0
    min_samples: int = 100
    min_labels: int = 30
    false_alarm_rate: float = 0.05
    #: effect-size thresholds instead of the calibrated JS one (e.g. JS 0.1 or PSI 0.2)
    fixed_js_threshold: float | None = None
    fixed_psi_threshold: float | None = None
    #: ddm, adwin, ucb (needs the version's evaluation accuracy), none
    detector: str = "ucb"
    tolerance: float = 0.05


@dataclass
class MonitorReport:
    model: str
    version: str
    source: str
    window_s: float
    end: str | None
    verdict: str
    #: seconds of the window the source had data for (None: all of it)
    covered_s: float | None = None
    reasons: list[str] = field(default_factory=list)
    error: str | None = None
    n: int = 0
    features: DriftReport | None = None
    predictions: DriftReport | None = None
    confidence: DriftReport | None = None
    accuracy: AccuracyReport | None = None

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = _finite(asdict(self))
        for part in ("features", "predictions", "confidence"):
            if doc.get(part):
                flat_histograms(doc[part])
        return doc

    @property
    def exit_code(self) -> int:
        """0 ok, 1 drift or stall, 2 cannot tell (unavailable, or too few samples)."""
        return {ALARM: 1, UNAVAILABLE: 2, INSUFFICIENT: 2}.get(self.verdict, 0)


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _iso(moment: float) -> str:
    return dt.datetime.fromtimestamp(moment, dt.UTC).isoformat(timespec="seconds")


def live_feature_counts(profile: ReferenceProfile, data: WindowData) -> np.ndarray[Any, Any]:
    """(F, 12) counts in the profile's bin order from the source's bin labels (a feature or
    bin the source lacks counts zero)."""
    counts = np.zeros(profile.reference_counts.shape, dtype=np.int64)
    for j, feature in enumerate(profile.features):
        bins = data.features.get(feature, {})
        for index, label in profile.bin_labels(j):
            counts[j, index] = round(bins.get(label, 0.0))
    return counts


def _reference_confidence(profile: ReferenceProfile) -> dict[str, float]:
    bounds = [repr(float(b)) for b in CONFIDENCE_EDGES] + ["+Inf"]
    return {b: float(c) for b, c in zip(bounds, profile.confidence_counts, strict=False)}


def _quantile_bound(buckets: dict[str, float], q: float) -> float | None:
    total = sum(buckets.values())
    if total <= 0:
        return None
    running = 0.0
    for bound, count in sorted(buckets.items(), key=lambda item: float(item[0])):
        running += count
        if running >= q * total:
            return float(bound)
    return None


def error_stream(steps: list[tuple[float, float, float]]) -> Iterator[tuple[float, bool]]:
    """Per-step label counts -> a 0/1 error stream (1 = wrong), errors spread evenly inside
    each step (the order within a step is not known)."""
    for at, correct, incorrect in steps:
        c, i = round(correct), round(incorrect)
        total = c + i
        placed = 0
        for k in range(total):
            due = (k + 1) * i // total
            error = due > placed
            placed += error
            yield at, error


def accuracy_report(
    data: WindowData, baseline: float | None, config: MonitorConfig
) -> AccuracyReport:
    correct = round(data.feedback.get("correct", 0.0))
    labelled = correct + round(data.feedback.get("incorrect", 0.0))
    predicted = round(sum(data.predictions.values()))
    low = high = accuracy = None
    if labelled:
        accuracy = correct / labelled
        low, high = wilson_interval(correct, labelled)
    kind = config.detector if (config.detector != "ucb" or baseline is not None) else "ddm"
    options = {"tolerance": config.tolerance} if kind == "ucb" else {}
    detector = make_detector(kind, baseline, **options)
    seen = 0
    detected_time = None
    for at, error in error_stream(data.feedback_steps):
        detector.update(error)
        seen += 1
        if detector.drift_detected and detected_time is None:
            detected_time = at
    if detector.drift_detected:
        verdict = STALLED
    elif labelled < config.min_labels:
        verdict = INSUFFICIENT
    else:
        verdict = OK
    return AccuracyReport(
        labelled=labelled,
        correct=correct,
        accuracy=accuracy,
        wilson_low=low,
        wilson_high=high,
        predicted=predicted,
        coverage=labelled / predicted if predicted else None,
        delay_p50_s=_quantile_bound(data.delay, 0.5),
        delay_p90_s=_quantile_bound(data.delay, 0.9),
        baseline=baseline,
        tolerance=config.tolerance,
        detector=kind,
        drift_detected=detector.drift_detected,
        detected_at_label=detector.detected_at,
        detected_at=detected_time,
        history_labels=seen,
        verdict=verdict,
    )


def build_report(
    data: WindowData,
    profile: ReferenceProfile | None,
    *,
    baseline: float | None = None,
    config: MonitorConfig | None = None,
    source: str = "",
) -> MonitorReport:
    """The report of one window's numbers against the version's profile and evaluation
    accuracy (pure: no I/O)."""
    config = config or MonitorConfig()
    report = MonitorReport(
        model=data.model,
        version=data.version,
        source=source,
        window_s=data.window_s,
        end=_iso(data.end),
        verdict=OK,
        covered_s=data.covered_s,
    )
    least, rate = config.min_samples, config.false_alarm_rate
    if profile is not None:
        live = live_feature_counts(profile, data)
        report.features = feature_drift(
            profile,
            live,
            fixed_js_threshold=config.fixed_js_threshold,
            fixed_psi_threshold=config.fixed_psi_threshold,
            min_samples=least,
            false_alarm_rate=rate,
        )
        report.features.attach_histograms(
            profile.edges, profile.reference_counts, live, ~profile.categorical_mask()
        )
        reference: dict[str, float] = {k: float(v) for k, v in profile.prediction_counts.items()}
        if not reference:
            reference = {k: v * profile.n for k, v in profile.class_prior.items()}
        if reference:
            report.predictions = distribution_drift(
                "predicted_class", reference, data.predictions,
                min_samples=least, false_alarm_rate=rate,
            )  # fmt: skip
        if profile.confidence_counts:
            report.confidence = distribution_drift(
                "confidence", _reference_confidence(profile), data.confidence,
                min_samples=least, false_alarm_rate=rate,
            )  # fmt: skip
    report.accuracy = accuracy_report(data, baseline, config)
    report.n = report.features.window_n if report.features else report.accuracy.predicted
    parts = {
        "input drift": report.features,
        "prediction drift": report.predictions,
        "confidence drift": report.confidence,
    }
    report.reasons = [name for name, part in parts.items() if part and part.verdict == DRIFT]
    if report.accuracy.verdict == STALLED:
        report.reasons.append("accuracy stalled")
    inputs_unknown = report.features is None or report.features.verdict == INSUFFICIENT
    if report.reasons:
        report.verdict = ALARM
    elif inputs_unknown and report.accuracy.verdict == INSUFFICIENT:
        report.verdict = INSUFFICIENT
    return report


def monitor(
    source: MetricsSource,
    model: str,
    version: str,
    profile: ReferenceProfile | None,
    *,
    baseline: float | None = None,
    config: MonitorConfig | None = None,
) -> MonitorReport:
    """Read one window from `source` and report; a source that cannot answer gives an
    `unavailable` report with its reason, never a false alarm or a false all-clear."""
    config = config or MonitorConfig()
    try:
        data = source.window(
            model, version, config.window_s, history_s=config.history_s, step_s=config.step_s
        )
    except SourceUnavailable as exc:
        return MonitorReport(
            model=model,
            version=version,
            source=source.name,
            window_s=config.window_s,
            end=None,
            verdict=UNAVAILABLE,
            error=str(exc),
        )
    return build_report(data, profile, baseline=baseline, config=config, source=source.name)


def window_label(seconds: float) -> str:
    """900 -> "15m", 3600 -> "1h", 45 -> "45s"."""
    whole = round(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if whole >= size and whole % size == 0:
            return f"{whole // size}{unit}"
    return f"{whole}s"


class MonitorExporter:
    """A Prometheus collector of the latest report per version: `servo_drift_score{model,
    version,feature,stat}` (stat: js_distance, js_threshold, psi, chi2_p_value,
    ks_distance_bound; the predicted-class and confidence distributions appear as features
    `predicted_class` and `confidence`), `servo_accuracy{model,version,window}` and
    `servo_label_coverage{model,version,window}`."""

    STATS = ("js_distance", "js_threshold", "psi", "chi2_p_value", "ks_distance_bound")

    def __init__(self, registry: Any = None):
        self.reports: dict[tuple[str, str], MonitorReport] = {}
        if registry is not None:
            registry.register(self)

    def update(self, report: MonitorReport) -> None:
        self.reports[(report.model, report.version)] = report

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        drift = GaugeMetricFamily(
            "servo_drift_score",
            "Drift statistics of the latest monitor report, per feature.",
            labels=["model", "version", "feature", "stat"],
        )
        accuracy = GaugeMetricFamily(
            "servo_accuracy",
            "Accuracy from labels in the monitor's window.",
            labels=["model", "version", "window"],
        )
        coverage = GaugeMetricFamily(
            "servo_label_coverage",
            "Labelled / predicted rows in the monitor's window.",
            labels=["model", "version", "window"],
        )
        for (model, version), report in list(self.reports.items()):
            for part in (report.features, report.predictions, report.confidence):
                for item in part.features if part else ():
                    for stat in self.STATS:
                        value = float(getattr(item, stat))
                        drift.add_metric([model, version, item.feature, stat], value)
            window = window_label(report.window_s)
            if report.accuracy and report.accuracy.accuracy is not None:
                accuracy.add_metric([model, version, window], report.accuracy.accuracy)
            if report.accuracy and report.accuracy.coverage is not None:
                coverage.add_metric([model, version, window], report.accuracy.coverage)
        yield drift
        yield accuracy
        yield coverage
