"""The loaded model versions, by name and version, with each one's load state."""

from __future__ import annotations

import enum
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from serving.errors import ModelLoadError, ModelNotFound, ModelNotReady
from serving.model_folder import read_card, valid_name, valid_version
from serving.runtime import OnnxModel, RemoteOptions, RuntimeOptions

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
    #: a remote version's backend (serving.remote); None: loaded from `folder`
    url: str | None = None


def version_key(version: str) -> tuple[int, int, str]:
    """Numeric versions sort numerically and above non-numeric ones."""
    return (1, int(version), "") if version.isdigit() else (0, 0, version)


class ModelRepository:
    def __init__(
        self,
        options: RuntimeOptions | None = None,
        executor_threads: int = 4,
        remote: RemoteOptions | None = None,
    ):
        self.options = options or RuntimeOptions()
        self.remote = remote or RemoteOptions()
        self.executor = ThreadPoolExecutor(
            max_workers=executor_threads, thread_name_prefix="servo-infer"
        )
        self._models: dict[str, dict[str, Entry]] = {}

    def load_folder(self, folder: Path, expect: tuple[str, str] | None = None) -> Entry:
        """Load one model version folder (blocking: call it off the event loop).

        A broken folder is recorded as FAILED with the reason, keyed by `expect` (the
        route's name and version), else by its servo.json, else by the folder's name; it
        never stops other models from serving."""
        folder = Path(folder)
        name, version = expect if expect is not None else (folder.name, "unknown")
        try:
            card = read_card(folder)
            if expect is not None and (card.name, card.version) != expect:
                raise ModelLoadError(
                    f"{folder} holds model '{card.name}' version {card.version}, "
                    f"not '{name}' version {version}"
                )
        except ModelLoadError as exc:
            return self._failed(Entry(name, version, folder, State.FAILED), str(exc))
        entry = Entry(card.name, card.version, folder, State.LOADING)
        self._put(entry)
        model = OnnxModel(folder, card, self.options, self.executor)
        try:
            model.load()
        except ModelLoadError as exc:
            return self._failed(entry, str(exc))
        entry.model, entry.state = model, State.READY
        log.info(
            "loaded model %s version %s (warm-up %.0f us, %s)",
            card.name,
            card.version,
            model.warmup_us or -1,
            "inline" if model.runs_inline else "worker thread",
        )
        return entry

    async def load_remote(
        self, url: str, expect: tuple[str, str], card_folder: Path | None = None
    ) -> Entry:
        """A version served at `url` over OIP REST: its metadata read, FAILED with the
        reason if that fails (like a broken folder, it stops no other model)."""
        from serving.remote import RemoteModel  # only where a route names a backend

        name, version = expect
        entry = Entry(name, version, card_folder or Path(url), State.LOADING, url=url)
        self._put(entry)
        try:
            model = await RemoteModel.open(
                url,
                name,
                version,
                card_folder=card_folder,
                options=self.options,
                executor=self.executor,
                remote=self.remote,
            )
        except ModelLoadError as exc:
            return self._failed(entry, str(exc))
        entry.model, entry.state = model, State.READY
        log.info("model %s version %s served by %s", name, version, url)
        return entry

    def restore(self, entry: Entry) -> None:
        """Put back an entry that a failed reload of its version replaced."""
        self._put(entry)

    def _failed(self, entry: Entry, error: str) -> Entry:
        entry.state, entry.error = State.FAILED, error
        self._put(entry)
        log.error("model %s version %s failed to load: %s", entry.name, entry.version, error)
        return entry

    def _put(self, entry: Entry) -> None:
        self._models.setdefault(entry.name, {})[entry.version] = entry

    async def remove(self, name: str, version: str, drain_timeout_s: float = 30.0) -> None:
        """Forget a version (no new request finds it), wait for its in-flight work to
        finish, then drop its session."""
        versions = self._models.get(name, {})
        entry = versions.pop(version, None)
        if not versions:
            self._models.pop(name, None)
        if entry is None or entry.model is None:
            return
        if not await entry.model.drain(drain_timeout_s):
            log.warning(
                "%s still busy after %.0f s; unloading anyway", entry.model, drain_timeout_s
            )
        entry.model.unload()
        log.info("unloaded model %s version %s", name, version)

    def names(self) -> list[str]:
        return sorted(self._models)

    def versions(self, name: str) -> list[str]:
        return sorted(self._models.get(name, {}), key=version_key)

    def entries(self) -> list[Entry]:
        return [e for versions in self._models.values() for e in versions.values()]

    def find(self, name: str, version: str) -> Entry | None:
        return self._models.get(name, {}).get(version)

    def entry(self, name: str, version: str) -> Entry:
        versions = self._models.get(name)
        if versions is None:
            raise ModelNotFound(f"model '{shown(name, valid_name)}' not found")
        found = versions.get(version)
        if found is None:
            raise ModelNotFound(f"model '{name}' has no version '{shown(version, valid_version)}'")
        return found

    def model(self, name: str, version: str) -> OnnxModel:
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


def shown(text: str, valid: object) -> str:
    """A name from a request, safe to echo in an error message."""
    return text if callable(valid) and valid(text) else repr(text[:64])
