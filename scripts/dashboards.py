"""Servo's Grafana dashboards, built with Grafana's own SDK (`grafana-foundation-sdk`, the
`k8s` extra) and written as JSON into charts/servo/dashboards/, which the chart embeds as
ConfigMaps for the Grafana sidecar (templates/dashboards-configmap.yaml). Never edit the
JSON by hand: change this file and run

    .venv/bin/python scripts/dashboards.py

tests/test_dashboards.py fails when the checked-in JSON differs from what this writes, and
runs every expression against a real Prometheus scraping a real gateway."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders.dashboard import (
    Dashboard,
    DatasourceVariable,
    QueryVariable,
    Row,
)
from grafana_foundation_sdk.builders.prometheus import Dataquery
from grafana_foundation_sdk.builders.timeseries import Panel
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import DataSourceRef, VariableRefresh

OUT = Path(__file__).resolve().parent.parent / "charts" / "servo" / "dashboards"
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
#: the model filter every query carries (the `model` variable, all by default)
M = 'model=~"$model"'
#: Grafana's rate window (at least four scrape intervals)
W = "$__rate_interval"
BY = "model, version, variant"
LEGEND = "{{model}} v{{version}} {{variant}}"


def panel(title: str, unit: str, *queries: tuple[str, str], description: str = "") -> Panel:
    built = Panel().title(title).unit(unit).datasource(DATASOURCE).span(12).height(8)
    if description:
        built = built.description(description)
    for expr, legend in queries:
        built = built.with_target(Dataquery().expr(expr).legend_format(legend))
    return built


def dashboard(uid: str, title: str, rows: list[tuple[str, list[Panel]]]) -> Dashboard:
    built = (
        Dashboard(title)
        .uid(uid)
        .tags(["servo"])
        .refresh("30s")
        .time("now-1h", "now")
        .timezone("browser")
        .with_variable(DatasourceVariable("datasource").label("Data source").type("prometheus"))
        .with_variable(
            QueryVariable("model")
            .label("Model")
            .datasource(DATASOURCE)
            .query("label_values(servo_requests_total, model)")
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
            .multi(True)
            .include_all(True)
            .all_value(".*")
        )
    )
    for name, panels in rows:
        built = built.with_row(Row(name))
        for item in panels:
            built = built.with_panel(item)
    return built


def serving() -> Dashboard:
    latency = f"sum by ({BY}, le) (rate(servo_request_duration_seconds_bucket{{{M}}}[{W}]))"
    return dashboard("servo-serving", "Servo / Serving", [
        ("Traffic", [
            panel("Requests per second", "reqps",
                  (f"sum by ({BY}) (rate(servo_requests_total{{{M}}}[{W}]))",
                   "{{model}} v{{version}} {{variant}}")),
            panel("Requests by protocol and code", "reqps",
                  (f"sum by (model, protocol, code) (rate(servo_requests_total{{{M}}}[{W}]))",
                   "{{model}} {{protocol}} {{code}}")),
        ]),
        ("Latency", [
            panel("Request latency p50 / p99", "s",
                  (f"histogram_quantile(0.5, {latency})", "p50 " + LEGEND),
                  (f"histogram_quantile(0.99, {latency})", "p99 " + LEGEND),
                  description="Parse to reply; the ServoLatencyP99High alert fires above 500 ms."),
            panel("Inference and queue time p99", "s",
                  ("histogram_quantile(0.99, sum by (model, version, le) "
                   f"(rate(servo_inference_duration_seconds_bucket{{{M}}}[{W}])))",
                   "inference {{model}} v{{version}}"),
                  ("histogram_quantile(0.99, sum by (model, version, le) "
                   f"(rate(servo_queue_duration_seconds_bucket{{{M}}}[{W}])))",
                   "queue {{model}} v{{version}}")),
        ]),
        ("Errors", [
            panel("5xx share", "percentunit",
                  (f'sum by ({BY}) (rate(servo_requests_total{{code=~"5..", {M}}}[{W}])) / '
                   f"sum by ({BY}) (rate(servo_requests_total{{{M}}}[{W}]))",
                   "{{model}} v{{version}} {{variant}}"),
                  description="The ServoErrorRateHigh alert fires above 5%."),
            panel("Client errors and load failures", "reqps",
                  (f'sum by ({BY}, code) (rate(servo_requests_total{{code=~"4..", {M}}}[{W}]))',
                   "{{model}} v{{version}} {{variant}} {{code}}"),
                  (f"sum by (model, version) (rate(servo_model_load_failures_total{{{M}}}[{W}]))",
                   "load failures {{model}} v{{version}}")),
        ]),
        ("Batching", [
            panel("Rows per ONNX Runtime call (mean)", "short",
                  (f"sum by (model, version) (rate(servo_batch_rows_sum{{{M}}}[{W}])) / "
                   f"sum by (model, version) (rate(servo_batch_rows_count{{{M}}}[{W}]))",
                   "{{model}} v{{version}}")),
            panel("ONNX Runtime calls per second", "ops",
                  (f"sum by (model, version) (rate(servo_batch_rows_count{{{M}}}[{W}]))",
                   "{{model}} v{{version}}")),
            panel("Payload log", "ops",
                  (f"sum (rate(servo_payload_log_records_total[{W}]))", "written"),
                  (f"sum by (reason) (rate(servo_payload_log_dropped_total[{W}]))",
                   "dropped {{reason}}")),
        ]),
    ])  # fmt: skip


def quality() -> Dashboard:
    return dashboard("servo-quality", "Servo / Quality", [
        ("Drift", [
            panel("JS distance per feature", "short",
                  (f'servo_drift_score{{stat="js_distance", {M}}}',
                   "{{model}} v{{version}} {{feature}}"),
                  (f'max by (model, version) (servo_drift_score{{stat="js_threshold", {M}}})',
                   "threshold {{model}} v{{version}}"),
                  description="The monitor's latest report; ServoDriftDetected fires while a "
                  "feature's distance is above the threshold for 15 minutes."),
            panel("PSI per feature", "short",
                  (f'servo_drift_score{{stat="psi", {M}}}', "{{model}} v{{version}} {{feature}}")),
        ]),
        ("Accuracy", [
            panel("Accuracy from labels", "percentunit",
                  (f"servo_accuracy{{{M}}}", "{{model}} v{{version}} ({{window}})"),
                  description="ServoAccuracyBelowFloor fires below 80% where coverage >= 5%."),
            panel("Label coverage", "percentunit",
                  (f"servo_label_coverage{{{M}}}", "{{model}} v{{version}} ({{window}})")),
            panel("Labels per second", "ops",
                  (f"sum by (model, version, outcome) (rate(servo_feedback_total{{{M}}}[{W}]))",
                   "{{model}} v{{version}} {{outcome}}")),
        ]),
        ("Shadow", [
            panel("Shadow agreement", "percentunit",
                  (f'sum by (model, version) (rate(servo_shadow_agreement_total{{agree="true", '
                   f"{M}}}[{W}])) / sum by (model, version) "
                   f"(rate(servo_shadow_agreement_total{{{M}}}[{W}]))",
                   "{{model}} v{{version}}")),
            panel("Shadow errors and drops", "ops",
                  (f"sum by (model, version, reason) (rate(servo_shadow_errors_total{{{M}}}[{W}]))",
                   "errors {{model}} v{{version}} {{reason}}"),
                  (f"sum by (model) (rate(servo_shadow_dropped_total{{{M}}}[{W}]))",
                   "dropped {{model}}")),
        ]),
    ])  # fmt: skip


def loop() -> Dashboard:
    return dashboard("servo-loop", "Servo / Loop", [
        ("Pipeline", [
            panel("Pipeline runs by status", "short",
                  (f"sum by (model, trigger, status) (servo_pipeline_runs_total{{{M}}})",
                   "{{model}} {{trigger}} {{status}}")),
            panel("Mean step duration", "s",
                  ("servo_pipeline_step_seconds_sum / servo_pipeline_step_seconds_count",
                   "{{step}}")),
        ]),
        ("Promotions", [
            panel("Promotions by decision", "short",
                  (f"sum by (model, decision) (servo_promotions_total{{{M}}})",
                   "{{model}} {{decision}}")),
            panel("Deployed versions", "short",
                  (f"sum by (model, stage) (servo_model_info{{{M}}})", "{{model}} {{stage}}")),
            panel("Loop state", "short",
                  (f"servo_loop_state{{{M}}} == 1", "{{model}} {{state}}")),
        ]),
        ("Rollouts", [
            panel("Canary share of traffic", "percent",
                  (f"servo_rollout_canary_percent{{{M}}}", "{{model}}")),
            panel("Canary judge e-values", "short",
                  (f"servo_rollout_e_value{{{M}}}", "{{model}} {{test}} {{metric}}"),
                  description="Rollback or promotion is decided when an e-value passes 1/alpha."),
            panel("Rollout held", "short",
                  (f"servo_rollout_held{{{M}}}", "{{model}}"),
                  description="1 while a step is past its timeout undecided (ServoCanaryHeld)."),
        ]),
    ])  # fmt: skip


DASHBOARDS = {"serving": serving, "quality": quality, "loop": loop}


def render() -> dict[str, str]:
    """File name -> JSON text of each dashboard, as checked in."""
    out = {}
    for name, build in DASHBOARDS.items():
        text = JSONEncoder(sort_keys=True, indent=2).encode(build().build())
        out[f"servo-{name}.json"] = text + "\n"
    return out


def expressions(document: dict[str, Any]) -> list[str]:
    """Every PromQL expression of a dashboard's panels."""
    return [t["expr"] for p in document["panels"] for t in p.get("targets", ()) if "expr" in t]


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, text in render().items():
        (OUT / name).write_text(text)
        print(f"wrote {OUT / name} ({len(expressions(json.loads(text)))} expressions)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
