"""Feedback bodies and what a label may be.

A body is one `{"id": ..., "label": ...}` or a list of them (at most `MAX_ITEMS`); a label
is a value or a list of values, one per row of the prediction. Each value must be a label
of the version that answered (`LabelSpace`): a class index in range, or one of its
`class_labels`. Anything else (999 for ten classes, -1.5, "cat", true, null, a nested
list) is refused with a message naming the item, so nothing false reaches the log that
retraining reads. Labels are stored in one canonical text form per version: the class
index ("7") when the version predicts indices, the class name when it predicts names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from serving.datatypes import BYTES
from serving.errors import InvalidInput

MAX_ITEMS = 10_000
MAX_ID = 256

Value = str | int | float
_INDEX = re.compile(r"[+-]?[0-9]{1,18}")


@dataclass(slots=True)
class Label:
    id: str
    #: the values as sent, one per row of the prediction
    values: list[Value]
    #: the item's position in the request (for messages)
    position: int = 0
    #: the canonical text of each value, set once validated against a version
    texts: list[str] = field(default_factory=list)

    @property
    def where(self) -> str:
        return f"feedback[{self.position}] (id '{self.id}')"


def label_text(value: Any) -> str:
    """Predictions compare as text: 3, 3.0 and "3" are the same class."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, np.generic):
        return label_text(value.item())
    return str(value)


def parse_feedback(doc: Any) -> list[Label]:
    """Every item's form checked before any is used (a request is all or nothing)."""
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
        labels.append(Label(ident, values, i))
    return labels


@dataclass(frozen=True, slots=True)
class LabelSpace:
    """The labels one version takes: class indices 0..classes-1 (`classes` None: the
    version does not say how many), and its class names."""

    classes: int | None
    names: tuple[str, ...] = ()
    #: the version predicts names (a BYTES label output), so labels are stored as names
    by_name: bool = False

    @classmethod
    def of(cls, model: Any) -> LabelSpace:
        """From a loaded OnnxModel: its card's class_labels and its outputs."""
        names = tuple(str(n) for n in (model.card.class_labels or ()))
        plan = model.plan
        by_name = (
            plan.label_output is not None and plan.outputs[plan.label_output].datatype == BYTES
        )
        classes: int | None = len(names) or None
        if classes is None and plan.probability_output is not None:
            width = plan.outputs[plan.probability_output].shape[-1]
            classes = width if width > 0 else None
        return cls(classes, names, by_name)

    def canonical(self, value: Value) -> str | None:
        """The stored text of `value`, or None when it is not a label of this version."""
        if isinstance(value, str):
            if value in self.names:
                return value if self.by_name else str(self.names.index(value))
            if not _INDEX.fullmatch(value):
                # a version that predicts names but lists none: any name is taken as is
                return value if self.by_name and not self.names and value else None
            value = int(value)
        elif isinstance(value, float):
            if not value.is_integer():
                return None
            value = int(value)
        if value < 0 or (self.classes is not None and value >= self.classes):
            return None
        if self.by_name and self.names:
            return self.names[value]
        return str(value)

    def describe(self) -> str:
        if self.classes is None:
            indices = "a class index (0 or more)"
        else:
            indices = f"a class index 0..{self.classes - 1}"
        if not self.names:
            return indices
        shown = ", ".join(repr(n) for n in self.names[:10])
        more = f", ... ({len(self.names)} in all)" if len(self.names) > 10 else ""
        return f"{indices} or one of its class_labels ({shown}{more})"
