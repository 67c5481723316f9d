"""Reference profiles: per-feature quantile bins fitted on training data, applied live.

One definition shared by the export step (which fits and stores a profile in servo.json)
and the gateway's recorder (which counts live rows into the same bins), so drift is
computed exactly from bin counts.

Numeric features get 10 quantile bins between the reference minimum and maximum, plus
underflow and overflow: bin 0 is below the reference minimum, bins 1..10 are the deciles,
bin 11 is above the reference maximum. Constant features and repeated quantiles are fine
(some bins stay empty). NaN counts as its own outcome: it goes to bin 0 (underflow).

Categorical features (numeric codes in the input tensor, named at fit time) get their
top-K reference categories (K <= 11, most frequent first) in bins 0..K-1 and `__other__`
in bin 11, which also takes categories never seen in the reference and NaN.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

FORMAT = 1
QUANTILE_BINS = 10
N_BINS = QUANTILE_BINS + 2
BIN_LABELS = ("under", *(str(i) for i in range(QUANTILE_BINS)), "over")
OTHER = "__other__"
TOP_K = N_BINS - 1
CONFIDENCE_EDGES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)


class ProfileError(ValueError):
    """A profile that does not fit its model or is malformed."""


@dataclass(frozen=True)
class ReferenceProfile:
    #: the model input whose columns are the features ([N, F] tensor)
    input: str
    features: tuple[str, ...]
    #: (F, 11): reference minimum, the 9 inner deciles, reference maximum
    edges: npt.NDArray[np.float64]
    #: (F, 12): the reference rows' counts in those bins
    reference_counts: npt.NDArray[np.int64]
    n: int
    class_prior: dict[str, float] = field(default_factory=dict)
    #: counts of the top class probability in CONFIDENCE_EDGES buckets (+ one above)
    confidence_counts: tuple[int, ...] = ()
    #: the model's predicted classes on the reference rows
    prediction_counts: dict[str, int] = field(default_factory=dict)
    #: categorical features: their top-K reference categories, most frequent first
    categories: dict[str, tuple[float, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        columns = [self.features.index(name) for name in self.categories]
        table = np.full((len(columns), TOP_K), np.nan)
        for row, values in enumerate(self.categories.values()):
            table[row, : len(values)] = values
        object.__setattr__(self, "_categorical", np.asarray(columns, dtype=np.intp))
        object.__setattr__(self, "_category_table", table)

    def categorical_mask(self) -> npt.NDArray[np.bool_]:
        mask = np.zeros(len(self.features), dtype=bool)
        mask[self._categorical] = True  # type: ignore[attr-defined]
        return mask

    def bin_labels(self, feature: int) -> list[tuple[int, str]]:
        """The bins of one feature as (bin number, label) pairs: for numeric features all
        twelve (under, 0..9, over); for categorical ones the categories and __other__."""
        values = self.categories.get(self.features[feature])
        if values is None:
            return list(enumerate(BIN_LABELS))
        return [*((k, category_label(v)) for k, v in enumerate(values)), (N_BINS - 1, OTHER)]

    def bin_index(self, rows: npt.NDArray[Any]) -> npt.NDArray[np.intp]:
        """(n, F) values -> (n, F) bin numbers in 0..11, vectorised over rows and features."""
        x = np.asarray(rows, dtype=np.float64).reshape(-1, len(self.features))
        index = np.ones(x.shape, dtype=np.intp)
        for k in range(1, QUANTILE_BINS):  # one vectorised comparison per inner decile edge
            index += x >= self.edges[:, k]
        index[x < self.edges[:, 0]] = 0
        index[x > self.edges[:, -1]] = N_BINS - 1
        index[np.isnan(x)] = 0
        columns = self._categorical  # type: ignore[attr-defined]
        if len(columns):
            # (n, C, K) equality against each feature's categories; no match -> __other__
            equal = x[:, columns, None] == self._category_table[None, :, :]  # type: ignore[attr-defined]
            index[:, columns] = np.where(equal.any(axis=2), equal.argmax(axis=2), N_BINS - 1)
        return index

    def bin_counts(self, rows: npt.NDArray[Any]) -> npt.NDArray[np.int64]:
        """(n, F) values -> (F, 12) counts: one comparison pass and one bincount."""
        index = self.bin_index(rows)
        width = len(self.features)
        flat = (index + np.arange(width) * N_BINS).ravel()
        return np.bincount(flat, minlength=width * N_BINS).reshape(width, N_BINS)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "input": self.input,
            "features": list(self.features),
            "edges": self.edges.tolist(),
            "reference_counts": self.reference_counts.tolist(),
            "n": self.n,
            "class_prior": self.class_prior,
            "confidence_edges": list(CONFIDENCE_EDGES),
            "confidence_counts": list(self.confidence_counts),
            "prediction_counts": self.prediction_counts,
            "categories": {name: list(values) for name, values in self.categories.items()},
        }

    @classmethod
    def from_json(cls, doc: Any) -> ReferenceProfile:
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ProfileError("reference profile: unsupported or missing format")
        try:
            features = tuple(str(f) for f in doc["features"])
            edges = np.asarray(doc["edges"], dtype=np.float64)
            counts = np.asarray(doc["reference_counts"], dtype=np.int64)
            profile = cls(
                input=str(doc["input"]),
                features=features,
                edges=edges,
                reference_counts=counts,
                n=int(doc["n"]),
                class_prior={str(k): float(v) for k, v in (doc.get("class_prior") or {}).items()},
                confidence_counts=tuple(int(c) for c in doc.get("confidence_counts") or ()),
                prediction_counts={
                    str(k): int(v) for k, v in (doc.get("prediction_counts") or {}).items()
                },
                categories={
                    str(k): tuple(float(x) for x in v)
                    for k, v in (doc.get("categories") or {}).items()
                },
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ProfileError(f"reference profile: malformed ({exc!r})") from None
        width = len(features)
        if edges.shape != (width, QUANTILE_BINS + 1) or counts.shape != (width, N_BINS):
            raise ProfileError(
                f"reference profile: {width} features need edges ({width}, 11) and counts "
                f"({width}, 12), got {edges.shape} and {counts.shape}"
            )
        if not np.isfinite(edges).all() or (np.diff(edges, axis=1) < 0).any():
            raise ProfileError("reference profile: edges must be finite and non-decreasing")
        return profile


def category_label(value: float) -> str:
    """A category code as a metric label: 3.0 -> "3", 0.5 -> "0.5"."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def fit(
    rows: npt.NDArray[Any],
    input_name: str,
    feature_names: list[str] | None = None,
    labels: npt.NDArray[Any] | None = None,
    probabilities: npt.NDArray[Any] | None = None,
    *,
    predictions: npt.NDArray[Any] | None = None,
    categorical: Sequence[int] = (),
    top_k: int = TOP_K,
) -> ReferenceProfile:
    """Fit a profile on the training rows (n, F), optionally with their labels (the class
    prior) and the model's probabilities and predicted classes, which should be taken on
    held-out rows (live traffic is unseen data; on its training rows a model is more
    confident than live). Columns in `categorical` are numeric category codes: they get
    their `top_k` (at most 11) most frequent categories."""
    x = np.asarray(rows, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ProfileError(f"fit needs (n, F) rows with n > 0, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ProfileError("fit needs finite reference rows")
    width = x.shape[1]
    names = feature_names or [f"{input_name}:{j}" for j in range(width)]
    if len(names) != width:
        raise ProfileError(f"{len(names)} feature names for {width} columns")
    if not 1 <= top_k <= TOP_K:
        raise ProfileError(f"top_k must be 1..{TOP_K}, got {top_k}")
    if any(not 0 <= j < width for j in categorical):
        raise ProfileError(f"categorical columns {list(categorical)} outside 0..{width - 1}")
    quantiles = np.linspace(0.0, 1.0, QUANTILE_BINS + 1)
    edges = np.quantile(x, quantiles, axis=0).T.copy()  # (F, 11)
    categories: dict[str, tuple[float, ...]] = {}
    for j in sorted(set(categorical)):
        values, value_counts = np.unique(x[:, j], return_counts=True)
        order = np.argsort(-value_counts, kind="stable")[:top_k]
        categories[names[j]] = tuple(float(v) for v in values[order])
        edges[j] = 0.0  # unused: categorical bins are the categories
    profile = ReferenceProfile(
        input=input_name,
        features=tuple(names),
        edges=edges,
        reference_counts=np.zeros((width, N_BINS), dtype=np.int64),
        n=int(x.shape[0]),
        categories=categories,
    )
    counts = profile.bin_counts(x)
    prior: dict[str, float] = {}
    if labels is not None:
        values, label_counts = np.unique(np.asarray(labels), return_counts=True)
        prior = {
            str(v): float(c) / len(labels)
            for v, c in zip(values.tolist(), label_counts, strict=True)
        }
    confidence: tuple[int, ...] = ()
    if probabilities is not None:
        top = np.asarray(probabilities, dtype=np.float64).max(axis=1)
        index = np.searchsorted(CONFIDENCE_EDGES, top, side="left")
        confidence = tuple(np.bincount(index, minlength=len(CONFIDENCE_EDGES) + 1).tolist())
    predicted: dict[str, int] = {}
    if predictions is not None:
        values, value_counts = np.unique(np.asarray(predictions), return_counts=True)
        predicted = {str(v): int(c) for v, c in zip(values.tolist(), value_counts, strict=True)}
    return ReferenceProfile(
        input=input_name,
        features=tuple(names),
        edges=edges,
        reference_counts=counts,
        n=int(x.shape[0]),
        class_prior=prior,
        confidence_counts=confidence,
        prediction_counts=predicted,
        categories=categories,
    )
