"""The loaded model versions, by name and version, with each one's load state."""

from __future__ import annotations

import enum
import logging
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from serving.errors import ModelLoadError, ModelNotFound, ModelNotReady
from serving.model_folder import read_card, valid_name, valid_version
from serving.runtime import OnnxModel, RuntimeOptions

log = logging.getLogger("servo.serving")


class State(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


@dataclass(slots=True)
class Entry:
    name: str
    version: str
    folder: Path
    state: State
    model: OnnxModel | None = None
    error: str | None = None


def _version_key(version: str) -> tuple[int, int, str]:
    """Numeric versions sort numerically and above non-numeric ones."""
    if re.fullmatch(r"\d+", version):
        return (1, int(version), "")
    return (0, 0, version)


class ModelRepository:
    def __init__(self, options: RuntimeOptions | None = None, executor_threads: int = 4):
        self.options = options or RuntimeOptions()
        self.executor = ThreadPoolExecutor(
            max_workers=executor_threads, thread_name_prefix="servo-infer"
        )
        self._models: dict[str, dict[str, Entry]] = {}
        #: name -> the version answering requests that name none (highest ready one)
        self._default: dict[str, str] = {}

    def load_folder(self, folder: Path) -> Entry:
        """Load one model version folder. A broken folder is recorded as FAILED with the
        reason (keyed by its servo.json name, or by the folder's name when that is
        unreadable); it never stops other models from serving."""
        folder = Path(folder)
        try:
            card = read_card(folder)
        except ModelLoadError as exc:
            entry = Entry(folder.name, "unknown", folder, State.FAILED, error=str(exc))
            self._put(entry)
            log.error("model folder %s failed to load: %s", folder, exc)
            return entry
        entry = Entry(card.name, card.version, folder, State.LOADING)
        self._put(entry)
        model = OnnxModel(folder, card, self.options, self.executor)
        try:
            model.load()
        except ModelLoadError as exc:
            entry.state, entry.error = State.FAILED, str(exc)
            self._refresh_default(entry.name)
            log.error("model %s version %s failed to load: %s", card.name, card.version, exc)
            return entry
        entry.model, entry.state = model, State.READY
        self._refresh_default(entry.name)
        log.info(
            "loaded model %s version %s (warm-up %.0f us, %s)",
            card.name,
            card.version,
            model.warmup_us or -1,
            "inline" if model.runs_inline else "worker thread",
        )
        return entry

    def _put(self, entry: Entry) -> None:
        self._models.setdefault(entry.name, {})[entry.version] = entry
        self._refresh_default(entry.name)

    def _refresh_default(self, name: str) -> None:
        versions = self._models[name]
        ready = [v for v in versions if versions[v].state is State.READY]
        self._default[name] = max(ready or list(versions), key=_version_key)

    def names(self) -> list[str]:
        return sorted(self._models)

    def versions(self, name: str) -> list[str]:
        return sorted(self._models.get(name, {}), key=_version_key)

    def entries(self) -> list[Entry]:
        return [e for versions in self._models.values() for e in versions.values()]

    def all_ready(self) -> bool:
        entries = self.entries()
        return bool(entries) and all(e.state is State.READY for e in entries)

    def entry(self, name: str, version: str | None = None) -> Entry:
        """The entry for `name` (and `version`; else the highest version); 404 if unknown."""
        versions = self._models.get(name)
        if versions is None:
            shown = name if valid_name(name) else repr(name[:64])
            raise ModelNotFound(f"model '{shown}' not found")
        if version is None:
            version = self._default[name]
        elif version not in versions:
            shown = version if valid_version(version) else repr(version[:64])
            raise ModelNotFound(f"model '{name}' has no version '{shown}'")
        return versions[version]

    def model(self, name: str, version: str | None = None) -> OnnxModel:
        """The loaded model, or ModelNotFound (404) / ModelNotReady (503)."""
        entry = self.entry(name, version)
        if entry.model is None or entry.state is not State.READY:
            reason = f": {entry.error}" if entry.error else ""
            raise ModelNotReady(
                f"model '{entry.name}' version {entry.version} is {entry.state.value}{reason}"
            )
        return entry.model

    def close(self) -> None:
        for entry in self.entries():
            if entry.model is not None:
                entry.model.unload()
        self.executor.shutdown(wait=False, cancel_futures=True)
