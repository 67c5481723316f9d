"""The canary simulation (benchmarks/canary_sim.py) runs and its numbers are sane (a
small run; the measurement is the script with its defaults: 1,000 runs, 60 minutes)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np

from retrain.judge import Counts, JudgeConfig, replay

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "canary_sim.py"


def _run(*args: str) -> str:
    run = subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120,
        check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run.stdout


def test_small_run_is_sane() -> None:
    report = json.loads(_run("--runs", "50", "--minutes", "10", "--rates", "100,1000"))
    fast, slow = report["goals"]
    assert (fast["rate"], slow["rate"], fast["runs"]) == (100, 1, 50)
    rows = {row["decider"]: row for row in fast["rows"]}
    judge, z, flagger = rows["judge"], rows["z-test"], rows["Flagger"]
    assert judge["aa_false_rollbacks"] <= 0.15  # 5 % is the bound; 50 runs are noisy
    assert judge["2x_rolled_back"] >= 0.9 and judge["2x_rollback_p50_s"] < 300
    assert judge["delta_promoted"] <= 0.15
    assert judge["no_traffic_promoted"] == 0 and judge["no_traffic_rolled_back"] == 0
    # the baselines behave as described: repeated looks inflate the z-test's false
    # rollbacks and it promotes a canary it never saw; Flagger fails checks without data
    assert z["aa_false_rollbacks"] > max(0.15, judge["aa_false_rollbacks"])
    assert z["no_traffic_promoted"] == 50
    assert flagger["no_traffic_rolled_back"] == 50
    slow_judge = next(row for row in slow["rows"] if row["decider"] == "judge")
    assert slow_judge["aa_false_rollbacks"] == 0 and slow_judge["no_traffic_promoted"] == 0
    assert slow_judge["delta_promoted"] == 0  # 1 req/s: inconclusive, never a pass
    traffic = {row["rate"]: row for row in report["traffic"]}
    assert set(traffic) == {100, 1000}
    assert traffic[1000]["2x"]["decided"] == 1 and traffic[1000]["2x"]["wrong"] == 0
    assert traffic[1000]["2x"]["p90_s"] < traffic[100]["2x"]["p90_s"]


def test_markdown_tables() -> None:
    out = _run("--runs", "5", "--minutes", "2", "--rates", "100", "--markdown")
    assert "| | judge | z-test each look | Flagger-style | goal (judge) |" in out
    assert "| A/A: false rollbacks |" in out and "| no canary traffic: promoted | 0 |" in out
    assert "#### Judge decision time vs traffic" in out and "| 100 req/s | 1 s |" in out


def _module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("canary_sim", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["canary_sim"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_vectorised_decisions_are_the_judges() -> None:
    """The benchmark's whole-stream decisions equal `retrain.judge.Judge`'s, look by look
    (the first non-hold verdict and its look): rollbacks, promotions, holds, a canary
    without traffic, and, with a floor above the 1 % base rate (negligible_rate 0.05) or
    with the floor off, steps that pass by the floor test or never pass without it."""
    sim = _module()
    scenarios = ((sim.Scenario("2x", 2.0), 100.0), (sim.Scenario("A/A", 1.0), 1000.0),
                 (sim.Scenario("none", 1.0, share=0.0), 100.0),
                 (sim.Scenario("slow", 3.0), 2.0), (sim.Scenario("half", 1.0, 0.5), 40.0),
                 (sim.Scenario("quiet", 1.0, share=0.9), 0.5))  # fmt: skip
    floors = {}
    for negligible_rate in (0.001, 0.05, 0.0):
        config = JudgeConfig(metrics=("errors",), negligible_rate=negligible_rate)
        for sc, rate in scenarios:
            counts = sim.simulate(np.random.default_rng(9), 12, sim.Stream(rate, 1.0, 600), sc)
            got = sim.judge(counts, config, 1.0)
            for run in range(counts.shape[0]):
                looks = [(0, {"errors": Counts(*map(int, row))}) for row in counts[run]]
                verdicts = replay(config, looks)
                decided = [v for v in verdicts if v.decision != "hold"]
                want = decided[0].decision if decided else "hold"
                assert got.decision[run] == want, (sc, run, negligible_rate)
                if decided:
                    assert got.seconds[run] == decided[0].looks
                    floors[negligible_rate] = floors.get(negligible_rate, 0) + int(
                        "floor e-value" in decided[0].reason
                    )
    assert floors[0.05] > 0  # the floor path was exercised, and matched
