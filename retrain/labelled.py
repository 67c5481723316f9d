"""Labelled production rows: the gateway's payload log joined with its feedback.

Nothing unusable gets into training, and nothing unusable fails a run: rows whose label is
not a class (written by an older gateway that did not validate labels), whose label count
is not the row count, or whose input is missing, not numeric, non-finite or of another
width are skipped and counted by reason (`Labelled.skipped`, recorded in the step's
metrics as `production_skipped` and `production_skipped_<reason>`).

For retraining, the labelled rows of a recent window are split by time (`split_newest`):
the newest fraction is held out for evaluation and never trained on, and of the older
rows at most a share of the training set is taken, newest first (`production_cap`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

_INDEX = re.compile(r"[+-]?[0-9]{1,18}")


@dataclass
class Labelled:
    """Labelled production rows, and the rows that could not be used, by reason; `ids`
    and `times` (UTC, microseconds) name each row's request, rows in time order (then by
    id: deterministic whatever the order of the files)."""

    x: npt.NDArray[Any]
    y: npt.NDArray[Any]
    skipped: dict[str, int] = field(default_factory=dict)
    ids: npt.NDArray[np.str_] = field(default_factory=lambda: np.zeros(0, dtype=np.str_))
    times: npt.NDArray[np.datetime64] = field(
        default_factory=lambda: np.zeros(0, dtype="datetime64[us]")
    )

    def take(self, index: npt.NDArray[Any]) -> Labelled:
        """The rows at `index` (same skipped counts)."""
        return Labelled(self.x[index], self.y[index], dict(self.skipped), self.ids[index],
                        self.times[index])  # fmt: skip

    def record(self, metrics: dict[str, float]) -> None:
        metrics["production_rows"] = float(len(self.y))
        metrics["production_skipped"] = float(sum(self.skipped.values()))
        for reason, count in sorted(self.skipped.items()):
            metrics[f"production_skipped_{reason}"] = float(count)


def _class_index(text: str, names: Sequence[str], count: int | None) -> int | None:
    """A stored label as a class index: one of `names` (index i is names[i]) or an index
    in range (`count` None: any index 0 or more); None when it is neither."""
    if text in names:
        return list(names).index(text)
    if not _INDEX.fullmatch(text):
        return None
    index = int(text)
    return index if index >= 0 and (count is None or index < count) else None


def read_labelled(
    root: Any, model: str, input_name: str, start: Any = None, end: Any = None, *,
    classes: Sequence[str] | int | None = None, width: int | None = None,
) -> Labelled:  # fmt: skip
    """The gateway's labelled production rows: predictions (champion and canary answers,
    not shadow copies) joined with their feedback by id, in [start, end); the first label
    of an id counts. Labels become class indices: `classes` is the class names (or their
    number; None: any index). A row that cannot be used is skipped and counted, never
    failing the run (a label written by an older gateway that did not validate labels,
    like "cat" or 999; a label count that is not the row count; an input missing, not
    numeric, non-finite or not `width` wide)."""
    from monitors.payload_log import FEEDBACK, PREDICTIONS, read_window, tensor_array

    names: Sequence[str] = () if classes is None or isinstance(classes, int) else classes
    count = classes if isinstance(classes, int) else (len(names) or None)
    predictions = read_window(root, table=PREDICTIONS, model=model, start=start, end=end)
    feedback = read_window(root, table=FEEDBACK, model=model)
    labels: dict[str, str] = {}
    for row in feedback.select(["id", "label", "outcome"]).to_pylist():
        if row["outcome"] != "unmatched" and row["id"] not in labels:
            labels[row["id"]] = row["label"] or ""
    skipped: dict[str, int] = {}

    def skip(reason: str) -> None:
        skipped[reason] = skipped.get(reason, 0) + 1

    xs: list[npt.NDArray[Any]] = []
    ys: list[int] = []
    keys: list[tuple[Any, str]] = []  # (time, id) of each request kept
    for row in predictions.select(["id", "time", "variant", "inputs"]).to_pylist():
        text = labels.get(row["id"])
        if row["variant"] == "shadow" or text is None:
            continue
        values = _label_values(text)
        if values is None:
            skip("malformed_label")
            continue
        indices = [_class_index(v, names, count) for v in values]
        if any(i is None for i in indices):
            skip("not_a_class")
            continue
        tensor = next((t for t in row["inputs"] if t["name"] == input_name), None)
        if tensor is None:
            skip("no_input")
            continue
        try:
            data = tensor_array(tensor)
            rows = data.astype(np.float32)
        except (ValueError, TypeError, KeyError):
            skip("bad_input")
            continue
        if rows.ndim < 2 or rows.shape[0] != len(indices):  # one label per row
            skip("rows_mismatch")
            continue
        rows = rows.reshape(len(indices), -1)
        if width is None and xs:
            width = xs[0].shape[1]
        if (width is not None and rows.shape[1] != width) or not np.isfinite(rows).all():
            skip("bad_input")
            continue
        xs.append(rows)
        ys.extend(int(i) for i in indices if i is not None)
        keys.append((row["time"], row["id"]))
    return _assemble(xs, ys, keys, skipped)


def _assemble(xs: list[npt.NDArray[Any]], ys: list[int], keys: list[tuple[Any, str]],
              skipped: dict[str, int]) -> Labelled:  # fmt: skip
    """The rows kept (one array per request, its (time, id) key), in time order."""
    if not xs:
        return Labelled(np.zeros((0, 0), dtype=np.float32), np.zeros(0, dtype=np.int64), skipped)
    counts = [len(rows) for rows in xs]
    times = np.asarray([np.datetime64(t.replace(tzinfo=None), "us") for t, _ in keys])
    ids = np.asarray([ident for _, ident in keys], dtype=np.str_)
    found = Labelled(np.concatenate(xs), np.asarray(ys, dtype=np.int64), skipped,
                     np.repeat(ids, counts), np.repeat(times, counts))  # fmt: skip
    # time order, then id (a stable sort keeps the rows of one request in their order)
    order = np.lexsort((found.ids, found.times))
    return found.take(order)


def split_newest(found: Labelled, fraction: float) -> tuple[Labelled, Labelled]:
    """(older, newest): the newest requests holding at least `fraction` of the rows
    (rounded up, so any fraction > 0 of a non-empty set holds out a row) are held out;
    a request is never split between the two."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"the held-out fraction must be within [0, 1], got {fraction}")
    n = len(found.y)
    wanted = math.ceil(round(fraction * n, 9))  # 0.3 * 10 is 3, not 4
    cut = n - wanted
    # move the cut back to the first row of its request
    while (
        0 < cut < n
        and found.ids[cut - 1] == found.ids[cut]
        and (found.times[cut - 1] == found.times[cut])
    ):
        cut -= 1
    index = np.arange(n)
    return found.take(index[:cut]), found.take(index[cut:])


def production_cap(reference_rows: int, share: float) -> int | None:
    """How many production rows keep their share of the training rows at most `share`
    with `reference_rows` other rows (None: no cap, share 1)."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"the production share must be within [0, 1], got {share}")
    if share >= 1.0:
        return None
    return math.floor(round(share * reference_rows / (1.0 - share), 9))


def _label_values(text: str) -> list[str] | None:
    """A stored label: one value, or a JSON list of values (one per row)."""
    if not text.startswith("["):
        return [text] if text else None
    try:
        values = json.loads(text)
    except ValueError:
        return None
    if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
        return None
    return values


def labelled_rows(
    root: Any, model: str, input_name: str, start: Any = None, end: Any = None
) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
    """`read_labelled`'s rows and labels (class indices)."""
    found = read_labelled(root, model, input_name, start, end)
    return found.x, found.y
