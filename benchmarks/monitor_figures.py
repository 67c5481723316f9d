"""The README's monitor figures at their full size (a script, not a test; it takes minutes).

The tests (tests/test_report.py, tests/test_monitor.py, tests/test_detectors.py) run the
same set-ups smaller; this script runs the sizes the README names and prints the table:

  no drift (features)       200 windows of 500 rows from the reference, 64 features
  no drift (whole report)   200 calm windows, features + predictions + confidence
  0.5 sigma shift           5 of 64 features, 20 windows of 500 rows
  class prior shift         uniform -> 50% one class, 100 windows of 500 and of 200 rows
  accuracy 0.95 -> 0.80     after 1,000 labels (10 per step), 300 streams per detector
  steady accuracy           1,000 streams of 4,000 labels at 0.95, default `ucb`

each for three seeds (the tests' seed first). `--quick` runs a tenth of everything (a
smoke run, not the figures).

    python benchmarks/monitor_figures.py [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from monitors.monitor import ALARM, MonitorConfig, build_report
from monitors.profile import ReferenceProfile, fit
from monitors.report import DRIFT, feature_drift
from tests.test_monitor import CLASSES, label_steps, window

FEATURES = 64
SHIFTED = [3, 17, 30, 44, 60]


def feature_profile() -> ReferenceProfile:
    """tests/test_report.py's profile: 20,000 standard normal rows, 64 features."""
    return fit(np.random.default_rng(0).standard_normal((20_000, FEATURES)), "input")


def report_profile() -> ReferenceProfile:
    """tests/test_monitor.py's profile: 4 features, 10 classes, predictions, confidence."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, CLASSES, 20_000)
    probabilities = rng.dirichlet(np.ones(CLASSES) * 0.3, 20_000)
    return fit(
        rng.standard_normal((20_000, 4)),
        "input",
        labels=labels,
        probabilities=probabilities,
        predictions=labels,
    )


def no_drift_features(profile: ReferenceProfile, seed: int, windows: int) -> int:
    rng = np.random.default_rng(seed)
    flagged = 0
    for _ in range(windows):
        counts = profile.bin_counts(rng.standard_normal((500, FEATURES)))
        flagged += feature_drift(profile, counts).verdict == DRIFT
    return flagged


def half_sigma_shift(profile: ReferenceProfile, seed: int, windows: int) -> tuple[int, int, int]:
    rng = np.random.default_rng(seed)
    guilty = {f"input:{j}" for j in SHIFTED}
    caught = flagged = innocent = 0
    for _ in range(windows):
        rows = rng.standard_normal((500, FEATURES))
        rows[:, SHIFTED] += 0.5
        report = feature_drift(profile, profile.bin_counts(rows))
        caught += report.verdict == DRIFT
        flagged += len(report.drifted())
        innocent += len(set(report.drifted()) - guilty)
    return caught, flagged, innocent


def calm_reports(profile: ReferenceProfile, seed: int, windows: int) -> int:
    rng = np.random.default_rng(seed)
    return sum(build_report(window(profile, rng), profile).verdict == ALARM for _ in range(windows))


def prior_shift(profile: ReferenceProfile, seed: int, windows: int, rows: int) -> int:
    rng = np.random.default_rng(seed)
    detected = 0
    for _ in range(windows):
        classes = np.where(rng.random(rows) < 0.5, 3, rng.integers(0, CLASSES, rows))
        report = build_report(window(profile, rng, n=rows, classes=classes), profile)
        detected += report.verdict == ALARM and "prediction drift" in report.reasons
    return detected


def fired_at(
    profile: ReferenceProfile, detector: str, seed: int, accuracy_at: list[float]
) -> int | None:
    """tests/test_monitor.py's `detection` for one stream: the label the detector fired at."""
    rng = np.random.default_rng(seed)
    steps = label_steps(rng, accuracy_at)
    report = build_report(
        window(profile, rng, steps=steps), profile, baseline=0.95,
        config=MonitorConfig(detector=detector),
    )  # fmt: skip
    return report.accuracy.detected_at_label


def accuracy_drop(profile: ReferenceProfile, detector: str, first: int, streams: int) -> str:
    fired = [
        fired_at(profile, detector, seed, [0.95] * 100 + [0.80] * 60)
        for seed in range(first, first + streams)
    ]
    early = sum(1 for f in fired if f is not None and f <= 1000)
    delays = [f - 1000 for f in fired if f is not None and f > 1000]
    median = f"{statistics.median(delays):.0f}" if delays else "-"
    most = max(delays) if delays else "-"
    return (
        f"detected in {len(delays)} of {streams} streams, median {median} labels after the "
        f"change, at most {most}; fired before the change in {early}"
    )


def steady(profile: ReferenceProfile, first: int, streams: int) -> int:
    return sum(
        fired_at(profile, "ucb", seed, [0.95] * 400) is not None
        for seed in range(first, first + streams)
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a tenth of every size (smoke)")
    args = parser.parse_args()
    scale = 10 if args.quick else 1
    started = time.perf_counter()
    features, reports = feature_profile(), report_profile()
    rows: list[tuple[str, str]] = []

    def add(check: str, result: str) -> None:
        rows.append((check, result))
        print(f"  [{time.perf_counter() - started:6.1f} s] {check}: {result}", flush=True)

    n = 200 // scale
    flagged = [no_drift_features(features, seed, n) for seed in (1, 2, 3)]
    add(
        f"no drift: {n} windows of 500 rows from the reference, 64 features, 5% asked",
        ", ".join(f"{f} ({100 * f / n:.1f}%)" for f in flagged) + " windows flagged, seeds 1, 2, 3",
    )
    alarms = [calm_reports(reports, seed, n) for seed in (1, 2, 3)]
    add(
        f"no drift, whole report (features + predictions + confidence), {n} windows",
        ", ".join(f"{a} ({100 * a / n:.1f}%)" for a in alarms) + " alarms, seeds 1, 2, 3",
    )
    n = max(20 // scale, 2)
    shifts = [half_sigma_shift(features, seed, n) for seed in (2, 3, 4)]
    add(
        f"0.5 sigma mean shift in 5 of 64 features, {n} windows of 500 rows",
        "; ".join(
            f"flagged in {c} of {n}, innocent {i} of {f} flagged ({100 * i / max(f, 1):.1f}%)"
            for c, f, i in shifts
        )
        + " (seeds 2, 3, 4)",
    )
    n = 100 // scale
    for size in (500, 200):
        found = [prior_shift(reports, seed, n, size) for seed in (2, 3, 4)]
        add(
            f"class prior uniform -> 50% one class, {n} windows of {size} rows",
            ", ".join(f"{d} of {n}" for d in found) + " with prediction drift, seeds 2, 3, 4",
        )
    n = 300 // scale
    for detector in ("ucb", "adwin", "ddm"):
        add(
            f"accuracy 0.95 -> 0.80 after 1,000 labels, `{detector}`, {n} streams (seeds 100-)",
            accuracy_drop(reports, detector, 100, n),
        )
    n = 1000 // scale
    add(
        f"steady accuracy 0.95, `ucb`, {n} streams of 4,000 labels (seeds 300-)",
        f"alarm on {steady(reports, 300, n)} of {n}",
    )
    print()
    print("| check | result |")
    print("|---|---|")
    for check, result in rows:
        print(f"| {check} | {result} |")
    print(f"\n{time.perf_counter() - started:.0f} s in all{' (--quick)' if args.quick else ''}")


if __name__ == "__main__":
    main()
