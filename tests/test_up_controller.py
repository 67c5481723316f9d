"""`servo up --no-serve-models`: the controller form for Kubernetes (the chart's controller
Deployment). A real `servo up` process that routes no model, next to a real gateway
(`servo serve --from-registry`) on the same registry and a real Prometheus scraping both:
infer on the controller answers the OIP unknown-model error, its /metrics carries the
loop's metrics, the admin API listens on --admin-host only, and its monitors' reports come
from Prometheus with the profile read from the version's folder (it never loaded the
model). Also: the refusal without --prometheus, and the decision logged for an admin API
bound beyond loopback."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from registry.store import RegistryStore
from servo import logs
from servo.cli import main
from servo.up import UpOptions, is_loopback, report_admin_exposure
from tests.servers import RunningServer, free_port
from tests.upservers import Up, start_up, wait_for


def test_no_serve_models_refuses_to_start_without_prometheus(tmp_path: Path) -> None:
    work = tmp_path / "s"
    result = CliRunner(env={"SERVO_PROMETHEUS_URL": None}).invoke(
        main, ["up", "--dir", str(work), "--no-serve-models", "--http-port", "0"]
    )
    assert result.exit_code == 2, result.output
    assert "--no-serve-models needs --prometheus URL" in result.output
    assert not work.exists()  # nothing created, nothing trained
    with pytest.raises(ValueError, match="needs --prometheus"):
        UpOptions(dir=work, serve_models=False, prometheus_url="")
    with pytest.raises(ValueError, match="--admin-host must not be empty"):
        UpOptions(dir=work, admin_host=" ")


def test_an_admin_api_beyond_loopback_is_a_logged_decision() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("127.0.0.2") and is_loopback("::1")
    assert is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3")
    assert not is_loopback("::") and not is_loopback("servo-controller")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        report_admin_exposure("127.0.0.1", 8082)  # loopback: nothing to say
        report_admin_exposure("0.0.0.0", 8082)
    finally:
        root.removeHandler(handler)
    (line,) = [json.loads(text) for text in stream.getvalue().splitlines()]
    assert line["event"] == "admin_api_exposed" and line["level"] == "warning"
    assert line["host"] == "0.0.0.0" and line["port"] == 8082
    assert "every admin route needs a token" in line["reason"]


def _metrics(url: str) -> str:
    return httpx.get(f"{url}/metrics", timeout=5).text


def _start_gateway(registry_url: str, http_port: int, log_path: Path) -> RunningServer:
    """`servo serve --from-registry` (the chart's gateway pod) on `http_port`."""
    with log_path.open("wb") as handle:
        process = subprocess.Popen(
            [sys.executable, "-m", "servo.cli", "serve", "--from-registry",
             "--http-port", str(http_port), "--grpc-port", str(free_port())],
            stdout=handle, stderr=subprocess.STDOUT,
            env={**os.environ, "SERVO_REGISTRY_URL": registry_url},
        )  # fmt: skip
    gateway = RunningServer(process, http_port, 0, log_path)
    wait_for(lambda: _ready(gateway))
    return gateway


def _ready(gateway: RunningServer) -> bool:
    if gateway.process.poll() is not None:
        raise RuntimeError(f"the gateway exited early:\n{gateway.log()}")
    try:
        return httpx.get(f"{gateway.url}/v2/models/digits/ready", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def _metrics_with(url: str, needle: str) -> str | None:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return text if needle in text else None


def _check_routes_nothing(up: Up, gateway: RunningServer) -> None:
    """Infer on the controller is OIP's unknown model; health is fine; the gateway serves."""
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64],
                        "data": [0.0] * 64}]}  # fmt: skip
    reply = httpx.post(f"{up.url}/v2/models/digits/infer", json=body, timeout=10)
    assert reply.status_code == 404, reply.text
    assert "digits" in reply.json()["error"]
    # the chart's probes: live (startup, liveness and readiness); ready needs a routed
    # champion, which the controller never has
    assert httpx.get(f"{up.url}/v2/health/live", timeout=5).status_code == 200
    assert httpx.get(f"{up.url}/v2/health/ready", timeout=5).status_code == 503
    assert httpx.get(f"{up.url}/v2/models/digits/ready", timeout=5).status_code != 200
    served = httpx.post(f"{gateway.url}/v2/models/digits/infer", json=body, timeout=10)
    assert served.status_code == 200, served.text


def _check_admin_on_its_host(up: Up, store: RegistryStore) -> None:
    """The admin API on --admin-host (127.0.0.2) only, behind a token."""
    token = store.create_token("ops", "viewer", actor="test")
    admin = f"http://127.0.0.2:{up.admin_port}/admin/promotions"
    assert httpx.get(admin, timeout=5).status_code == 401
    ok = httpx.get(admin, headers={"Authorization": f"Bearer {token}"}, timeout=5)
    assert ok.status_code == 200, ok.text
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{up.admin_port}/admin/promotions", timeout=5)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_the_controller_form_serves_no_model_and_monitors_through_prometheus(
    tmp_path: Path,
) -> None:
    from tests.loop_traffic import Traffic
    from tests.prometheus import binary, start_prometheus
    from tests.test_loop_e2e import write_policy

    if binary() is None:
        pytest.skip("the Debian package prometheus is not installed")
    work = tmp_path / "s"
    registry_url = f"sqlite:///{(work / 'registry.db').resolve()}"
    controller_port, gateway_port = free_port(), free_port()
    # Prometheus scrapes the gateway pod and the controller, as the chart's ServiceMonitor
    targets = [f"127.0.0.1:{gateway_port}", f"127.0.0.1:{controller_port}"]
    prometheus = start_prometheus(tmp_path / "prom", targets)
    policy = write_policy(tmp_path, "defaults:\n  check_every_s: 1\n  monitor_window_s: 30\n")
    started: list[Up | RunningServer] = []
    store = None
    try:
        up = start_up(work, tmp_path / "up.log", policy=policy, wait_model=None,
                      http_port=controller_port,
                      extra=("--no-serve-models", "--prometheus", prometheus.url,
                             "--admin-host", "127.0.0.2"))  # fmt: skip
        started.append(up)
        (event,) = wait_for(lambda: up.named("up"))
        assert event["serve_models"] is False and event["admin_host"] == "127.0.0.2"
        assert event["monitors"] == "prometheus"
        assert up.named("admin_api_exposed") == []  # 127.0.0.2 is loopback
        gateway = _start_gateway(registry_url, gateway_port, tmp_path / "gateway.log")
        started.append(gateway)
        _check_routes_nothing(up, gateway)
        # the loop's metrics on the controller's /metrics (it read the registry)
        info = 'servo_model_info{model="digits",stage="champion",version="1"} 1.0'
        metrics = wait_for(lambda: _metrics_with(up.url, info))
        assert 'servo_pipeline_runs_total{model="digits",status="succeeded",trigger="bootstrap"}' \
            in metrics  # fmt: skip
        store = RegistryStore(registry_url)
        _check_admin_on_its_host(up, store)
        # the monitors read Prometheus (which scrapes the gateway): a real verdict, with
        # the reference profile from the version's folder (the controller loaded no model)
        traffic = Traffic(gateway.url).start()
        try:
            answered = wait_for(lambda: [
                e for e in store.loop_events("digits", kinds=["check"])
                if e["detail"]["verdict"] != "unavailable"
            ])  # fmt: skip
        finally:
            traffic.stop()
        assert answered[0]["detail"]["source"] == "prometheus"
        assert answered[0]["detail"]["verdict"] in ("ok", "insufficient_data")
        # the series came from the gateway: Prometheus saw digits requests only there
        # (waited for: a verdict of insufficient_data can come before its first scrape)
        series = wait_for(lambda: prometheus.query(
            'sum by (instance) (servo_requests_total{model="digits"})'))  # fmt: skip
        assert {s["metric"]["instance"] for s in series} == {targets[0]}
    finally:
        for process in reversed(started):
            process.stop()
        prometheus.stop()
        if store is not None:
            store.close()
