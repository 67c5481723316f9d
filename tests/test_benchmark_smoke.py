"""The serving benchmark still runs end to end (a smoke run, not a measurement)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk (Debian package) not installed")
def test_benchmark_runs_side_by_side(tmp_path: Path) -> None:
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "serving.py"),
            "--seconds",
            "1",
            "--concurrency",
            "4",
            "--models",
            "digits",
            "--protocols",
            "rest-json,rest-binary,grpc",
            "--servers",
            "kserve,servo",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((tmp_path / "serving.json").read_text())
    assert report["limits"]["digits"]["rps"] > 0
    rows = report["results"]
    assert {(r["server"], r["protocol"]) for r in rows} == {
        (s, p) for s in ("kserve", "servo") for p in ("rest-json", "rest-binary", "grpc")
    }
    for row in rows:
        assert "error" not in row, row
        assert row["rps"] > 0 and row["errors"] == 0, row
    assert "x peer (KServe)" in (tmp_path / "serving.md").read_text()


def test_monitor_benchmark_runs() -> None:
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "monitors.py"), "--repeat", "1"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = [
        line
        for line in run.stdout.splitlines()
        if line.startswith("| 64 ") or line.startswith("| 784 ")
    ]
    assert len(rows) == 2, run.stdout


def run_benchmark(name: str, *args: str) -> str:
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / name), *args],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run.stdout


def test_pipeline_benchmark_runs() -> None:
    out = run_benchmark("pipeline.py", "--repeat", "1")
    rows = [line for line in out.splitlines() if line.startswith(("| first ", "| cached "))]
    assert len(rows) == 2 and "first / cached:" in out, out


def test_payload_log_submit_benchmark_runs() -> None:
    out = run_benchmark("payload_log_submit.py", "--repeat", "1", "--calls", "300")
    assert "| submit, held |" in out and "200 of 300 submits dropped" in out, out


@pytest.mark.slow
def test_monitor_figures_benchmark_runs() -> None:
    out = run_benchmark("monitor_figures.py", "--quick")
    table = [line for line in out.splitlines() if line.startswith("| ") and "check" not in line]
    assert len(table) == 9, out
    assert "detected in 30 of 30 streams" in out and "alarm on 0 of 100" in out, out
