"""Drift statistics on bin counts: pure functions, each named for its direction.

Every function takes the reference's and the live window's counts over the same bins.
An empty side raises `InsufficientData` (a report says "insufficient data", never "no
drift"); empty bins, constant features and bins unseen in the reference never produce NaN.
"""

from __future__ import annotations

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


def _rows(
    reference: Counts, live: Counts
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """(F, B) counts of both sides as floats, checked: one row per feature."""
    ref = np.asarray(reference, dtype=np.float64)
    cur = np.asarray(live, dtype=np.float64)
    if ref.shape != cur.shape or ref.ndim != 2:
        raise ValueError(f"counts must be (F, B) and alike, got {ref.shape} and {cur.shape}")
    finite = np.isfinite(ref).all() and np.isfinite(cur).all()
    if not finite or (ref < 0).any() or (cur < 0).any():
        raise ValueError("counts must be finite and non-negative")
    if (ref.sum(axis=1) == 0).any() or (cur.sum(axis=1) == 0).any():
        raise InsufficientData("a side has no samples")
    return ref, cur


def _one(
    reference: Counts, live: Counts
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    ref = np.asarray(reference, dtype=np.float64)
    cur = np.asarray(live, dtype=np.float64)
    if ref.shape != cur.shape or ref.ndim != 1:
        raise ValueError(f"counts must be 1-D and the same shape, got {ref.shape} and {cur.shape}")
    return ref[None, :], cur[None, :]


def _shares(counts: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    shares: npt.NDArray[np.float64] = counts / counts.sum(axis=1, keepdims=True)
    return shares


def js_distance_rows(reference: Counts, live: Counts) -> npt.NDArray[np.float64]:
    """Per row (feature) of (F, B) counts: Jensen-Shannon distance, base 2 (0 identical,
    1 disjoint)."""
    ref, cur = _rows(reference, live)
    p, q = _shares(ref), _shares(cur)
    m = (p + q) / 2
    with np.errstate(divide="ignore", invalid="ignore"):
        kl_p = np.where(p > 0, p * np.log2(p / m), 0.0).sum(axis=1)
        kl_q = np.where(q > 0, q * np.log2(q / m), 0.0).sum(axis=1)
    distances: npt.NDArray[np.float64] = np.sqrt(np.clip((kl_p + kl_q) / 2, 0.0, 1.0))
    return distances


def js_distance(reference: Counts, live: Counts) -> float:
    """Jensen-Shannon distance (base 2): 0 identical, 1 disjoint."""
    return float(js_distance_rows(*_one(reference, live))[0])


def psi_rows(reference: Counts, live: Counts, epsilon: float = 1e-4) -> npt.NDArray[np.float64]:
    """Per row: population stability index, empty bins smoothed by `epsilon`."""
    ref, cur = _rows(reference, live)
    p = np.clip(_shares(ref), epsilon, None)
    q = np.clip(_shares(cur), epsilon, None)
    values: npt.NDArray[np.float64] = ((q - p) * np.log(q / p)).sum(axis=1)
    return values


def psi(reference: Counts, live: Counts, epsilon: float = 1e-4) -> float:
    """Population stability index, with empty bins smoothed by `epsilon`."""
    return float(psi_rows(*_one(reference, live), epsilon)[0])


def chi2_p_value_rows(
    reference: Counts, live: Counts, min_expected: float = 5.0
) -> npt.NDArray[np.float64]:
    """Per row: p-value of the chi-square test that both samples come from one distribution
    (homogeneity, 2 x B). Bins whose expected count is under `min_expected` are pooled into
    one (Cochran's rule), and a pooled bin that is still sparse is folded into the smallest
    other bin, so sparse tail bins cannot make the test anti-conservative."""
    from scipy.special import chdtrc

    ref, cur = _rows(reference, live)
    n_ref, n_cur = ref.sum(axis=1, keepdims=True), cur.sum(axis=1, keepdims=True)
    total = n_ref + n_cur
    expected = np.minimum(n_ref, n_cur) * (ref + cur) / total
    sparse = expected < min_expected
    tail_ref = np.where(sparse, ref, 0.0).sum(axis=1)
    tail_cur = np.where(sparse, cur, 0.0).sum(axis=1)
    r = np.where(sparse, 0.0, ref)
    c = np.where(sparse, 0.0, cur)
    tail_expected = np.minimum(n_ref, n_cur)[:, 0] * (tail_ref + tail_cur) / total[:, 0]
    dense = ~sparse
    fold = (tail_expected < min_expected) & dense.any(axis=1) & (tail_ref + tail_cur > 0)
    if fold.any():  # still sparse: into the smallest dense bin
        sizes = np.where(dense, r + c, np.inf)
        rows = np.nonzero(fold)[0]
        smallest = np.argmin(sizes[rows], axis=1)
        r[rows, smallest] += tail_ref[rows]
        c[rows, smallest] += tail_cur[rows]
        tail_ref[rows] = 0.0
        tail_cur[rows] = 0.0
    r = np.column_stack([r, tail_ref])
    c = np.column_stack([c, tail_cur])
    used = (r + c) > 0
    share = (r + c) / total
    e_ref, e_cur = share * n_ref, share * n_cur
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(used, (r - e_ref) ** 2 / e_ref + (c - e_cur) ** 2 / e_cur, 0.0)
    dof = used.sum(axis=1) - 1
    p_values = np.ones(len(r))
    testable = dof >= 1  # everything in one bin on both sides: the same distribution
    p_values[testable] = chdtrc(dof[testable], terms.sum(axis=1)[testable])
    result: npt.NDArray[np.float64] = np.clip(p_values, 0.0, 1.0)
    return result


def chi2_p_value(reference: Counts, live: Counts, min_expected: float = 5.0) -> float:
    """Chi-square test that both samples come from one distribution (homogeneity), sparse
    bins pooled (see `chi2_p_value_rows`)."""
    return float(chi2_p_value_rows(*_one(reference, live), min_expected)[0])


def ks_distance_bound_rows(reference: Counts, live: Counts) -> npt.NDArray[np.float64]:
    """Per row: the largest CDF gap at the bin edges, a lower bound of the two-sample KS
    statistic the raw values would give (binning can only hide differences)."""
    ref, cur = _rows(reference, live)
    gaps = np.abs(np.cumsum(_shares(ref), axis=1) - np.cumsum(_shares(cur), axis=1))
    bound: npt.NDArray[np.float64] = gaps.max(axis=1)
    return bound


def ks_distance_bound(reference: Counts, live: Counts) -> float:
    """The largest CDF gap at the bin edges: a lower bound of the two-sample KS statistic
    that the raw values would give (binning can only hide differences)."""
    return float(ks_distance_bound_rows(*_one(reference, live))[0])


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
