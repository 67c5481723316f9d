"""Drift statistics on bin counts: pure functions, each named for its direction.

Every function takes the reference's and the live window's counts over the same bins.
An empty side raises `InsufficientData` (a report says "insufficient data", never "no
drift"); empty bins, constant features and bins unseen in the reference never produce NaN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

Counts = npt.ArrayLike


class InsufficientData(ValueError):
    """A window (or a reference) without samples: nothing can be said."""


@dataclass(frozen=True)
class Statistic:
    name: str
    #: "distance": larger means more drift; "p_value": smaller means more drift
    direction: str
    #: the fixed threshold when no calibration is asked for
    default_threshold: float


JS_DISTANCE = Statistic("js_distance", "distance", 0.1)
PSI = Statistic("psi", "distance", 0.2)
CHI2_P_VALUE = Statistic("chi2_p_value", "p_value", 0.05)
KS_BOUND = Statistic("ks_distance_bound", "distance", 0.1)


def _pair(
    reference: Counts, live: Counts
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    ref = np.asarray(reference, dtype=np.float64)
    cur = np.asarray(live, dtype=np.float64)
    if ref.shape != cur.shape or ref.ndim != 1:
        raise ValueError(f"counts must be 1-D and the same shape, got {ref.shape} and {cur.shape}")
    if (
        (ref < 0).any()
        or (cur < 0).any()
        or not (np.isfinite(ref).all() and np.isfinite(cur).all())
    ):
        raise ValueError("counts must be finite and non-negative")
    if ref.sum() == 0 or cur.sum() == 0:
        raise InsufficientData("a side has no samples")
    return ref / ref.sum(), cur / cur.sum()


def js_distance(reference: Counts, live: Counts) -> float:
    """Jensen-Shannon distance (base 2): 0 identical, 1 disjoint."""
    p, q = _pair(reference, live)
    m = (p + q) / 2

    def kl(a: npt.NDArray[np.float64]) -> float:
        mask = a > 0
        return float(np.sum(a[mask] * np.log2(a[mask] / m[mask])))

    divergence = max(0.0, (kl(p) + kl(q)) / 2)
    return min(1.0, math.sqrt(divergence))


def psi(reference: Counts, live: Counts, epsilon: float = 1e-4) -> float:
    """Population stability index, with empty bins smoothed by `epsilon`."""
    p, q = _pair(reference, live)
    p, q = np.clip(p, epsilon, None), np.clip(q, epsilon, None)
    return float(np.sum((q - p) * np.log(q / p)))


def chi2_p_value(reference: Counts, live: Counts, min_expected: float = 5.0) -> float:
    """Chi-square test that both samples come from one distribution (homogeneity). Bins
    whose expected count is under `min_expected` are pooled first (Cochran's rule), so
    sparse tail bins cannot make the test anti-conservative."""
    from scipy.stats import chi2_contingency

    ref = np.asarray(reference, dtype=np.float64)
    cur = np.asarray(live, dtype=np.float64)
    _pair(ref, cur)
    pooled_share = (ref + cur) / (ref.sum() + cur.sum())
    expected = np.minimum(ref.sum(), cur.sum()) * pooled_share
    sparse = expected < min_expected
    if sparse.any():
        ref = np.append(ref[~sparse], ref[sparse].sum())
        cur = np.append(cur[~sparse], cur[sparse].sum())
        tail = (ref[-1] + cur[-1]) / (ref.sum() + cur.sum()) * min(ref.sum(), cur.sum())
        if tail < min_expected and len(ref) > 1:  # still sparse: fold into the smallest bin
            smallest = int(np.argmin(ref[:-1] + cur[:-1]))
            ref[smallest] += ref[-1]
            cur[smallest] += cur[-1]
            ref, cur = ref[:-1], cur[:-1]
    used = (ref + cur) > 0
    if used.sum() < 2:
        return 1.0  # everything in one bin on both sides: the same distribution
    result = chi2_contingency(np.vstack([ref[used], cur[used]]), correction=False)
    return float(result.pvalue)


def ks_distance_bound(reference: Counts, live: Counts) -> float:
    """The largest CDF gap at the bin edges: a lower bound of the two-sample KS statistic
    that the raw values would give (binning can only hide differences)."""
    p, q = _pair(reference, live)
    return float(np.max(np.abs(np.cumsum(p) - np.cumsum(q))))


def benjamini_hochberg(p_values: list[float], alpha: float = 0.05) -> list[bool]:
    """Which hypotheses to reject at false discovery rate `alpha`."""
    m = len(p_values)
    if m == 0:
        return []
    order = np.argsort(p_values)
    ranked = np.asarray(p_values)[order]
    below = ranked <= alpha * (np.arange(1, m + 1) / m)
    cutoff = int(np.max(np.nonzero(below)[0])) + 1 if below.any() else 0
    rejected = np.zeros(m, dtype=bool)
    rejected[order[:cutoff]] = True
    return rejected.tolist()


def calibrated_threshold(
    reference: Counts,
    window: int,
    statistic: Any = js_distance,
    *,
    draws: int = 200,
    sigmas: float = 3.0,
    seed: int = 0,
) -> float:
    """A distance threshold for windows of `window` samples: windows drawn from the
    reference distribution itself (multinomial), mean + `sigmas` standard deviations of
    their distance to the reference. Small windows get larger thresholds, as they should."""
    ref = np.asarray(reference, dtype=np.float64)
    if ref.sum() == 0 or window <= 0:
        raise InsufficientData("calibration needs reference counts and a window size")
    rng = np.random.default_rng(seed)
    samples = rng.multinomial(window, ref / ref.sum(), size=draws)
    values = np.array([statistic(ref, s) for s in samples])
    return float(values.mean() + sigmas * values.std())
