"""Artifact stores for the pipeline runner: where a step's outputs live, keyed by
(step, cache key). Steps always read and write local files; a remote store holds the
durable copy: outputs are pushed after a step succeeds, and a cache hit on the store is
fetched into the local folder before use (so another machine, or a clean local folder,
reuses what was computed).

`open_store(url)` takes a local path or any fsspec URL: `file://`, `memory://` (tests),
`s3://` (with s3fs installed), `gs://` (gcsfs), and the rest of fsspec's protocols.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

MANIFEST = "manifest.json"


class ArtifactStore(Protocol):
    def has(self, step: str, key: str) -> bool: ...

    def fetch(self, step: str, key: str, into: Path) -> None:
        """Download (step, key)'s files into the new folder `into`."""
        ...

    def push(self, step: str, key: str, folder: Path) -> None: ...

    def uri(self, step: str, key: str, name: str) -> str: ...


class FsspecStore:
    """A folder tree `<url>/<step>/<key>/` on any fsspec filesystem. A push writes the
    outputs first and the manifest last, so a half-written folder is never a cache hit."""

    def __init__(self, url: str, **options: Any):
        import fsspec

        self.url = url.rstrip("/")
        self.fs, self.base = fsspec.core.url_to_fs(self.url, **options)

    def _path(self, step: str, key: str, name: str = "") -> str:
        return "/".join(p for p in (self.base.rstrip("/"), step, key, name) if p)

    def has(self, step: str, key: str) -> bool:
        return bool(self.fs.exists(self._path(step, key, MANIFEST)))

    def fetch(self, step: str, key: str, into: Path) -> None:
        """Download the folder into `into`, a new folder in the run's scratch space (the
        runner renames it into place: nothing that another run reads is replaced)."""
        into.mkdir(parents=True)
        for remote in self.fs.ls(self._path(step, key), detail=False):
            name = remote.rstrip("/").rsplit("/", 1)[-1]
            self.fs.get_file(remote, str(into / name))

    def push(self, step: str, key: str, folder: Path) -> None:
        self.fs.makedirs(self._path(step, key), exist_ok=True)
        files = sorted(p for p in folder.iterdir() if p.is_file())
        for path in [p for p in files if p.name != MANIFEST] + [folder / MANIFEST]:
            self.fs.put_file(str(path), self._path(step, key, path.name))

    def uri(self, step: str, key: str, name: str) -> str:
        return f"{self.url}/{step}/{key}/{name}"


def open_store(url: str | None) -> FsspecStore | None:
    """None for no remote store (the local folder is the store)."""
    if not url:
        return None
    if "://" not in url:
        url = "file://" + str(Path(url).resolve())
    return FsspecStore(url)
