"""Lookups by id in the payload log that read only the files holding those ids.

Every data file has an id index beside it (its ids' sorted 64-bit hashes, written with
the file: `monitors.payload_log`). Each index is read once and kept in memory (8 bytes per
logged row; files are never rewritten, so it stays true), and a listing of the model's
folders on each lookup finds new files and forgets removed ones. A lookup then opens only
the data files whose index holds one of its ids (a hash match is confirmed on the rows).
Files from before the id index have none: their ids are read once and kept the same way.

Blocking: run lookups off the event loop. Thread-safe.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from monitors.payload_log import SCHEMAS, hash_ids, model_parts, read_ids

Keys = npt.NDArray[np.uint64]


class LogIndex:
    def __init__(self, root: Path, table: str):
        self.root = Path(root)
        self.table = table
        self._files: dict[str, dict[Path, Keys]] = {}
        self._lock = threading.Lock()
        #: data files opened (lookups, and older files without an index): for tests
        self.files_read = 0
        #: id index files read
        self.indexes_read = 0

    def _refresh(self, model: str) -> dict[Path, Keys]:
        known = self._files.get(model, {})
        current: dict[Path, Keys] = {}
        for part in model_parts(self.root, self.table, model):
            keys = known.get(part)
            if keys is None:
                try:
                    keys = self._load(part)
                except FileNotFoundError:  # removed since the listing
                    continue
            current[part] = keys
        self._files[model] = current
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
            files = self._refresh(model)
        out: list[Path] = []
        for part, keys in files.items():
            if not keys.size:
                continue
            at = np.minimum(np.searchsorted(keys, wanted), keys.size - 1)
            if (keys[at] == wanted).any():
                out.append(part)
        return out

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
