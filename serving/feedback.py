"""Ground truth: labels sent back by clients, joined to their predictions by id.

Recent predictions are remembered in a bounded in-memory index; older ones are looked up
in the payload log. A label for an unknown id is stored and counted as unmatched, never
dropped; a second label for the same id is ignored (idempotent).
"""

from __future__ import annotations

import datetime as dt
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

from monitors.payload_log import FEEDBACK, PREDICTIONS, read_window, tensor_array
from serving.errors import InvalidInput

MAX_ITEMS = 10_000
MAX_ID = 256


@dataclass(slots=True)
class Remembered:
    model: str
    version: str
    #: the predicted class per row (None: the model has no label output)
    labels: npt.NDArray[Any] | None
    #: when the prediction was made (Unix seconds), for the label delay
    at: float


@dataclass(slots=True)
class Label:
    id: str
    #: one label per row of the prediction
    values: list[str]


def label_text(value: Any) -> str:
    """Labels compare as text: 3, 3.0 and "3" are the same class."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, np.generic):
        return label_text(value.item())
    return str(value)


def parse_feedback(doc: Any) -> list[Label]:
    items = doc if isinstance(doc, list) else [doc]
    if not items:
        raise InvalidInput('feedback needs at least one {"id": ..., "label": ...}')
    if len(items) > MAX_ITEMS:
        raise InvalidInput(f"feedback takes at most {MAX_ITEMS} labels per request")
    labels: list[Label] = []
    for i, item in enumerate(items):
        where = f"feedback[{i}]"
        if not isinstance(item, dict):
            raise InvalidInput(f"{where} must be an object with 'id' and 'label'")
        if set(item) - {"id", "label"}:
            unknown = ", ".join(sorted(set(item) - {"id", "label"}))
            raise InvalidInput(f"{where}: unknown field(s) {unknown}")
        ident = item.get("id")
        if not isinstance(ident, str) or not ident or len(ident) > MAX_ID:
            raise InvalidInput(
                f"{where}: 'id' must be a non-empty string of at most {MAX_ID} characters"
            )
        if "label" not in item:
            raise InvalidInput(f"{where}: 'label' is missing")
        raw = item["label"]
        values = raw if isinstance(raw, list) else [raw]
        if not values:
            raise InvalidInput(f"{where}: 'label' is an empty list")
        for value in values:
            if isinstance(value, bool) or not isinstance(value, str | int | float):
                raise InvalidInput(
                    f"{where}: a label must be a string or a number (or a list of them, "
                    f"one per row), got {value!r}"
                )
            if isinstance(value, float) and not np.isfinite(value):
                raise InvalidInput(f"{where}: a label must be finite")
        labels.append(Label(ident, [label_text(v) for v in values]))
    return labels


class FeedbackIndex:
    """Recent predictions by id, and the ids already labelled (both bounded, oldest out)."""

    def __init__(self, capacity: int = 100_000):
        self.capacity = capacity
        self._predictions: OrderedDict[str, Remembered] = OrderedDict()
        self._labelled: OrderedDict[str, None] = OrderedDict()

    def remember(
        self, ident: str, model: str, version: str, labels: npt.NDArray[Any] | None
    ) -> None:
        predictions = self._predictions
        predictions[ident] = Remembered(model, version, labels, time.time())
        if len(predictions) > self.capacity:
            predictions.popitem(last=False)

    def get(self, ident: str) -> Remembered | None:
        return self._predictions.get(ident)

    def labelled(self, ident: str) -> bool:
        return ident in self._labelled

    def mark(self, ident: str) -> None:
        self._labelled[ident] = None
        if len(self._labelled) > self.capacity:
            self._labelled.popitem(last=False)


def _with_ids(table: pa.Table, ids: list[str]) -> pa.Table:
    return table.filter(pc.is_in(table["id"], value_set=pa.array(ids, pa.string())))


def labelled_in_log(root: Path, model: str, ids: list[str]) -> set[str]:
    """Which of these ids already have a label in the feedback log (blocking)."""
    table = read_window(root, table=FEEDBACK, model=model)
    if table.num_rows == 0 or not ids:
        return set()
    return set(_with_ids(table, ids)["id"].to_pylist())


def lookup_logged(
    root: Path, model: str, ids: list[str], label_outputs: dict[str, str | None]
) -> dict[str, Remembered]:
    """Predictions of `model` with these ids from the payload log (blocking: run it off
    the event loop). `label_outputs` maps version -> its label output's name."""
    if not ids:
        return {}
    table = read_window(root, table=PREDICTIONS, model=model)
    if table.num_rows == 0:
        return {}
    table = _with_ids(table, ids)
    found: dict[str, Remembered] = {}
    for row in (
        table.filter(pc.field("variant") != "shadow")
        .select(["id", "version", "outputs", "time"])
        .to_pylist()
    ):
        version = row["version"]
        wanted = label_outputs.get(version)
        labels = None
        for tensor in row["outputs"]:
            if tensor["name"] == wanted or (wanted is None and len(tensor["shape"]) == 1
                                             and tensor["datatype"] != "FP32"):  # fmt: skip
                labels = tensor_array(tensor)
                break
        found[row["id"]] = Remembered(model, version, labels, row["time"].timestamp())
    return found


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)
