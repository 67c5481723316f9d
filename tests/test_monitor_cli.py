"""`servo monitor` end to end: a real gateway serving the digits model, a real Prometheus
scraping its /metrics every second, requests and labels over HTTP, then the CLI's table,
JSON and exit codes."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from serving.recorder import FEEDBACK_DELAY_BUCKETS
from servo.demo import digits_holdout
from tests.prometheus import RunningPrometheus, start_prometheus
from tests.servers import RunningServer, free_port, start_server


@pytest.fixture(scope="module")
def gateway(model_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    running = start_server(
        [model_root / "digits" / "1"],
        tmp_path_factory.mktemp("gateway") / "server.log",
        wait_for=["digits"],
    )
    yield running
    assert running.stop() == 0, running.log()


@pytest.fixture(scope="module")
def prometheus(
    gateway: RunningServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningPrometheus]:
    running = start_prometheus(
        tmp_path_factory.mktemp("prometheus"), [f"127.0.0.1:{gateway.http_port}"]
    )
    running.wait_for('servo_feedback_total{model="digits"}', bool)  # scraped once, at zero
    yield running
    running.stop()


def servo_monitor(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "servo.cli", "monitor", "digits", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@dataclass
class Sent:
    correct: int  # labels that were correct
    #: per label, the least and the most its delay can be (Unix time, measured here)
    delay_bounds: list[tuple[float, float]] = field(default_factory=list)

    def p50_buckets(self) -> set[float]:
        """The delay histogram buckets the labels' median can land in: between the bucket
        of the median least delay and the bucket of the median most delay."""
        edges = [*FEEDBACK_DELAY_BUCKETS, math.inf]
        middle = (len(self.delay_bounds) + 1) // 2 - 1
        low = sorted(lo for lo, _ in self.delay_bounds)[middle]
        high = sorted(hi for _, hi in self.delay_bounds)[middle]
        first = next(b for b in edges if low <= b)
        last = next(b for b in edges if high <= b)
        return {b for b in edges if first <= b <= last}


def send(gateway: RunningServer, rows: np.ndarray[Any, Any], labels: np.ndarray[Any, Any]) -> Sent:
    """One request per row, then all their labels in one feedback request."""
    sent = Sent(0)
    times = []
    with httpx.Client(base_url=gateway.url, timeout=10) as client:
        feedback = []
        for i, row in enumerate(rows):
            before = time.time()
            reply = client.post(
                "/v2/models/digits/infer",
                json={
                    "id": f"row-{i}-{rows.sum():.0f}",
                    "inputs": [
                        {
                            "name": "input",
                            "shape": [1, 64],
                            "datatype": "FP32",
                            "data": row.tolist(),
                        }
                    ],
                },
            )
            times.append((before, time.time()))
            assert reply.status_code == 200, reply.text
            doc = reply.json()
            predicted = next(o for o in doc["outputs"] if o["name"] == "label")["data"][0]
            sent.correct += int(predicted == int(labels[i]))
            feedback.append({"id": doc["id"], "label": int(labels[i])})
        before = time.time()
        answer = client.post("/v2/models/digits/feedback", json=feedback)
        after = time.time()
        assert answer.status_code == 200, answer.text
    # the prediction was made between a request's send and its reply, the label between
    # the feedback's send and its answer
    sent.delay_bounds = [(before - replied, after - asked) for asked, replied in times]
    return sent


@pytest.mark.slow
def test_servo_monitor_against_a_real_gateway_and_prometheus(
    gateway: RunningServer, prometheus: RunningPrometheus, model_root: Path
) -> None:
    folder = str(model_root / "digits" / "1")
    # calm: the holdout as it is
    rows, labels = digits_holdout(seed=0)
    sent = send(gateway, rows[:300], labels[:300])
    correct = sent.correct
    prometheus.wait_for(
        'sum(servo_feedback_total{model="digits"})', lambda r: r and float(r[0]["value"][1]) == 300
    )
    calm = servo_monitor("--model-dir", folder, "--window", "5m", "--step", "5s",
                         "--source", prometheus.url, "--json")  # fmt: skip
    assert calm.returncode == 0, calm.stdout + calm.stderr
    report = json.loads(calm.stdout)
    assert report["verdict"] == "ok" and report["features"]["window_n"] == 300
    assert report["accuracy"]["labelled"] == 300
    assert report["accuracy"]["accuracy"] == pytest.approx(correct / 300)
    assert report["accuracy"]["coverage"] == pytest.approx(1.0)
    # the histogram bucket the median delay must fall in, from the times measured here
    # (1.0 when the 300 requests took under a second; a slower machine lands later)
    assert report["accuracy"]["delay_p50_s"] in sent.p50_buckets(), sent.p50_buckets()
    # drift: the same rows, a few pixels brightened
    shifted = rows[:300].copy()
    shifted[:, [10, 20, 30, 42]] = np.clip(shifted[:, [10, 20, 30, 42]] + 6, 0, 16)
    send(gateway, shifted, labels[:300])
    prometheus.wait_for(
        'sum(servo_feedback_total{model="digits"})', lambda r: r and float(r[0]["value"][1]) == 600
    )
    drift = servo_monitor("--model-dir", folder, "--window", "5m", "--source", prometheus.url)
    assert drift.returncode == 1, drift.stdout + drift.stderr
    assert "ALARM (input drift" in drift.stdout and "input:20" in drift.stdout
    # Prometheus down: cannot tell, exit 2
    down = servo_monitor("--model-dir", folder, "--source", f"http://127.0.0.1:{free_port()}")
    assert down.returncode == 2 and "UNAVAILABLE" in down.stdout and "unreachable" in down.stdout
    bad = servo_monitor("--model-dir", folder, "--window", "soon")
    assert bad.returncode == 2 and "not a duration" in bad.stderr


@pytest.mark.slow
def test_embedded_monitors_export_on_the_gateways_metrics(model_root: Path, tmp_path: Path) -> None:
    """`servo serve` runs the monitors on its own registry and exports their results on
    the same /metrics (SERVO_MONITOR_EVERY_S)."""
    running = start_server(
        [model_root / "digits" / "1"],
        tmp_path / "server.log",
        wait_for=["digits"],
        env={"SERVO_MONITOR_EVERY_S": "0.5", "SERVO_MONITOR_WINDOW_S": "120"},
    )
    try:
        rows, labels = digits_holdout(seed=0)
        shifted = rows[:300].copy()
        shifted[:, [10, 20, 30, 42]] = np.clip(shifted[:, [10, 20, 30, 42]] + 6, 0, 16)
        correct = send(running, shifted, labels[:300]).correct
        deadline = time.monotonic() + 30
        wanted = (
            'servo_drift_score{feature="input:20",model="digits",stat="js_distance",version="1"}'
        )
        while True:
            text = httpx.get(f"{running.url}/metrics", timeout=10).text
            accuracy = [
                line for line in text.splitlines()
                if line.startswith('servo_accuracy{model="digits",version="1",window="2m"}')
            ]  # fmt: skip
            if wanted in text and accuracy and float(accuracy[0].split()[-1]) == correct / 300:
                break
            assert time.monotonic() < deadline, text[-3000:]
            time.sleep(0.3)
        js = float(next(line for line in text.splitlines() if line.startswith(wanted)).split()[-1])
        threshold_line = wanted.replace("js_distance", "js_threshold")
        threshold = float(
            next(line for line in text.splitlines() if line.startswith(threshold_line)).split()[-1]
        )
        assert js > threshold
        assert "input drift" in running.log()  # the monitor's warning in the gateway's log
    finally:
        assert running.stop() == 0, running.log()


def test_servo_monitor_finds_the_champion_in_the_registry(tmp_path: Path) -> None:
    """Without --model-dir the registry names the version (the champion alias) and its
    folder; errors finding it exit 2 (cannot tell), not 1 (drift)."""
    from click.testing import CliRunner

    from registry.store import RegistryStore
    from servo.cli import main
    from servo.train import train

    url = f"sqlite:///{tmp_path / 'r.db'}"
    store = RegistryStore(url)
    store.create_schema()
    try:
        trained = train(store, work=tmp_path / "w")
        store.set_alias("digits", "champion", trained.version, actor="ops")
    finally:
        store.close()
    down = f"http://127.0.0.1:{free_port()}"
    result = CliRunner().invoke(main, ["monitor", "digits", "--registry", url, "--source", down])
    assert result.exit_code == 2, result.output
    assert result.output.startswith(f"digits version {trained.version}: UNAVAILABLE")
    unknown = CliRunner().invoke(main, ["monitor", "nope", "--registry", url, "--source", down])
    assert unknown.exit_code == 2 and "not registered" in unknown.output
    missing = CliRunner().invoke(
        main, ["monitor", "digits", "--version", "9", "--registry", url, "--source", down]
    )
    assert missing.exit_code == 2, missing.output
