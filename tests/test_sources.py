"""One contract suite for both metric sources: a real Prometheus (the Debian package,
scraping a real exporter on 127.0.0.1 every second) and the embedded registry snapshots.
Both must return what the gateway's recorder counted, and a report on top of either must
say the same thing."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, start_http_server

from monitors.monitor import ALARM, OK, UNAVAILABLE, MonitorConfig, monitor
from monitors.profile import BIN_LABELS, ReferenceProfile, fit
from monitors.sources import EmbeddedSource, PrometheusSource
from serving.recorder import Recorder
from tests.prometheus import RunningPrometheus, start_prometheus
from tests.servers import free_port

MODEL = "contract"
FEATURES = 8
VERSIONS = itertools.count(1)


class Exporter:
    """The gateway's recorder on a registry served over HTTP; recording and scraping take
    one lock (the recorder itself belongs to one event loop)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.recorder = Recorder()
        self.registry = CollectorRegistry()
        self.registry.register(self)
        self.port = free_port()
        self.httpd, _ = start_http_server(self.port, addr="127.0.0.1", registry=self.registry)

    def collect(self) -> Iterator[Any]:
        with self.lock:
            families = list(self.recorder.collect())
        yield from families

    def describe(self) -> list[Any]:
        return []

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def profile() -> ReferenceProfile:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 5000)
    return fit(
        rng.standard_normal((5000, FEATURES)),
        "input",
        labels=labels,
        probabilities=rng.dirichlet(np.ones(3), 5000),
        predictions=labels,
    )


@pytest.fixture(scope="module")
def exporter() -> Iterator[Exporter]:
    running = Exporter()
    yield running
    running.close()


@pytest.fixture(scope="module")
def prometheus(exporter: Exporter, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    running = start_prometheus(
        tmp_path_factory.mktemp("prometheus"), [f"127.0.0.1:{exporter.port}"]
    )
    yield running
    running.stop()


class Scenario:
    """One fresh version, its series initialised and seen by the source before anything
    is recorded (as when a gateway loads a version)."""

    def __init__(self, kind: str, exporter: Exporter, profile: ReferenceProfile, request: Any):
        self.kind, self.exporter, self.profile = kind, exporter, profile
        self.version = str(next(VERSIONS))
        with exporter.lock:
            exporter.recorder.initialise(MODEL, self.version, profile)
            self.bins = exporter.recorder.features(MODEL, self.version, profile)
        self.prometheus: RunningPrometheus | None = None
        if kind == "prometheus":
            self.prometheus = request.getfixturevalue("prometheus")
            self.source: Any = PrometheusSource(self.prometheus.url)
            self._wait(0)
        else:
            self.source = EmbeddedSource(exporter.registry)
        self.labelled = 0

    def _wait(self, labelled: int) -> None:
        if self.prometheus is None:
            return
        promql = f'sum(servo_feedback_total{{model="{MODEL}",version="{self.version}"}})'
        self.prometheus.wait_for(
            promql, lambda result: bool(result) and float(result[0]["value"][1]) == labelled
        )

    def record(
        self,
        rows: np.ndarray[Any, Any],
        classes: np.ndarray[Any, Any],
        *,
        correct: int,
        incorrect: int,
        delays: list[float],
    ) -> None:
        probabilities = np.random.default_rng(9).dirichlet(np.ones(3), len(classes))
        with self.exporter.lock:
            recorder = self.exporter.recorder
            self.bins.add(rows)
            recorder.predictions_for((MODEL, self.version, "champion")).add(
                classes.astype(np.int64), probabilities
            )
            recorder.count(recorder.feedback, (MODEL, self.version, "correct"), correct)
            recorder.count(recorder.feedback, (MODEL, self.version, "incorrect"), incorrect)
            from serving.recorder import FEEDBACK_DELAY_BUCKETS

            delay = recorder.histogram(
                recorder.feedback_delay, (MODEL, self.version), FEEDBACK_DELAY_BUCKETS
            )
            for seconds in delays:
                delay.observe(seconds)
        self.labelled += correct + incorrect
        self._wait(self.labelled)

    def report(self, **options: Any) -> Any:
        config = MonitorConfig(window_s=60, history_s=120, step_s=5, **options)
        return monitor(self.source, MODEL, self.version, self.profile, baseline=0.9, config=config)


@pytest.fixture(params=["prometheus", "embedded"])
def scenario(
    request: pytest.FixtureRequest, exporter: Exporter, profile: ReferenceProfile
) -> Scenario:
    return Scenario(request.param, exporter, profile, request)


def test_window_counts_are_what_was_recorded(scenario: Scenario, profile: ReferenceProfile) -> None:
    rng = np.random.default_rng(1)
    rows = rng.standard_normal((600, FEATURES))
    classes = rng.integers(0, 3, 600)
    scenario.record(rows, classes, correct=80, incorrect=20, delays=[5.0, 30.0, 30.0, 7200.0])
    data = scenario.source.window(MODEL, scenario.version, 60, history_s=120, step_s=5)
    expected = profile.bin_counts(rows)
    for j, feature in enumerate(profile.features):
        got = [data.features[feature][label] for label in BIN_LABELS]
        assert np.allclose(got, expected[j]), (feature, got, expected[j])
    assert data.predictions == {
        str(c): float(n) for c, n in zip(*np.unique(classes, return_counts=True), strict=True)
    }
    assert data.feedback == {"correct": 80.0, "incorrect": 20.0}
    assert sum(data.confidence.values()) == 600
    assert {k: v for k, v in data.delay.items() if v} == {"10.0": 1.0, "60.0": 2.0, "14400.0": 1.0}
    labelled = sum(c + i for _, c, i in data.feedback_steps)
    assert 90 <= labelled <= 110, data.feedback_steps  # Prometheus extrapolates per step
    report = scenario.report()
    assert report.verdict == OK and report.exit_code == 0, report
    assert report.accuracy.labelled == 100 and report.accuracy.accuracy == 0.8
    assert report.accuracy.coverage == pytest.approx(100 / 600)
    assert report.accuracy.delay_p50_s == 60.0 and report.accuracy.delay_p90_s == 14400.0


def test_shifted_inputs_and_prior_are_flagged(scenario: Scenario) -> None:
    rng = np.random.default_rng(2)
    rows = rng.standard_normal((800, FEATURES))
    rows[:, [1, 5]] += 1.0
    classes = np.where(rng.random(800) < 0.5, 0, rng.integers(0, 3, 800))  # half class 0
    scenario.record(rows, classes, correct=5, incorrect=0, delays=[])
    report = scenario.report()
    assert report.verdict == ALARM and report.exit_code == 1
    assert "input drift" in report.reasons and "prediction drift" in report.reasons
    assert report.features.drifted() == ["input:1", "input:5"]
    assert report.accuracy.verdict == "insufficient_data"  # 5 labels say nothing


def test_a_prometheus_that_is_down_is_unavailable_not_calm(profile: ReferenceProfile) -> None:
    source = PrometheusSource(f"http://127.0.0.1:{free_port()}", timeout_s=2)
    report = monitor(source, MODEL, "1", profile, config=MonitorConfig(window_s=60))
    assert report.verdict == UNAVAILABLE and report.exit_code == 2
    assert "unreachable" in (report.error or "")
    assert report.features is None and report.accuracy is None


def test_unscraped_and_stale_versions_are_unavailable(
    prometheus: RunningPrometheus, exporter: Exporter, profile: ReferenceProfile
) -> None:
    source = PrometheusSource(prometheus.url, stale_after_s=3)
    report = monitor(source, MODEL, "never-loaded", profile)
    assert report.verdict == UNAVAILABLE and "no series" in (report.error or "")
    version = f"stale{next(VERSIONS)}"
    with exporter.lock:
        exporter.recorder.initialise(MODEL, version, profile)
    selector = f'servo_feedback_total{{model="{MODEL}",version="{version}"}}'
    prometheus.wait_for(selector, bool)
    with exporter.lock:  # the gateway stops exporting the version
        for table in (exporter.recorder.feedback, exporter.recorder.feedback_delay):
            for key in [k for k in table if k[:2] == (MODEL, version)]:
                del table[key]
    time.sleep(5)
    report = monitor(source, MODEL, version, profile)
    assert report.verdict == UNAVAILABLE, report


def test_embedded_window_longer_than_its_history_says_so(
    exporter: Exporter, profile: ReferenceProfile
) -> None:
    now = [1000.0]
    source = EmbeddedSource(exporter.registry, clock=lambda: now[0])
    now[0] += 30
    data = source.window(MODEL, "1", 900, history_s=900, step_s=60)
    assert data.window_s == 900 and data.covered_s == 30


def test_prometheus_partial_answers_are_unavailable(tmp_path: Path) -> None:
    """A Prometheus that answers with warnings (partial data) or an error status."""
    import http.server
    import json

    answers = iter(
        [
            {"status": "success", "warnings": ["remote read failed"], "data": {"result": []}},
            {"status": "error", "error": "query timed out"},
        ]
    )

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps(next(answers)).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        source = PrometheusSource(f"http://127.0.0.1:{server.server_address[1]}")
        first = monitor(source, MODEL, "1", None)
        second = monitor(source, MODEL, "1", None)
    finally:
        server.shutdown()
        server.server_close()
    assert first.verdict == UNAVAILABLE and "partial" in (first.error or "")
    assert second.verdict == UNAVAILABLE and "query timed out" in (second.error or "")


def test_embedded_history_keeps_only_the_label_stream_beyond_the_window(
    exporter: Exporter, profile: ReferenceProfile
) -> None:
    now = [1000.0]
    with exporter.lock:
        exporter.recorder.initialise(MODEL, "mem", profile)
        bins = exporter.recorder.features(MODEL, "mem", profile)
    source = EmbeddedSource(exporter.registry, full_s=120, keep_s=600, clock=lambda: now[0])
    for _ in range(20):  # 20 minutes of snapshots a minute apart
        now[0] += 60
        with exporter.lock:
            bins.add(np.zeros((10, FEATURES)))
            exporter.recorder.count(exporter.recorder.feedback, (MODEL, "mem", "correct"), 3)
        source.snapshot()
    snapshots = list(source._snapshots)
    assert len(snapshots) == 12  # 600 s kept, and the one before as their base
    whole = [t for t, _, full in snapshots if full]
    assert whole == [now[0] - 120, now[0] - 60, now[0]]
    assert all(k[0] == "servo_feedback_total" for _, v, full in snapshots if not full for k in v)
    data = source.window(MODEL, "mem", 60, history_s=600, step_s=60, fresh=False)
    assert sum(data.features["input:0"].values()) == 10 and data.covered_s == 60
    longer = source.window(MODEL, "mem", 900, history_s=600, step_s=60, fresh=False)
    assert longer.covered_s == 120  # what the whole snapshots still cover, said plainly
    assert [c for _, c, _ in longer.feedback_steps] == [3.0] * 10
