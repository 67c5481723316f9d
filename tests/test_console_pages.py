"""The console's runs, rollouts and monitors pages on a real admin server (127.0.0.1) over
a real SQLite registry seeded with its own methods: real pipeline runs (one failed, with a
hostile step name and log), rollouts decided by the real judge, and the loop's check
events with the figures of real drift comparisons."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

from monitors.detectors import wilson_interval
from monitors.monitor import AccuracyReport, MonitorReport
from monitors.report import compare
from retrain.pipeline import Pipeline, Runner, Step, StepContext, StepFailed
from servo.console import pages_rollouts, pages_runs
from servo.loop import check_accuracy, check_drift
from tests.admin import Admin, running_admin
from tests.console_login import login, secured
from tests.rollouts import judged_rollout

HOSTILE_STEP = "<img src=x onerror=alert(1)>"
HOSTILE_LOG = "<script>alert(1)</script>"
NS = "{http://www.w3.org/2000/svg}"


def upper(ctx: StepContext) -> None:
    ctx.output("out").write_text(ctx.inputs["src"].read_text().upper())


def count(ctx: StepContext) -> None:
    ctx.output("n").write_text(str(len(ctx.inputs["text"].read_text())))
    ctx.metrics["length"] = float(len(ctx.inputs["text"].read_text()))


def explode(ctx: StepContext) -> None:
    raise ValueError(f"bad row: {HOSTILE_LOG}")


def pipeline(source: Path, failing: bool) -> Pipeline:
    p = (
        Pipeline("words")
        .add(Step("ingest", upper, ("out",), {"src": f"file:{source}"}))
        .add(Step("train", count, ("n",), {"text": "ingest.out"}))
    )
    if failing:
        p.add(Step(HOSTILE_STEP, explode, ("report",), {"n": "train.n"}))
    return p


def accuracy_report(correct: int, labelled: int) -> AccuracyReport:
    low, high = wilson_interval(correct, labelled)
    return AccuracyReport(
        labelled=labelled, correct=correct, accuracy=correct / labelled, wilson_low=low,
        wilson_high=high, predicted=2 * labelled, coverage=0.5, delay_p50_s=1.0,
        delay_p90_s=2.0, baseline=0.9, tolerance=0.05, detector="ddm", drift_detected=False,
        detected_at_label=None, detected_at=None, history_labels=labelled, verdict="ok",
    )  # fmt: skip


@dataclass
class Seeded:
    admin: Admin
    failed_run: int
    good_run: int
    rolled_back: int
    promoted: int


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Seeded]:
    root = tmp_path_factory.mktemp("console-pages")
    with running_admin(root / "admin") as admin:
        store = admin.store
        source = root / "words.txt"
        source.write_text("some words to count")
        runner = Runner(root / "artifacts", store)
        good = runner.run(pipeline(source, failing=False), model="digits", triggered_by="ops-1")
        with pytest.raises(StepFailed):
            runner.run(pipeline(source, failing=True), trigger="drift", model="digits")
        failed = store.runs(limit=1)[0]["id"]
        # the loop's checks of version 1: a drifting window, then the figures of real reports
        rng = np.random.default_rng(0)
        reference = rng.integers(50, 100, size=(3, 12))
        for index, shift in enumerate((0, 0, 40)):
            live = reference + rng.integers(0, 10, size=(3, 12))
            live[0, :6] += shift
            drift = compare(["age", "income", HOSTILE_LOG], reference, live)
            report = MonitorReport(
                model="digits", version="1", source="payload_log", window_s=600.0, end=None,
                verdict=drift.verdict, n=int(live.sum(axis=1).min()), features=drift,
                accuracy=accuracy_report(90 - 10 * index, 100),
            )  # fmt: skip
            detail = {"version": 1, "verdict": report.verdict, "reasons": [], "signals": []}
            parts = {"drift": check_drift(report), "accuracy": check_accuracy(report)}
            store.record_loop_event("digits", "check", {**detail, **parts})
        store.record_loop_event("digits", "check", {"version": 1, "verdict": "ok"})  # old check
        store.record_loop_event("digits", "retrain_started", {"trigger": "drift"})
        bad = judged_rollout(store, "digits", admin.version(), error_rates=(0.1, 0.02), seed=1)
        promoted = judged_rollout(store, "digits", admin.version(), error_rates=(0.0, 0.05), seed=2)
        yield Seeded(admin, failed, good.run_id, bad["id"], promoted["id"])


@pytest.fixture(scope="module")
def viewer(seeded: Seeded) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=seeded.admin.url, timeout=10) as client:
        yield login(client, seeded.admin.tokens["viewer"])


def svgs(html: str) -> list[ET.Element]:
    """Every inline SVG of a page, parsed (so each is well-formed)."""
    return [ET.fromstring(m) for m in re.findall(r"<svg\b.*?</svg>", html, flags=re.S)]


def page(client: httpx.Client, path: str, status: int = 200) -> str:
    answer = client.get(path)
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"].startswith("text/html")
    secured(answer)
    return answer.text


def test_runs_list_newest_first_with_who_started_them(seeded: Seeded, viewer: httpx.Client) -> None:
    html = page(viewer, "/console/runs")
    ids = [int(i) for i in re.findall(r'href="/console/runs/(\d+)"', html)]
    assert ids == sorted(ids, reverse=True) and ids[:2] == [seeded.failed_run, seeded.good_run]
    assert "ops-1 (by hand)" in html and "the loop (drift)" in html and ">failed<" in html
    assert page(viewer, "/console/runs?model=digits").count('href="/console/runs/') == 2
    assert 'href="/console/runs/' not in page(viewer, "/console/runs?model=nothing")
    page(viewer, "/console/runs?page=0", 400)


def test_runs_are_paginated(seeded: Seeded, viewer: httpx.Client) -> None:
    store = seeded.admin.store
    extra = [store.start_run("bulk", "schedule", {}) for _ in range(pages_runs.PER_PAGE)]
    for run_id in extra:
        store.finish_run(run_id, "succeeded")
    first, second = page(viewer, "/console/runs"), page(viewer, "/console/runs?page=2")
    shown = [re.findall(r'href="/console/runs/(\d+)"', h) for h in (first, second)]
    assert len(shown[0]) == pages_runs.PER_PAGE and "?page=2" in first
    assert [int(i) for i in shown[1]] == [seeded.failed_run, seeded.good_run]
    assert "?page=1" in second and "?page=3" not in second


def test_failed_run_page_draws_its_dag_steps_and_escaped_logs(
    seeded: Seeded, viewer: httpx.Client
) -> None:
    html = page(viewer, f"/console/runs/{seeded.failed_run}")
    (dag,) = svgs(html)
    boxes = {
        r.get("class"): r for r in dag.iter(f"{NS}rect") if r.get("class", "").startswith("step")
    }
    assert set(boxes) == {"step cached", "step failed"}  # the good run's outputs reused
    # ingest -> train from the lineage; the failed step (no artifact recorded) after train
    assert len([e for e in dag.iter(f"{NS}line") if e.get("class") == "edge"]) == 2
    assert HOSTILE_STEP not in html and HOSTILE_LOG not in html
    assert "&lt;img src=x onerror=alert(1)&gt;" in html
    assert "ValueError: bad row: &lt;script&gt;alert(1)&lt;/script&gt;" in html  # its log
    run = seeded.admin.store.run(seeded.failed_run)
    hashes = [a["content_hash"].removeprefix("sha256:")[:15] for a in run["artifacts"]]
    assert hashes and all(h in html for h in hashes)
    assert "cache hit" in html and "<td>yes</td>" in html
    good = svgs(page(viewer, f"/console/runs/{seeded.good_run}"))[0]
    assert {r.get("class") for r in good.iter(f"{NS}rect") if r.get("class")} == {"step succeeded"}


def test_step_log_is_capped_with_a_note(tmp_path: Path) -> None:
    log = tmp_path / "step.log"
    log.write_text("x" * 10 + "tail")
    shown = pages_runs.read_log(str(log), cap=6)
    assert shown == {"text": "xxtail", "note": "the last 0 KiB of 14 bytes"}
    assert pages_runs.read_log(str(tmp_path / "gone"))["text"] is None
    assert "not readable from here" in pages_runs.read_log("s3://bucket/log")["note"]
    assert pages_runs.read_log(log.as_uri())["text"] == "x" * 10 + "tail"


def test_rollout_pages_draw_e_value_paths_against_thresholds(
    seeded: Seeded, viewer: httpx.Client
) -> None:
    listed = page(viewer, "/console/rollouts")
    assert f'href="/console/rollouts/{seeded.rolled_back}"' in listed and "rolled_back" in listed
    store = seeded.admin.store
    for rollout_id, outcome in ((seeded.rolled_back, "rolled back"), (seeded.promoted, "promoted")):
        html = page(viewer, f"/console/rollouts/{rollout_id}")
        charts = svgs(html)
        assert len(charts) == 2  # errors and latency, the judged metrics
        for chart in charts:
            thresholds = [e for e in chart.iter(f"{NS}line") if e.get("class") == "threshold"]
            assert len(thresholds) == 2
            labels = [t.text for t in chart.iter(f"{NS}text")]
            assert "rollback at m/alpha = 40" in labels and outcome in labels
        assert "replayed: the same verdict at every look" in html
        doc = store.rollout(rollout_id)
        assert doc["reason"][:40] in html.replace("&lt;", "<").replace("&gt;", ">")
        assert doc["finished_at"].strftime("%Y-%m-%d %H:%M:%S") in html
    promoted = page(viewer, f"/console/rollouts/{seeded.promoted}")
    assert "advance" in promoted  # the first step's decision


def test_long_rollout_is_replayed_on_request(
    seeded: Seeded, viewer: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pages_rollouts, "REPLAY_LOOKS", 1)
    path = f"/console/rollouts/{seeded.promoted}"
    html = page(viewer, path)
    assert "replayed:" not in html and f'href="{path}?replay=1"' in html
    assert "replayed: the same verdict at every look" in page(viewer, f"{path}?replay=1")


def test_monitor_page_draws_checks_per_version_with_events(
    seeded: Seeded, viewer: httpx.Client
) -> None:
    html = page(viewer, "/console/monitors/digits")
    drift, accuracy = svgs(html)
    series = [p for p in drift.iter(f"{NS}path") if p.get("class") == "series"]
    assert [p.find(f"{NS}title").text for p in series] == [  # type: ignore[union-attr]
        "v1 largest JS distance",
        "v1 JS threshold",
    ]
    assert len([p for p in accuracy.iter(f"{NS}path") if p.get("class") == "band"]) == 1
    kinds = {e.get("class") for e in accuracy.iter(f"{NS}line") if "marker" in e.get("class", "")}
    assert {"marker retrain_started", "marker rollback", "marker promoted"} <= kinds
    assert "1 of them recorded no figures" in html
    assert HOSTILE_LOG not in html and "&lt;script&gt;" in html  # the drifted feature's name
    assert "0.700 [" in html  # the last check's accuracy with its interval
    assert 'href="/console/monitors/digits"' in page(viewer, "/console/monitors")


def test_unknown_ids_are_404_and_no_session_redirects(seeded: Seeded, viewer: httpx.Client) -> None:
    for path in ("/console/runs/999999", "/console/runs/x", "/console/rollouts/999999",
                 "/console/rollouts/0", "/console/monitors/nothing"):  # fmt: skip
        page(viewer, path, 404)
    with httpx.Client(base_url=seeded.admin.url, timeout=10) as anonymous:
        for path in ("/console/runs", "/console/rollouts/1", "/console/monitors/digits"):
            answer = anonymous.get(path)
            assert answer.status_code == 303 and answer.headers["location"] == "/console/login"
