"""Monitor report speed, computation only (a script, not a timed test).

For 64 and 784 features (reference: 20,000 rows; window: 500 rows), side by side in one
run:

  plain numpy   the same per-feature statistics (JS distance, PSI, chi-square p-value,
                KS bound) as straight matrix code: no sparse-bin pooling, no thresholds,
                no multiple-testing correction, no report objects (the limit)
  feature drift `monitors.report.feature_drift` (pooling, calibrated thresholds, BH)
  full report   `monitors.monitor.build_report`: the above plus prediction and confidence
                drift, accuracy with its Wilson interval and the stall detector over
                the window's 500 labels

Goals (issue 5): full report under 20 ms at 64 features, under 100 ms at 784.

    python benchmarks/monitors.py [--repeat 50]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from scipy.special import chdtrc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from monitors.monitor import build_report
from monitors.profile import ReferenceProfile, fit
from monitors.report import feature_drift
from monitors.sources import WindowData

CLASSES = 10
GOALS_MS = {64: 20.0, 784: 100.0}


def plain_numpy(reference: np.ndarray[Any, Any], live: np.ndarray[Any, Any]) -> Any:
    p = reference / reference.sum(axis=1, keepdims=True)
    q = live / live.sum(axis=1, keepdims=True)
    m = (p + q) / 2
    with np.errstate(divide="ignore", invalid="ignore"):
        js = np.sqrt(
            (
                np.where(p > 0, p * np.log2(p / m), 0).sum(1)
                + np.where(q > 0, q * np.log2(q / m), 0).sum(1)
            )
            / 2
        )
        pc, qc = np.clip(p, 1e-4, None), np.clip(q, 1e-4, None)
        psi = ((qc - pc) * np.log(qc / pc)).sum(1)
        total = reference + live
        n_ref, n_live = reference.sum(1, keepdims=True), live.sum(1, keepdims=True)
        share = total / (n_ref + n_live)
        e_ref, e_live = share * n_ref, share * n_live
        terms = np.where(
            total > 0, (reference - e_ref) ** 2 / e_ref + (live - e_live) ** 2 / e_live, 0
        )
    chi2_p = chdtrc(np.maximum((total > 0).sum(1) - 1, 1), terms.sum(1))
    ks = np.abs(np.cumsum(p, 1) - np.cumsum(q, 1)).max(1)
    return js, psi, chi2_p, ks


def window_data(profile: ReferenceProfile, rows: np.ndarray[Any, Any], rng: Any) -> WindowData:
    counts = profile.bin_counts(rows)
    data = WindowData(model="m", version="1", window_s=900, end=time.time())
    for j, feature in enumerate(profile.features):
        data.features[feature] = {label: float(counts[j, k]) for k, label in profile.bin_labels(j)}
    classes, class_counts = np.unique(rng.integers(0, CLASSES, len(rows)), return_counts=True)
    data.predictions = {str(c): float(n) for c, n in zip(classes, class_counts, strict=True)}
    data.confidence = {"0.5": 100.0, "0.9": 200.0, "+Inf": float(len(rows) - 300)}
    correct = int((rng.random(len(rows)) < 0.95).sum())
    data.feedback = {"correct": float(correct), "incorrect": float(len(rows) - correct)}
    data.feedback_steps = [(data.end, float(correct), float(len(rows) - correct))]
    return data


def median_ms(call: Callable[[], object], repeat: int) -> float:
    call()  # warm
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=50)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    header = "| features | plain numpy ms | feature drift ms | full report ms | report / plain |"
    print(header + " goal ms |")
    print("|---:|---:|---:|---:|---:|---:|")
    for width in (64, 784):
        print(row(width, rng, args.repeat))


def row(width: int, rng: np.random.Generator, repeat: int) -> str:
    labels = rng.integers(0, CLASSES, 20_000)
    profile = fit(
        rng.standard_normal((20_000, width)),
        "input",
        labels=labels,
        probabilities=rng.dirichlet(np.ones(CLASSES), 20_000),
        predictions=labels,
    )
    rows = rng.standard_normal((500, width))
    counts = profile.bin_counts(rows)
    reference = profile.reference_counts.astype(np.float64)
    data = window_data(profile, rows, rng)
    plain = median_ms(lambda: plain_numpy(reference, counts.astype(np.float64)), repeat)
    drift = median_ms(lambda: feature_drift(profile, counts), repeat)
    full = median_ms(lambda: build_report(data, profile, baseline=0.95), repeat)
    return (
        f"| {width} | {plain:.2f} | {drift:.2f} | {full:.2f} | {full / plain:.1f}x "
        f"| {GOALS_MS[width]:.0f} |"
    )


if __name__ == "__main__":
    main()
