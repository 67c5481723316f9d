"""The chart's Prometheus alert rules (charts/servo/rules/servo-alerts.yaml) checked with
the real promtool (Debian package `prometheus`): the rules load, every alert fires on
the series its unit test builds to fire it and stays quiet on the one built not to, a
rules file with a changed threshold fails those tests, and every metric the rules and
their tests name is one a real gateway (or the loop's collector) exposes."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest

from registry.store import RegistryStore
from servo.demo import export_digits
from servo.loop_metrics import LoopMetrics
from tests.servers import start_server
from tests.test_routing import BODY

RULES_DIR = Path(__file__).resolve().parent.parent / "charts" / "servo" / "rules"
RULES = RULES_DIR / "servo-alerts.yaml"
RULES_TEST = RULES_DIR / "servo-alerts.test.yaml"

#: PromQL words that are not metric names
KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "offset", "bool",
            "group_left", "group_right", "inf", "nan"}  # fmt: skip
#: the sample names each `# TYPE NAME type` line of the text format yields (a counter's
#: NAME already ends in _total there)
SUFFIXES = {"counter": ("",), "gauge": ("",), "summary": ("_count", "_sum"),
            "histogram": ("_bucket", "_count", "_sum"), "untyped": ("",)}  # fmt: skip


def promtool() -> str:
    exe = shutil.which("promtool")
    if exe is None:
        pytest.skip("promtool (Debian package prometheus, scripts/test-deps.sh) is not installed")
    return exe


def run_promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *map(str, args)], capture_output=True, text=True, timeout=60, check=False
    )


def alerts() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"] if "alert" in rule]


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers outside `{...}`, label
    lists and strings that are neither function calls, keywords nor durations."""
    text = re.sub(r'"[^"]*"', "", expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\boffset\s+\w+", " ", text)
    names = set(re.findall(r"(?<![\w.])([A-Za-z_:][\w:]*)(?![\w:])(?!\s*\()", text))
    return {n for n in names if n.lower() not in KEYWORDS}


def exposed_names(exposition: str) -> set[str]:
    """Sample names from the `# TYPE` lines (families without samples yet included)."""
    names = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", exposition, flags=re.M):
        names.update(name + suffix for suffix in SUFFIXES[kind])
    return names


def test_the_rules_load() -> None:
    result = run_promtool("check", "rules", RULES)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in result.stdout


def test_every_alert_has_for_severity_and_annotations_with_labels() -> None:
    names = [rule["alert"] for rule in alerts()]
    assert len(names) == len(set(names)) == 9
    for rule in alerts():
        assert "for" in rule, rule["alert"]
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        for key in ("summary", "description"):
            assert "$labels." in rule["annotations"][key], (rule["alert"], key)


def test_each_alert_fires_on_its_series_and_not_on_the_quiet_ones() -> None:
    tests = yaml.safe_load(RULES_TEST.read_text())["tests"]
    for name in (rule["alert"] for rule in alerts()):
        checks = [c for t in tests for c in t["alert_rule_test"] if c["alertname"] == name]
        assert any(c["exp_alerts"] for c in checks), f"{name}: no series built to fire it"
        assert any(not c["exp_alerts"] for c in checks), f"{name}: no series built not to"
        assert all("exp_annotations" in a for c in checks for a in c["exp_alerts"]), name
    result = run_promtool("test", "rules", RULES_TEST)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def broken_copy(tmp_path: Path, alert: str, old: str, new: str) -> Path:
    """The rules with `old` replaced by `new` in `alert`'s expression, and only the unit
    tests of that alert (promtool runs all of a file's tests)."""
    doc = yaml.safe_load(RULES.read_text())
    (rule,) = [r for g in doc["groups"] for r in g["rules"] if r.get("alert") == alert]
    assert old in rule["expr"], (alert, old)
    rule["expr"] = rule["expr"].replace(old, new)
    (tmp_path / RULES.name).write_text(yaml.safe_dump(doc, sort_keys=False))
    tests = yaml.safe_load(RULES_TEST.read_text())
    tests["tests"] = [
        t for t in tests["tests"] if any(c["alertname"] == alert for c in t["alert_rule_test"])
    ]
    path = tmp_path / RULES_TEST.name
    path.write_text(yaml.safe_dump(tests, sort_keys=False))
    return path


@pytest.mark.parametrize(
    ("alert", "old", "new"),
    [
        ("ServoErrorRateHigh", ") > 0.05", ") > 0.10"),  # the 9% series no longer fires
        ("ServoAccuracyBelowFloor", ">= 0.05", ">= 0.005"),  # 1% coverage now fires
        ("ServoCanaryRolledBack", "offset 15m", "offset 5m"),  # a first rollback missed
    ],
)
def test_a_changed_rule_fails_its_unit_tests(
    tmp_path: Path, alert: str, old: str, new: str
) -> None:
    unchanged = broken_copy(tmp_path, alert, old, old)
    result = run_promtool("test", "rules", unchanged)
    assert result.returncode == 0, result.stdout + result.stderr
    broken = broken_copy(tmp_path, alert, old, new)
    result = run_promtool("test", "rules", broken)
    assert result.returncode != 0, result.stdout
    assert f"alertname: {alert}" in result.stdout + result.stderr


def test_the_metric_names_are_the_ones_servo_exposes(tmp_path: Path) -> None:
    """Compared with a real gateway's /metrics (a model loaded and answered, embedded
    monitors and payload log on) and the loop's collector over a real registry."""
    export_digits(tmp_path / "models" / "digits" / "1", version="1", seed=0)
    server = start_server(
        [tmp_path / "models" / "digits" / "1"],
        tmp_path / "server.log",
        wait_for=["digits"],
        env={"SERVO_PAYLOAD_LOG_DIR": str(tmp_path / "payloads"), "SERVO_MONITOR_EVERY_S": "60"},
    )
    try:
        reply = httpx.post(f"{server.url}/v2/models/digits/infer", content=BODY)
        assert reply.status_code == 200, reply.text
        exposition = httpx.get(f"{server.url}/metrics").text
    finally:
        assert server.stop() == 0, server.log()
    store = RegistryStore(f"sqlite:///{tmp_path / 'registry.db'}")
    store.create_schema()
    try:
        registry = CollectorRegistry()
        registry.register(LoopMetrics(store, ttl_s=0))
        exposition += generate_latest(registry).decode()
    finally:
        store.close()
    exposed = exposed_names(exposition)
    assert {"servo_requests_total", "servo_drift_score", "servo_rollout_held"} <= exposed
    used = set().union(*(metric_names(rule["expr"]) for rule in alerts()))
    assert len(used) >= 9 and not used - exposed, sorted(used - exposed)
    tests = yaml.safe_load(RULES_TEST.read_text())["tests"]
    series = {s["series"].split("{")[0] for t in tests for s in t["input_series"]}
    assert series == used


def test_metric_names_are_read_from_expressions() -> None:
    expr = (
        'sum by (model, le) (rate(a_bucket{code=~"5.."}[5m])) / on (model) b > 0.5 '
        "and c unless d offset 1h or histogram_quantile(0.99, e)"
    )
    assert metric_names(expr) == {"a_bucket", "b", "c", "d", "e"}


def test_the_chart_s_prometheus_rule_carries_the_rules_file() -> None:
    """templates/prometheusrule.yaml embeds the rules file unchanged, off by default."""
    chart = RULES_DIR.parent
    if not (chart / "Chart.yaml").exists():
        pytest.skip(f"{chart / 'Chart.yaml'} is absent: the rest of the chart is not merged")
    helm = chart.parent.parent / ".tools" / "helm"
    if not helm.exists():
        pytest.fail(f"{helm} is missing: run `bash scripts/test-deps.sh helm` (make test does)")

    def render(*args: str) -> list[dict[str, Any]]:
        result = subprocess.run(
            # the controller needs its Prometheus (the chart refuses to render without it)
            [str(helm), "template", "rel", str(chart),
             "--set", "controller.prometheusUrl=http://prometheus:9090", *args],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        return [doc for doc in yaml.safe_load_all(result.stdout) if doc]

    assert not [d for d in render() if d["kind"] == "PrometheusRule"]
    on = ["--set", "monitoring.prometheusRule.enabled=true",
          "--set", "monitoring.prometheusRule.labels.release=prometheus"]  # fmt: skip
    (rule,) = [d for d in render(*on) if d["kind"] == "PrometheusRule"]
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["labels"]["release"] == "prometheus"
    assert rule["spec"] == yaml.safe_load(RULES.read_text())
