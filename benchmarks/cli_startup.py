"""How fast the `servo` command starts, as whole processes (a script, not a timed test).

Side by side, round robin (so a load spike on a shared machine hits every command alike),
the median of N runs each:

  floor            `python -c pass` with the same interpreter (the limit)
  --version        `servo --version`
  --help           `servo --help`
  models list      `servo models list` on a registry holding one trained model
  train, first     `servo train` in a fresh work folder and registry (trains the model)
  train, cached    the same `servo train` again: every step a cache hit, nothing registered
                   (the fast path: its run recorded with sqlite3, no SQLAlchemy import)

Goals (issue 9): --help and --version under 0.3 s, models list under 0.6 s, the cached
train re-run at least 10x faster than the first run. A warm-up round runs first and is
not counted; children run without PYTHONDONTWRITEBYTECODE, so Servo's own modules are
byte-compiled once, as in any installed copy.

    python benchmarks/cli_startup.py [--repeat 7] [--train-repeat 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
GOALS_S = {"--version": 0.3, "--help": 0.3, "models list": 0.6}
CACHED_SPEEDUP = 10.0


@dataclass
class Case:
    name: str
    argv: list[str]
    #: run only in the first rounds (each run trains a model: seconds)
    rounds: int | None = None
    #: a fresh work folder per run
    fresh: bool = False
    seconds: list[float] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)
    rss_mb: list[float] = field(default_factory=list)


def servo_command() -> list[str]:
    script = Path(sys.executable).parent / "servo"
    return [str(script)] if script.exists() else [sys.executable, "-m", "servo.cli"]


def measure(argv: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, float, float]:
    """Wall seconds, CPU seconds (user + system) and peak RSS (MB) of one whole process."""
    with tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        elapsed = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            err.seek(0)
            text = err.read().decode(errors="replace")[-2000:]
            raise SystemExit(f"{' '.join(argv)} exited {proc.returncode}:\n{text}")
    return elapsed, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def train_argv(servo: list[str], work: Path) -> list[str]:
    return [*servo, "train", "--work-dir", str(work / "w"),
            "--registry", f"sqlite:///{work / 'registry.db'}"]  # fmt: skip


def run_cases(repeat: int, train_repeat: int) -> list[Case]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPATH"] = str(ROOT)
    servo = servo_command()
    with tempfile.TemporaryDirectory(prefix="servo-cli-bench-") as tmp:
        base = Path(tmp)
        cached = base / "cached"
        measure(train_argv(servo, cached), base, env)  # the cache every cached run hits
        registry = f"sqlite:///{cached / 'registry.db'}"
        cases = [
            Case("floor (python -c pass)", [sys.executable, "-c", "pass"]),
            Case("--version", [*servo, "--version"]),
            Case("--help", [*servo, "--help"]),
            Case("models list", [*servo, "models", "list", "--registry", registry]),
            Case("train, first", [], rounds=train_repeat, fresh=True),
            Case("train, cached", train_argv(servo, cached)),
        ]
        for round_ in range(repeat + 1):  # round 0: warm-up
            for case in cases:
                if case.rounds is not None and round_ > case.rounds:
                    continue
                fresh = base / f"first-{round_}"
                argv = train_argv(servo, fresh) if case.fresh else case.argv
                seconds, cpu, rss = measure(argv, base, env)
                shutil.rmtree(fresh, ignore_errors=True)
                if round_ > 0:
                    case.seconds.append(seconds)
                    case.cpu_s.append(cpu)
                    case.rss_mb.append(rss)
    return cases


def report(cases: list[Case], repeat: int, train_repeat: int) -> dict[str, Any]:
    by_name = {case.name: case for case in cases}
    floor = statistics.median(cases[0].seconds)
    first, again = by_name["train, first"], by_name["train, cached"]
    speedup = statistics.median(first.seconds) / statistics.median(again.seconds)
    cpu_speedup = statistics.median(first.cpu_s) / statistics.median(again.cpu_s)
    rows: list[dict[str, Any]] = []
    print(f"servo CLI startup, whole processes, median of {repeat} "
          f"({train_repeat} for the first training); {os.cpu_count()} cores\n")  # fmt: skip
    print(f"| {'command':<24} | median s | minus floor | min s | CPU s | RSS MB | goal"
          f"        | met |")  # fmt: skip
    print(f"|{'-' * 26}|----------|-------------|-------|-------|--------|-------------|-----|")
    for case in cases:
        median = statistics.median(case.seconds)
        goal = GOALS_S.get(case.name)
        met = "" if goal is None else ("yes" if median < goal else "NO")
        goal_text = "" if goal is None else f"< {goal} s"
        if case is again:
            goal_text = f"<= first/{CACHED_SPEEDUP:g}"
            met = "yes" if speedup >= CACHED_SPEEDUP else "NO"
        rss, cpu = max(case.rss_mb), statistics.median(case.cpu_s)
        print(f"| {case.name:<24} | {median:8.3f} | {median - floor:11.3f} | "
              f"{min(case.seconds):5.3f} | {cpu:5.3f} | {rss:6.0f} | {goal_text:<11} | "
              f"{met:<3} |")  # fmt: skip
        rows.append({"command": case.name, "median_s": median, "min_s": min(case.seconds),
                     "runs_s": case.seconds, "median_cpu_s": cpu, "max_rss_mb": rss,
                     "goal_s": goal})  # fmt: skip
    print(f"\ncached train re-run: {speedup:.1f}x faster than the first run, wall "
          f"(goal: at least {CACHED_SPEEDUP:g}x); {cpu_speedup:.1f}x in CPU time "
          f"(the first run is multi-threaded: on a loaded machine it gets more than one "
          f"share of the CPUs)")  # fmt: skip
    return {"results": rows, "speedup": speedup, "cpu_speedup": cpu_speedup}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=7, help="counted runs of each command")
    parser.add_argument("--train-repeat", type=int, default=3, help="counted first trainings")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    cases = run_cases(args.repeat, args.train_repeat)
    doc = report(cases, args.repeat, args.train_repeat)
    if args.json:
        args.json.write_text(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
