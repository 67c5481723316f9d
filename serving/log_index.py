"""Lookups by id in the payload log that read only the files holding those ids.

Every data file has an id index beside it (its ids' sorted 64-bit hashes, written with
the file: `monitors.payload_log`). Each index is read once and kept in memory (about 20
bytes per logged row; files are never rewritten, so it stays true), merged per date
folder into one sorted array. A folder is listed again when its mtime changes (or changed
lately), to find new files and forget removed ones. A lookup then opens only the data files whose
index holds one of its ids (a hash match is confirmed on the rows). Files from before the
id index have none: their ids are read once and kept the same way.

Blocking: run lookups off the event loop. Thread-safe.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from monitors.payload_log import SCHEMAS, hash_ids, read_ids

Keys = npt.NDArray[np.uint64]

#: a folder changed this recently is listed again, whatever its mtime says (coarse clocks)
RECENT_S = 2.0
#: files indexed one by one before they are merged into the folder's sorted keys
MERGE_AT = 64


class _Folder:
    """One date folder's data files and their ids: most in one sorted array of keys with
    the file each came from, the newest few file by file."""

    def __init__(self) -> None:
        self.mtime_ns = -1
        self.files: dict[str, Keys] = {}
        self.keys: Keys = np.zeros(0, dtype=np.uint64)
        self.owners: npt.NDArray[np.int32] = np.zeros(0, dtype=np.int32)
        self.names: list[str] = []
        self.recent: list[str] = []

    def sync(self, path: str, load: Callable[[Path], Keys]) -> None:
        with os.scandir(path) as entries:
            names = {e.name for e in entries if e.name.endswith(".parquet")}
        names = {n for n in names if n[0] not in "._"}  # temporary files, id indexes
        for name in names - self.files.keys():
            try:
                self.files[name] = load(Path(path, name))
            except FileNotFoundError:  # removed since the listing
                continue
            self.recent.append(name)
        gone = self.files.keys() - names
        for name in gone:
            del self.files[name]
        if gone or len(self.recent) > MERGE_AT:
            self._merge()

    def _merge(self) -> None:
        self.names = list(self.files)
        parts = [self.files[n] for n in self.names]
        keys = np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint64)
        owners = np.repeat(np.arange(len(parts), dtype=np.int32), [k.size for k in parts])
        order = np.argsort(keys, kind="stable")
        self.keys, self.owners, self.recent = keys[order], owners[order], []

    def holding(self, wanted: Keys) -> set[str]:
        out: set[str] = set()
        if self.keys.size:
            low = np.searchsorted(self.keys, wanted, "left")
            high = np.searchsorted(self.keys, wanted, "right")
            for a, b in zip(low[high > low].tolist(), high[high > low].tolist(), strict=True):
                out.update(self.names[o] for o in self.owners[a:b].tolist())
        for name in self.recent:
            keys = self.files[name]
            if keys.size:
                at = np.minimum(np.searchsorted(keys, wanted), keys.size - 1)
                if (keys[at] == wanted).any():
                    out.add(name)
        return out


class LogIndex:
    def __init__(self, root: Path, table: str):
        self.root = Path(root)
        self.table = table
        self._folders: dict[str, dict[str, _Folder]] = {}
        self._lock = threading.Lock()
        #: data files opened (lookups, and older files without an index): for tests
        self.files_read = 0
        #: id index files read
        self.indexes_read = 0

    def _refresh(self, model: str) -> dict[str, _Folder]:
        """The model's date folders, each listed again only when it changed."""
        base = self.root / self.table / f"model={model}"
        known = self._folders.get(model, {})
        current: dict[str, _Folder] = {}
        try:
            versions = [e.path for e in os.scandir(base) if e.name.startswith("version=")]
        except (FileNotFoundError, NotADirectoryError):
            versions = []
        for version in versions:
            try:
                days = [e for e in os.scandir(version) if e.name.startswith("date=")]
            except (FileNotFoundError, NotADirectoryError):
                continue
            for day in days:
                try:
                    stat = day.stat()  # before the listing: a change during it shows next time
                except FileNotFoundError:
                    continue
                folder = known.get(day.path) or _Folder()
                if stat.st_mtime_ns != folder.mtime_ns or time.time() - stat.st_mtime < RECENT_S:
                    try:
                        folder.sync(day.path, self._load)
                    except (FileNotFoundError, NotADirectoryError):
                        continue
                    folder.mtime_ns = stat.st_mtime_ns
                current[day.path] = folder
        self._folders[model] = current
        return current

    def _load(self, part: Path) -> Keys:
        keys = read_ids(part)
        if keys is not None:
            self.indexes_read += 1
            return keys
        self.files_read += 1
        ids = pq.read_table(part, columns=["id"])["id"].to_pylist()
        return np.sort(hash_ids(i for i in ids if i is not None))

    def files_with(self, model: str, ids: Sequence[str]) -> list[Path]:
        """The data files of `model` whose index holds one of `ids`."""
        if not ids:
            return []
        wanted = np.unique(hash_ids(ids))
        with self._lock:
            folders = self._refresh(model)
            return [Path(path, name) for path, f in folders.items() for name in f.holding(wanted)]

    def rows(self, model: str, ids: Sequence[str], columns: Sequence[str]) -> pa.Table:
        """The rows of `model` with these ids (only `columns`, which include "id")."""
        schema = SCHEMAS[self.table]
        parts = self.files_with(model, ids)
        names = list(dict.fromkeys(["id", "model", *columns]))
        if not parts:
            return schema.empty_table().select(list(columns))
        value_set = pa.array(list(ids), pa.string())
        tables: list[pa.Table] = []
        for part in parts:
            with self._lock:
                self.files_read += 1
            try:
                table = pq.read_table(part, columns=names, schema=schema)
            except FileNotFoundError:
                continue
            mask: Any = pc.and_(
                pc.is_in(table["id"], value_set=value_set), pc.equal(table["model"], model)
            )
            tables.append(table.filter(mask).select(list(columns)))
        if not tables:
            return schema.empty_table().select(list(columns))
        return pa.concat_tables(tables)

    def has(self, model: str, ids: Sequence[str]) -> set[str]:
        """Which of `ids` have a row of `model`."""
        return set(self.rows(model, ids, ["id"])["id"].to_pylist())
