"""A module imported on its first attribute access.

The step modules refer to numpy through one: building a pipeline (its cache keys are the
steps' source, their parameters and their inputs' hashes) and a fully cached run (it reads
manifests) import nothing that the steps compute with; the first step that runs does.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any


class LazyModule:
    def __init__(self, name: str) -> None:
        self._name = name
        self._module: ModuleType | None = None

    def __getattr__(self, attr: str) -> Any:
        if self._module is None:
            self._module = importlib.import_module(self._name)
        return getattr(self._module, attr)

    def __repr__(self) -> str:
        state = "imported" if self._module is not None else "not imported yet"
        return f"<lazy module {self._name!r} ({state})>"
