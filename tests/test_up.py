"""`servo up` as a real process: bootstrap on an empty registry, serving from the registry,
the payload log under DIR, JSON decision logs, loop metrics on /metrics, SIGTERM shutdown
and a restart that does not bootstrap again."""

from __future__ import annotations

import io
import json
import logging
import signal
from pathlib import Path

import httpx
import pytest

from registry.store import RegistryStore
from servo import logs
from servo.demo import digits_holdout
from servo.loop_metrics import LoopMetrics
from tests.upservers import start_up, wait_for


def _infer(url: str, rows: list[list[float]]) -> httpx.Response:
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [len(rows), 64],
                        "data": [v for row in rows for v in row]}]}  # fmt: skip
    return httpx.post(f"{url}/v2/models/digits/infer", json=body, timeout=10)


MODEL_INFO = 'servo_model_info{model="digits",stage="champion",version="1"} 1.0'


def _metrics_with(url: str, needle: str) -> str | None:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return text if needle in text else None


@pytest.mark.slow
def test_up_bootstraps_serves_and_stops_cleanly(tmp_path: Path) -> None:
    directory = tmp_path / "dot-servo"
    up = start_up(directory, tmp_path / "up.log")
    try:
        boot = up.named("bootstrapped")
        assert len(boot) == 1 and boot[0]["model"] == "digits" and boot[0]["version"] == 1
        assert boot[0]["accuracy"] > 0.9
        x, y = digits_holdout()
        reply = _infer(up.url, [list(map(float, x[0])), list(map(float, x[1]))])
        assert reply.status_code == 200, reply.text
        assert reply.json()["model_version"] == "1"
        request_id = reply.json()["id"]
        assert reply.json()["outputs"][0]["data"][:2] == [int(y[0]), int(y[1])]
        # the loop state is there from the start, not from the first check (60 s)
        wait_for(lambda: up.named("watching"))
        store = RegistryStore(f"sqlite:///{(directory / 'registry.db').resolve()}")
        try:
            assert store.loop_states()["digits"]["state"] == "watching"
        finally:
            store.close()
        metrics = wait_for(lambda: _metrics_with(up.url, MODEL_INFO))
        assert 'servo_pipeline_runs_total{model="digits",status="succeeded",trigger="bootstrap"}' \
            in metrics  # fmt: skip
        assert 'servo_pipeline_step_seconds_count{step="train"} 1.0' in metrics
        # every line of the log is one JSON object (the gateway's own lines too)
        lines = [line for line in up.log().splitlines() if line.strip()]
        assert lines and all(json.loads(line)["ts"] for line in lines)
        up.process.send_signal(signal.SIGTERM)
        assert up.process.wait(timeout=60) == 0
    finally:
        up.stop()
    events = [e["event"] for e in up.events()]
    assert events.index("shutdown_started") < events.index("shutdown_finished")
    # the payload log is under DIR/payload and holds the request (flushed at exit)
    from monitors.payload_log import read_window

    table = read_window(directory / "payload", model="digits")
    assert table.column("id").to_pylist() == [request_id]
    assert (directory / "registry.db").is_file()
    # a restart on the same folder serves the same version and does not train again
    again = start_up(directory, tmp_path / "up2.log")
    try:
        assert again.named("bootstrapped") == []
        assert _infer(again.url, [list(map(float, x[0]))]).json()["model_version"] == "1"
    finally:
        assert again.stop() == 0


@pytest.mark.slow
def test_up_with_prometheus_reads_its_reports_from_prometheus(tmp_path: Path) -> None:
    from tests.loop_traffic import Traffic
    from tests.prometheus import binary, start_prometheus
    from tests.servers import free_port
    from tests.test_loop_e2e import registry, write_policy

    if binary() is None:
        pytest.skip("the Debian package prometheus is not installed")
    port = free_port()
    prometheus = start_prometheus(tmp_path / "prom", [f"127.0.0.1:{port}"])
    text = "defaults:\n  check_every_s: 1\n  monitor_window_s: 30\n"
    up = start_up(tmp_path / "s", tmp_path / "up.log", http_port=port,
                  policy=write_policy(tmp_path, text),
                  extra=("--prometheus", prometheus.url))  # fmt: skip
    store = registry(up)
    traffic = Traffic(up.url).start()
    try:
        answered = wait_for(lambda: [e for e in store.loop_events("digits", kinds=["check"])
                                     if e["detail"]["verdict"] != "unavailable"])  # fmt: skip
        assert answered[0]["detail"]["source"] == "prometheus"
        assert answered[0]["detail"]["verdict"] in ("ok", "insufficient_data")
    finally:
        traffic.stop()
        up.stop()
        prometheus.stop()
        store.close()


def test_json_log_line_carries_the_decision_fields() -> None:
    stream = io.StringIO()
    logs.configure("INFO", "json", stream=stream)
    try:
        logs.decision("retrain_skipped", model="digits", reason="cooldown", left_s=float("nan"))
        logging.getLogger("servo.serving").warning("plain %s", "line")
    finally:
        logs.configure("WARNING", "text")
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["event"] == "retrain_skipped" and first["model"] == "digits"
    assert first["reason"] == "cooldown" and first["left_s"] is None
    assert first["logger"] == "servo.loop" and first["level"] == "info"
    assert second["event"] == "plain line" and second["level"] == "warning"


def test_text_log_line_appends_fields() -> None:
    stream = io.StringIO()
    logs.configure("INFO", "text", stream=stream)
    try:
        logs.decision("alarm", model="digits", signals=["input_drift"])
    finally:
        logs.configure("WARNING", "text")
    assert stream.getvalue().rstrip().endswith('alarm model="digits" signals=["input_drift"]')


def test_bad_log_format_is_refused() -> None:
    with pytest.raises(ValueError, match="log format must be text or json, got 'xml'"):
        logs.configure("INFO", "xml")  # type: ignore[arg-type]


class _Store:
    """Answers like a registry store (the collector only reads)."""

    def __init__(self) -> None:
        self.reads = 0

    def runs(self, limit: int, recover: bool = True) -> list[dict[str, object]]:
        self.reads += 1
        return [
            {"id": 1, "model": "digits", "trigger": "input_drift", "status": "succeeded",
             "pipeline": "digits"},
            {"id": 2, "model": "digits", "trigger": "manual", "status": "running",
             "pipeline": "digits"},
        ]  # fmt: skip

    def run(self, run_id: int, recover: bool = True) -> dict[str, object]:
        return {"steps": [{"step": "train", "status": "succeeded", "duration_s": 2.5},
                          {"step": "ingest", "status": "cached", "duration_s": 0.0}]}  # fmt: skip

    def promotions(self) -> list[dict[str, object]]:
        return [{"model": "digits", "status": "rejected"}, {"model": "digits", "status": "pending"}]

    def deployments(self) -> dict[str, list[dict[str, object]]]:
        return {"digits": [{"version": 1, "role": "champion"}, {"version": 2, "role": "shadow"}]}

    def loop_states(self) -> dict[str, dict[str, object]]:
        return {"digits": {"state": "shadowing", "paused": False}}


def test_loop_metrics_collector_reads_the_registry_and_caches() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    now = [0.0]
    store = _Store()
    registry = CollectorRegistry()
    registry.register(LoopMetrics(store, ttl_s=10, clock=lambda: now[0]))
    text = generate_latest(registry).decode()
    runs = 'servo_pipeline_runs_total{model="digits",status="succeeded",trigger="input_drift"} 1.0'
    assert runs in text
    assert 'servo_pipeline_step_seconds_sum{step="train"} 2.5' in text
    assert 'step="ingest"' not in text  # a cache hit did not run
    assert 'servo_promotions_total{decision="rejected",model="digits"} 1.0' in text
    assert 'servo_model_info{model="digits",stage="shadow",version="2"} 1.0' in text
    assert 'servo_loop_state{model="digits",state="shadowing"} 1.0' in text
    assert 'servo_loop_state{model="digits",state="watching"} 0.0' in text
    generate_latest(registry)
    assert store.reads == 1  # within the ttl: the snapshot
    now[0] = 11.0
    generate_latest(registry)
    assert store.reads == 2


def test_up_refuses_a_bad_policy_file_before_starting_anything(tmp_path: Path) -> None:
    import subprocess
    import sys

    bad = tmp_path / "servo.yaml"
    bad.write_text("defaults:\n  trigger:\n    kk: 2\n")
    done = subprocess.run(
        [sys.executable, "-m", "servo.cli", "up", "--dir", str(tmp_path / "s"),
         "--policy", str(bad), "--http-port", "0", "--grpc-port", "0", "--admin-port", "0"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 1
    assert f"{bad}: defaults.trigger.kk: unknown key" in done.stderr
    assert not (tmp_path / "s" / "registry.db").exists()  # nothing trained nor created


@pytest.mark.slow
def test_a_model_deployed_later_is_watched_too(tmp_path: Path) -> None:
    from servo.train import train
    from tests.test_loop_e2e import registry, write_policy

    text = "defaults:\n  check_every_s: 1\n"
    up = start_up(tmp_path / "s", tmp_path / "up.log", policy=write_policy(tmp_path, text))
    store = registry(up)
    try:
        trained = train(store, work=tmp_path / "s", name="other", params={"seed": 3})
        store.set_deployments("other", [(trained.version, "champion", 100.0)], actor="test")
        checks = wait_for(lambda: store.loop_events("other", kinds=["check"]))
        assert checks[0]["detail"]["version"] == trained.version
        watching = [e for e in up.named("watching") if e["model"] == "other"]
        assert watching and watching[0]["check_every_s"] == 1.0
    finally:
        up.stop()
        store.close()
