"""Reference profiles: quantile bins with under/overflow, honest about edge cases."""

from __future__ import annotations

import numpy as np
import pytest

from monitors.profile import N_BINS, ProfileError, ReferenceProfile, fit


def test_deciles_fill_evenly_and_round_trip() -> None:
    x = np.random.default_rng(0).normal(size=(1000, 3))
    profile = fit(x, "input")
    assert profile.features == ("input:0", "input:1", "input:2")
    assert profile.reference_counts.shape == (3, N_BINS)
    assert (profile.reference_counts[:, 1:-1] == 100).all()
    assert (profile.reference_counts[:, [0, -1]] == 0).all()
    again = ReferenceProfile.from_json(profile.to_json())
    np.testing.assert_array_equal(again.bin_counts(x), profile.reference_counts)


def test_under_over_nan_and_constant_features() -> None:
    x = np.column_stack([np.arange(100.0), np.full(100, 5.0)])
    profile = fit(x, "input")
    counts = profile.bin_counts(np.array([[-1.0, 5.0], [1000.0, 4.0], [np.nan, 6.0]]))
    assert counts[0].tolist() == [2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]  # NaN -> under
    assert counts[1].tolist() == [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1]  # constant: top bin
    assert profile.reference_counts[1].tolist() == [0] * 10 + [100, 0]


def test_bins_match_a_plain_loop() -> None:
    rng = np.random.default_rng(1)
    profile = fit(rng.exponential(size=(500, 8)), "input")
    live = rng.exponential(scale=1.5, size=(300, 8))
    expected = np.zeros((8, N_BINS), dtype=np.int64)
    for row in live:
        for j, value in enumerate(row):
            edges = profile.edges[j]
            if value < edges[0]:
                b = 0
            elif value > edges[-1]:
                b = N_BINS - 1
            else:
                b = 1 + sum(1 for e in edges[1:-1] if value >= e)
            expected[j, b] += 1
    np.testing.assert_array_equal(profile.bin_counts(live), expected)


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"format": 2}, "unsupported or missing format"),
        ({"format": 1, "input": "x"}, "malformed"),
        (
            {"format": 1, "input": "x", "features": ["a"], "edges": [[0, 1]], "n": 1,
             "reference_counts": [[0] * 12]},
            "1 features need edges (1, 11)",
        ),
    ],
)  # fmt: skip
def test_malformed_profiles_are_refused(doc: dict[str, object], message: str) -> None:
    with pytest.raises(ProfileError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ReferenceProfile.from_json(doc)


def test_fit_refuses_bad_reference_rows() -> None:
    with pytest.raises(ProfileError, match="finite"):
        fit(np.array([[1.0, np.nan]]), "x")
    with pytest.raises(ProfileError, match="n > 0"):
        fit(np.zeros((0, 3)), "x")
