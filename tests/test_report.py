"""Feature drift reports on seeded data: the false-alarm rate under no drift, detection of
a small shift, and honesty about small samples."""

from __future__ import annotations

import numpy as np
import pytest

from monitors.profile import fit
from monitors.report import DRIFT, INSUFFICIENT, NO_DRIFT, feature_drift

FEATURES = 64


@pytest.fixture(scope="module")
def profile() -> object:
    rng = np.random.default_rng(0)
    return fit(rng.standard_normal((20_000, FEATURES)), "input")


def test_false_alarm_rate_under_no_drift(profile: object) -> None:
    rng = np.random.default_rng(1)
    alarms = 0
    for _ in range(200):
        window = rng.standard_normal((500, FEATURES))
        report = feature_drift(profile, profile.bin_counts(window))  # type: ignore[attr-defined]
        assert report.verdict in (DRIFT, NO_DRIFT)
        alarms += report.verdict == DRIFT
    assert alarms / 200 <= 0.05, alarms


def test_half_sigma_shift_in_five_features_is_flagged_within_500_samples(profile: object) -> None:
    rng = np.random.default_rng(2)
    shifted = [3, 17, 30, 44, 60]
    guilty = {f"input:{j}" for j in shifted}
    caught = flagged = innocent = 0
    for _ in range(20):
        window = rng.standard_normal((500, FEATURES))
        window[:, shifted] += 0.5
        report = feature_drift(profile, profile.bin_counts(window))  # type: ignore[attr-defined]
        caught += report.verdict == DRIFT
        flagged += len(report.drifted())
        innocent += len(set(report.drifted()) - guilty)
    assert caught == 20
    # Benjamini-Hochberg bounds the share of innocent features among the flagged ones
    assert innocent / flagged <= 0.05, (innocent, flagged)


def test_small_windows_are_insufficient_not_calm(profile: object) -> None:
    rng = np.random.default_rng(3)
    report = feature_drift(profile, profile.bin_counts(rng.standard_normal((50, FEATURES))))  # type: ignore[attr-defined]
    assert report.verdict == INSUFFICIENT and report.features == []
    empty = feature_drift(profile, np.zeros((FEATURES, 12), dtype=np.int64))  # type: ignore[arg-type]
    assert empty.verdict == INSUFFICIENT and empty.window_n == 0


def test_report_is_plain_json_without_nan(profile: object) -> None:
    import json
    import math

    rng = np.random.default_rng(4)
    window = rng.standard_normal((400, FEATURES))
    window[:, 0] = 0.0  # a constant live feature
    doc = feature_drift(profile, profile.bin_counts(window)).to_json()  # type: ignore[attr-defined]
    text = json.dumps(doc, allow_nan=False)  # raises on NaN or Inf
    assert "NaN" not in text and "Infinity" not in text
    assert all(math.isfinite(f["psi"]) for f in doc["features"])
    assert doc["features"][0]["drifted"] is True


def test_fixed_threshold(profile: object) -> None:
    # the report's speed (20 ms goal) is measured by benchmarks/monitors.py, not asserted here
    rng = np.random.default_rng(5)
    counts = profile.bin_counts(rng.standard_normal((1000, FEATURES)))  # type: ignore[attr-defined]
    report = feature_drift(profile, counts, fixed_js_threshold=0.1)
    assert report.verdict == NO_DRIFT and {f.js_threshold for f in report.features} == {0.1}
    shifted = rng.standard_normal((1000, FEATURES))
    shifted[:, 7] += 1.0
    by_psi = feature_drift(profile, profile.bin_counts(shifted), fixed_psi_threshold=0.2)  # type: ignore[attr-defined]
    assert by_psi.drifted() == ["input:7"] and by_psi.features[7].psi > 0.2


def test_closed_form_thresholds_agree_with_simulation(profile: object) -> None:
    from sklearn.datasets import load_digits

    from monitors.report import calibrated_js_thresholds, js_thresholds

    digits = fit(load_digits().data, "input")
    for reference in (profile, digits):
        counts = reference.reference_counts.astype(float)  # type: ignore[attr-defined]
        counts[:, 0] += 1
        counts[:, -1] += 1
        for window in (100, 500, 5000):
            ratio = js_thresholds(counts, window) / calibrated_js_thresholds(counts, window)
            assert 0.93 <= float(np.median(ratio)) <= 1.07, (window, np.median(ratio))
            assert ratio.min() >= 0.8, (window, ratio.min())


def test_categorical_features_unseen_categories_and_nan() -> None:
    rng = np.random.default_rng(6)
    colour = rng.choice([0, 1, 2, 3], p=[0.4, 0.3, 0.2, 0.1], size=5000).astype(float)
    rows = np.column_stack([rng.standard_normal(5000), colour])
    reference = fit(rows, "input", categorical=[1], top_k=3)
    assert reference.categories == {"input:1": (0.0, 1.0, 2.0)}  # most frequent first
    assert [label for _, label in reference.bin_labels(1)] == ["0", "1", "2", "__other__"]
    same = np.column_stack(
        [rng.standard_normal(600), rng.choice([0, 1, 2, 3], p=[0.4, 0.3, 0.2, 0.1], size=600)]
    )
    assert feature_drift(reference, reference.bin_counts(same)).verdict == NO_DRIFT
    # categories never seen in the reference (7, 9) and NaN count as __other__
    new = same.copy()
    new[:300, 1] = rng.choice([7.0, 9.0, np.nan], size=300)
    counts = reference.bin_counts(new)
    assert counts[1, 11] >= 300 and counts[1, 3:11].sum() == 0
    report = feature_drift(reference, counts)
    assert report.drifted() == ["input:1"]
    assert all(np.isfinite([f.js_distance, f.psi, f.chi2_p_value]).all() for f in report.features)
    round_trip = type(reference).from_json(reference.to_json())
    assert round_trip.categories == reference.categories
    assert (round_trip.bin_counts(new) == counts).all()
