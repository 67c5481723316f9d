"""Metrics as named in DESIGN.md, kept in plain dicts on the event loop and exposed by one
custom collector on the `CollectorRegistry` passed in (no global registry, no locks on
the hot path)."""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric

from monitors.profile import BIN_LABELS, N_BINS, ReferenceProfile

LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
)  # fmt: skip
ROWS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
#: seconds from a prediction to its label: 1 s .. 1 week
FEEDBACK_DELAY_BUCKETS = (1.0, 10.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0, 86400.0, 7 * 86400.0)
CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)


class Histogram:
    __slots__ = ("buckets", "counts", "total")

    def __init__(self, buckets: Sequence[float]):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value

    def observe_many(self, values: npt.NDArray[Any]) -> None:
        index = np.searchsorted(self.buckets, values, side="left")
        for i, n in enumerate(np.bincount(index, minlength=len(self.counts)).tolist()):
            self.counts[i] += n
        self.total += float(values.sum())

    def cumulative(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip(self.buckets, self.counts, strict=False):
            running += count
            out.append((repr(float(bound)), running))
        out.append(("+Inf", running + self.counts[-1]))
        return out


Labels = tuple[str, ...]


class FeatureBins:
    """Live counts of one version's input rows in its reference profile's bins. Rows are
    buffered and binned in bulk (one vectorised pass per `flush_rows` rows, and before
    every scrape), never one Python call per feature per request."""

    def __init__(self, profile: ReferenceProfile, flush_rows: int = 2048):
        self.profile = profile
        self.flush_rows = flush_rows
        self.counts = np.zeros((len(profile.features), N_BINS), dtype=np.int64)
        self._pending: list[npt.NDArray[Any]] = []
        self._pending_rows = 0

    def add(self, rows: npt.NDArray[Any]) -> None:
        self._pending.append(rows)
        self._pending_rows += rows.shape[0] if rows.ndim else 1
        if self._pending_rows >= self.flush_rows:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        width = len(self.profile.features)
        batch = np.concatenate([p.reshape(-1, width) for p in self._pending])
        self._pending, self._pending_rows = [], 0
        self.counts += self.profile.bin_counts(batch)


class ModelMetrics:
    """One model version's inference, queue and batch-size histograms, looked up once."""

    __slots__ = ("inference", "queue", "rows")

    def __init__(self, recorder: Recorder, model: str, version: str):
        labels = (model, version)
        self.inference = recorder.histogram(recorder.inference, labels, LATENCY_BUCKETS)
        self.queue = recorder.histogram(recorder.queue, labels, LATENCY_BUCKETS)
        self.rows = recorder.histogram(recorder.batch_rows, labels, ROWS_BUCKETS)

    def call(self, rows: int, seconds: float) -> None:
        # Histogram.observe inlined twice: this runs once per ONNX Runtime call
        inference, batch = self.inference, self.rows
        inference.counts[bisect.bisect_left(inference.buckets, seconds)] += 1
        inference.total += seconds
        batch.counts[0 if rows <= 1 else bisect.bisect_left(batch.buckets, rows)] += 1
        batch.total += rows

    def queued(self, seconds: float) -> None:
        self.queue.observe(seconds)


class Predictions:
    """Predicted classes and top-class confidence of one (model, version, variant), buffered
    and counted in bulk (every `flush_rows` rows and before every scrape)."""

    def __init__(self, recorder: Recorder, labels: Labels, flush_rows: int = 2048):
        self.recorder = recorder
        self.labels = labels
        self.flush_rows = flush_rows
        self._classes: list[npt.NDArray[Any]] = []
        self._probabilities: list[npt.NDArray[Any]] = []
        self._rows = 0

    def add(self, classes: npt.NDArray[Any] | None, probabilities: npt.NDArray[Any] | None) -> None:
        if classes is not None:
            self._classes.append(classes)
            self._rows += classes.shape[0] if classes.ndim else 1
        if probabilities is not None and probabilities.ndim == 2:
            self._probabilities.append(probabilities)
            self._rows += probabilities.shape[0]
        if self._rows >= self.flush_rows:
            self.flush()

    def flush(self) -> None:
        classes, probabilities = self._classes, self._probabilities
        self._classes, self._probabilities, self._rows = [], [], 0
        if classes:
            flat = np.concatenate([c.reshape(-1) for c in classes])
            values, counts = np.unique(flat, return_counts=True)
            table = self.recorder.predictions
            for value, count in zip(values.tolist(), counts.tolist(), strict=True):
                key = (*self.labels, _class_name(value))
                table[key] = table.get(key, 0) + count
        if probabilities:
            top = np.concatenate(probabilities).max(axis=1)
            if top.size:
                histogram = self.recorder.histogram(
                    self.recorder.confidence, self.labels, CONFIDENCE_BUCKETS
                )
                histogram.observe_many(top)


class Recorder:
    """Counters and histograms by label tuple; `collect()` renders them for Prometheus."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.requests: dict[Labels, int] = {}  # model, version, variant, protocol, code
        self.duration: dict[Labels, Histogram] = {}  # model, version, variant, protocol
        self.inference: dict[Labels, Histogram] = {}  # model, version
        self.queue: dict[Labels, Histogram] = {}  # model, version
        self.batch_rows: dict[Labels, Histogram] = {}  # model, version
        self.predictions: dict[Labels, int] = {}  # model, version, variant, class
        self.confidence: dict[Labels, Histogram] = {}  # model, version, variant
        self.shadow_agreement: dict[Labels, int] = {}  # model, version, agree
        self.shadow_errors: dict[Labels, int] = {}  # model, version, reason
        self.shadow_dropped: dict[Labels, int] = {}  # model
        self.feature_bins: dict[Labels, FeatureBins] = {}  # model, version
        self.prediction_sinks: dict[Labels, Predictions] = {}  # model, version, variant
        self.feedback: dict[Labels, int] = {}  # model, version, outcome
        self.feedback_unmatched: dict[Labels, int] = {}  # model
        self.feedback_delay: dict[Labels, Histogram] = {}  # model, version
        self.load_failures: dict[Labels, int] = {}  # model, version (routed versions only)
        self.payload_log: Any = None  # a PayloadLog, read at scrape time
        if registry is not None:
            registry.register(self)

    # recording (event loop only)

    def request(self, labels: Labels, code: str, seconds: float) -> None:
        histogram = self.duration.get(labels)
        if histogram is None:
            histogram = self.duration[labels] = Histogram(LATENCY_BUCKETS)
        histogram.counts[bisect.bisect_left(histogram.buckets, seconds)] += 1
        histogram.total += seconds
        key = (*labels, code)
        self.requests[key] = self.requests.get(key, 0) + 1

    def histogram(
        self, table: dict[Labels, Histogram], labels: Labels, buckets: Sequence[float]
    ) -> Histogram:
        histogram = table.get(labels)
        if histogram is None:
            histogram = table[labels] = Histogram(buckets)
        return histogram

    def predictions_for(self, labels: Labels) -> Predictions:
        sink = self.prediction_sinks.get(labels)
        if sink is None:
            sink = self.prediction_sinks[labels] = Predictions(self, labels)
        return sink

    def count(self, table: dict[Labels, int], labels: Labels, n: int = 1) -> None:
        table[labels] = table.get(labels, 0) + n

    # exposition

    def collect(self) -> Iterator[Metric]:
        for sink in list(self.prediction_sinks.values()):
            sink.flush()
        yield _counter(
            "servo_requests", "Inference requests by outcome code.",
            ["model", "version", "variant", "protocol", "code"], self.requests,
        )  # fmt: skip
        yield _histogram(
            "servo_request_duration_seconds", "Request latency, parse to reply.",
            ["model", "version", "variant", "protocol"], self.duration,
        )  # fmt: skip
        yield _histogram(
            "servo_inference_duration_seconds", "ONNX Runtime time per call.",
            ["model", "version"], self.inference,
        )  # fmt: skip
        yield _histogram(
            "servo_queue_duration_seconds", "Time a request waited for its batch.",
            ["model", "version"], self.queue,
        )  # fmt: skip
        yield _histogram(
            "servo_batch_rows", "Rows per ONNX Runtime call.", ["model", "version"],
            self.batch_rows,
        )  # fmt: skip
        yield _counter(
            "servo_prediction", "Predicted classes.", ["model", "version", "variant", "class"],
            self.predictions,
        )  # fmt: skip
        yield _histogram(
            "servo_prediction_confidence", "Top class probability per row.",
            ["model", "version", "variant"], self.confidence,
        )  # fmt: skip
        yield _counter(
            "servo_shadow_agreement", "Shadow copies that agreed with the champion.",
            ["model", "version", "agree"], self.shadow_agreement,
        )  # fmt: skip
        yield _counter(
            "servo_shadow_errors", "Shadow copies that failed or timed out.",
            ["model", "version", "reason"], self.shadow_errors,
        )  # fmt: skip
        yield self._feature_family()
        yield _counter(
            "servo_feedback", "Labelled rows by outcome, for the version that answered.",
            ["model", "version", "outcome"], self.feedback,
        )  # fmt: skip
        yield _histogram(
            "servo_feedback_delay_seconds", "Time from a prediction to its label.",
            ["model", "version"], self.feedback_delay,
        )  # fmt: skip
        yield _counter(
            "servo_feedback_unmatched", "Labels whose prediction id was not found (stored).",
            ["model"], self.feedback_unmatched,
        )  # fmt: skip
        yield _counter(
            "servo_model_load_failures", "Failed loads of a routed model version.",
            ["model", "version"], self.load_failures,
        )  # fmt: skip
        log = self.payload_log
        dropped = CounterMetricFamily(
            "servo_payload_log_dropped", "Payload log records dropped.", labels=["reason"]
        )
        written = CounterMetricFamily("servo_payload_log_records", "Payload log records written.")
        errors = CounterMetricFamily("servo_payload_log_write_errors", "Failed file writes.")
        if log is not None:
            dropped.add_metric(["queue_full"], log.dropped_full)
            dropped.add_metric(["write_error"], log.dropped_error)
            written.add_metric([], log.written)
            errors.add_metric([], log.write_errors)
        yield dropped
        yield written
        yield errors
        yield _counter(
            "servo_shadow_dropped", "Shadow copies dropped because too many were pending.",
            ["model"], self.shadow_dropped,
        )  # fmt: skip

    def initialise(self, model: str, version: str, profile: ReferenceProfile | None) -> None:
        """Series the monitors take `increase()` of start at zero when a version loads:
        Prometheus cannot count the first value of a series it first sees mid-window."""
        for outcome in ("correct", "incorrect"):
            self.feedback.setdefault((model, version, outcome), 0)
        self.histogram(self.feedback_delay, (model, version), FEEDBACK_DELAY_BUCKETS)
        if profile is not None:
            for variant in ("champion", "canary", "shadow"):
                for name in profile.prediction_counts or profile.class_prior:
                    self.predictions.setdefault((model, version, variant, name), 0)
                if profile.confidence_counts:
                    labels = (model, version, variant)
                    self.histogram(self.confidence, labels, CONFIDENCE_BUCKETS)

    def features(self, model: str, version: str, profile: ReferenceProfile) -> FeatureBins:
        bins = self.feature_bins.get((model, version))
        if bins is None or bins.profile is not profile:
            bins = self.feature_bins[(model, version)] = FeatureBins(profile)
        return bins

    def describe(self) -> list[Metric]:
        return []

    def _feature_family(self) -> Metric:
        family = CounterMetricFamily(
            "servo_feature_bin",
            "Input rows per feature and reference-profile bin (under, 0..9, over).",
            labels=["model", "version", "feature", "bin"],
        )
        for (model, version), bins in list(self.feature_bins.items()):
            bins.flush()
            profile = bins.profile
            for j, (feature, row) in enumerate(
                zip(profile.features, bins.counts.tolist(), strict=True)
            ):
                if feature in profile.categories:  # the categories and __other__
                    for index, label in profile.bin_labels(j):
                        family.add_metric([model, version, feature, label], row[index])
                else:
                    for label, value in zip(BIN_LABELS, row, strict=True):
                        family.add_metric([model, version, feature, label], value)
        return family


def _class_name(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value.item() if hasattr(value, "item") else value)


def _counter(name: str, doc: str, labels: list[str], values: dict[Labels, int]) -> Metric:
    family = CounterMetricFamily(name, doc, labels=labels)
    for key, value in list(values.items()):
        family.add_metric(list(key), value)
    return family


def _histogram(name: str, doc: str, labels: list[str], values: dict[Labels, Histogram]) -> Metric:
    family = HistogramMetricFamily(name, doc, labels=labels)
    for key, histogram in list(values.items()):
        family.add_metric(list(key), histogram.cumulative(), histogram.total)
    return family
