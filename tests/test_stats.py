"""Drift statistics: known values, edge cases without NaN, and a contract for all."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from monitors.stats import (
    InsufficientData,
    benjamini_hochberg,
    calibrated_threshold,
    chi2_p_value,
    js_distance,
    ks_distance_bound,
    psi,
)

DISTANCES = [js_distance, psi, ks_distance_bound]
ALL = [*DISTANCES, chi2_p_value]


@pytest.mark.parametrize("statistic", ALL)
def test_identical_distributions(statistic: object) -> None:
    ref = [10, 20, 30, 40]
    value = statistic(ref, [1, 2, 3, 4])  # type: ignore[operator]
    assert value == pytest.approx(1.0 if statistic is chi2_p_value else 0.0, abs=1e-12)


@pytest.mark.parametrize("statistic", ALL)
def test_empty_sides_are_insufficient_not_no_drift(statistic: object) -> None:
    with pytest.raises(InsufficientData):
        statistic([0, 0, 0], [1, 2, 3])  # type: ignore[operator]
    with pytest.raises(InsufficientData):
        statistic([1, 2, 3], [0, 0, 0])  # type: ignore[operator]


def test_known_values() -> None:
    assert js_distance([1, 0], [0, 1]) == pytest.approx(1.0)
    assert ks_distance_bound([1, 0], [0, 1]) == pytest.approx(1.0)
    # PSI of 50/50 against 75/25: (0.25-0.5)ln(0.5) + (0.75-0.5)ln(1.5)
    assert psi([50, 50], [25, 75]) == pytest.approx(0.25 * math.log(1.5) + 0.25 * math.log(2))
    assert chi2_p_value([500, 500], [250, 750]) < 1e-10


def test_constant_features_and_unseen_bins() -> None:
    constant = [0, 0, 100, 0]
    for statistic in ALL:
        value = statistic(constant, [0, 0, 7, 0])
        assert not math.isnan(value)
    assert chi2_p_value(constant, [0, 0, 7, 0]) == 1.0
    unseen = [0, 0, 100, 0], [0, 5, 95, 0]  # a bin the reference never saw
    assert psi(*unseen) > 0 and js_distance(*unseen) > 0
    # too few expected counts for a chi-square test: sparse bins are pooled, no verdict ...
    assert chi2_p_value(*unseen) == 1.0
    # ... while enough samples make the same shift significant
    assert chi2_p_value([0, 0, 1000, 0], [0, 50, 950, 0]) < 1e-6


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 1000), min_size=2, max_size=12).flatmap(
    lambda ref: st.tuples(st.just(ref), st.lists(st.integers(0, 1000), min_size=len(ref),
                                                 max_size=len(ref)))))  # fmt: skip
def test_never_nan(pair: tuple[list[int], list[int]]) -> None:
    ref, live = pair
    for statistic in ALL:
        try:
            value = statistic(ref, live)
        except InsufficientData:
            assert sum(ref) == 0 or sum(live) == 0
            continue
        assert math.isfinite(value) and value >= 0
    if sum(ref) and sum(live):
        assert 0.0 <= js_distance(ref, live) <= 1.0 and 0.0 <= chi2_p_value(ref, live) <= 1.0


def test_benjamini_hochberg() -> None:
    # the classic example: with alpha 0.05, the two smallest of these are rejected
    p = [0.01, 0.04, 0.03, 0.005, 0.5, 0.8]
    assert benjamini_hochberg(p, 0.05) == [True, False, False, True, False, False]
    assert benjamini_hochberg([0.9, 0.8], 0.05) == [False, False]
    assert benjamini_hochberg([], 0.05) == []


def test_calibration_shrinks_with_the_window() -> None:
    ref = np.array([100] * 10)
    small = calibrated_threshold(ref, 50)
    large = calibrated_threshold(ref, 5000)
    assert small > large > 0
    # a window from the reference itself rarely crosses its own threshold
    rng = np.random.default_rng(9)
    windows = rng.multinomial(500, ref / ref.sum(), size=200)
    threshold = calibrated_threshold(ref, 500, seed=1)
    false_alarms = sum(js_distance(ref, w) > threshold for w in windows)
    assert false_alarms <= 0.05 * len(windows)


def test_vectorised_chi_square_equals_scipy_on_dense_tables() -> None:
    from scipy.stats import chi2_contingency

    from monitors.stats import chi2_p_value_rows

    rng = np.random.default_rng(7)
    reference = rng.integers(50, 500, size=(40, 12))
    live = rng.integers(20, 200, size=(40, 12))
    expected = [
        chi2_contingency(np.vstack([r, c]), correction=False).pvalue
        for r, c in zip(reference, live, strict=True)
    ]
    assert np.allclose(chi2_p_value_rows(reference, live), expected, rtol=1e-9, atol=1e-300)
