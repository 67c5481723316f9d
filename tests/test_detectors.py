"""Stall detectors on seeded label streams that change at a known index (river style)."""

from __future__ import annotations

import numpy as np
import pytest

from monitors.detectors import make_detector, wilson_interval

CHANGE = 1000


def stream(seed: int) -> np.ndarray:
    """Errors at 5% (accuracy 0.95), then 20% (accuracy 0.80) from index CHANGE."""
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.random(CHANGE) < 0.05, rng.random(1000) < 0.20])


@pytest.mark.parametrize("kind", ["ddm", "adwin", "ucb"])
def test_detects_within_300_labels_and_never_before(kind: str) -> None:
    delays = []
    for seed in range(12):
        detector = make_detector(kind, baseline=0.95)
        for index, error in enumerate(stream(seed), start=1):
            detector.update(bool(error))
            if index == CHANGE:
                assert not detector.drift_detected, f"seed {seed}: false alarm before the change"
        assert detector.drift_detected, f"seed {seed}: missed"
        assert detector.detected_at is not None
        delays.append(detector.detected_at - CHANGE)
    assert max(delays) <= 300, delays
    assert min(delays) > 0


@pytest.mark.parametrize("kind", ["ddm", "adwin", "ucb", "none"])
def test_no_alarm_on_a_stable_stream(kind: str) -> None:
    rng = np.random.default_rng(42)
    detector = make_detector(kind, baseline=0.95)
    for error in rng.random(3000) < 0.05:
        detector.update(bool(error))
    assert not detector.drift_detected


def test_wilson_interval() -> None:
    low, high = wilson_interval(95, 100)
    assert 0.88 < low < 0.95 < high < 0.99
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    with pytest.raises(ValueError):
        wilson_interval(0, 0)


def test_unknown_or_incomplete_detectors_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown detector"):
        make_detector("cusum")
    with pytest.raises(ValueError, match="needs the version's evaluation accuracy"):
        make_detector("ucb")
