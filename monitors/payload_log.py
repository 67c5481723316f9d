"""The payload log's table format, defined once: the gateway writes it, the monitors and
the retraining pipeline read it.

Layout: `<root>/<table>/model=<m>/version=<v>/date=<YYYY-MM-DD>/part-*.parquet` (the
folders organise the files; each file carries all its columns), with two tables:

- `predictions`: one row per request: id, time (UTC, microseconds), model, version,
  variant, inputs, outputs, and `latency_s`: the seconds this variant took to compute
  the answer (the answering variant's predict call, queueing for a batch included; a
  shadow's own run on its thread); null in files written before the column existed. A
  tensor is a struct of name, datatype (OIP), shape and its data in the binary tensor
  format (little-endian, row-major; BYTES length-prefixed), so every datatype
  round-trips exactly.
- `feedback`: one row per label: id, time, model, version (of the prediction it joined, or
  null when unmatched), label (as text), outcome (correct, incorrect, unmatched).

Many writers may share one folder (gateway pods and the controller on a shared volume):
a file's name carries its writer's instance, `part-<ns>-<n>.<host>.<pid>.<token>.parquet`
(`serving.instance`), so no two writers' names collide; a reader reads every writer's
files alike. Files are written to a temporary name and renamed, so a reader never sees
half a file.
Next to each `part-X.parquet` an id index `_part-X.ids` (written first) holds the sorted
64-bit BLAKE2b hashes of the file's ids (little-endian uint64), so a lookup by id reads
only the files that hold it; names starting with "_" or "." are not data files.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

PREDICTIONS = "predictions"
FEEDBACK = "feedback"

TENSOR = pa.struct(
    [
        ("name", pa.string()),
        ("datatype", pa.string()),
        ("shape", pa.list_(pa.int64())),
        ("data", pa.binary()),
    ]
)
PREDICTION_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("time", pa.timestamp("us", tz="UTC")),
        ("model", pa.string()),
        ("version", pa.string()),
        ("variant", pa.string()),
        ("inputs", pa.list_(TENSOR)),
        ("outputs", pa.list_(TENSOR)),
        ("latency_s", pa.float64()),
    ]
)
FEEDBACK_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("time", pa.timestamp("us", tz="UTC")),
        ("model", pa.string()),
        ("version", pa.string()),
        ("label", pa.string()),
        ("outcome", pa.string()),
    ]
)
SCHEMAS = {PREDICTIONS: PREDICTION_SCHEMA, FEEDBACK: FEEDBACK_SCHEMA}

_DTYPES: dict[str, str] = {
    "BOOL": "|b1", "UINT8": "|u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8",
    "INT8": "|i1", "INT16": "<i2", "INT32": "<i4", "INT64": "<i8", "FP16": "<f2",
    "FP32": "<f4", "FP64": "<f8",
}  # fmt: skip
_LENGTH = struct.Struct("<I")


def tensor_record(name: str, datatype: str, array: npt.NDArray[Any]) -> dict[str, Any]:
    if datatype == "BYTES":
        parts: list[bytes] = []
        for item in array.reshape(-1):
            value = item.encode("utf-8") if isinstance(item, str) else bytes(item)
            parts += [_LENGTH.pack(len(value)), value]
        data = b"".join(parts)
    else:
        data = np.ascontiguousarray(array, dtype=_DTYPES[datatype]).tobytes()
    return {"name": name, "datatype": datatype, "shape": list(array.shape), "data": data}


def as_records(tensors: list[tuple[str, str, npt.NDArray[Any]]]) -> list[dict[str, Any]]:
    return [tensor_record(name, datatype, array) for name, datatype, array in tensors]


def tensor_array(record: dict[str, Any]) -> npt.NDArray[Any]:
    """A tensor struct from the log back to numpy."""
    shape, data, datatype = record["shape"], record["data"], record["datatype"]
    if datatype != "BYTES":
        return np.frombuffer(data, dtype=_DTYPES[datatype]).reshape(shape)
    items: list[bytes] = []
    offset = 0
    while offset < len(data):
        (length,) = _LENGTH.unpack_from(data, offset)
        items.append(bytes(data[offset + 4 : offset + 4 + length]))
        offset += 4 + length
    out = np.empty(len(items), dtype=object)
    out[:] = items
    return out.reshape(shape)


def partition_dir(root: Path, table: str, model: str, version: str | None, day: dt.date) -> Path:
    return root / table / f"model={model}" / f"version={version or 'none'}" / f"date={day}"


def hash_ids(ids: Iterable[str]) -> npt.NDArray[np.uint64]:
    """The 64-bit keys of ids in the id index (BLAKE2b, stable across processes)."""
    blake2b = hashlib.blake2b
    return np.fromiter(
        (int.from_bytes(blake2b(i.encode(), digest_size=8).digest(), "little") for i in ids),
        dtype=np.uint64,
    )


def ids_path(part: Path) -> Path:
    """The id index of a data file: `_<stem>.ids` beside `<stem>.parquet`."""
    return part.with_name(f"_{part.stem}.ids")


def read_ids(part: Path) -> npt.NDArray[np.uint64] | None:
    """The sorted id hashes of a data file, or None when it has no index (older files)."""
    try:
        return np.fromfile(ids_path(part), dtype="<u8").astype(np.uint64, copy=False)
    except FileNotFoundError:
        return None


class StagedPart:
    """A data file and its id index written under temporary names, not yet visible:
    `publish()` renames them into place (the index first), `discard()` removes them."""

    def __init__(self, folder: Path, name: str, table: pa.Table, *, fsync: bool = False):
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.fsync = folder, fsync
        self.part = folder / f"{name}.parquet"
        self.index = ids_path(self.part)
        self._tmp = (folder / f".{self.index.name}.tmp", folder / f".{self.part.name}.tmp")
        try:
            keys = np.sort(hash_ids(table["id"].to_pylist())).astype("<u8")
            with self._tmp[0].open("wb") as handle:
                handle.write(keys.tobytes())
                if fsync:
                    handle.flush()
                    os.fsync(handle.fileno())
            pq.write_table(table, str(self._tmp[1]))
            if fsync:
                fsync_path(self._tmp[1])
        except BaseException:
            self.discard()
            raise

    def publish(self) -> Path:
        try:
            os.replace(self._tmp[0], self.index)
            os.replace(self._tmp[1], self.part)
            if self.fsync:
                fsync_path(self.folder)
        finally:
            self.discard()
        return self.part

    def discard(self) -> None:
        for tmp in self._tmp:
            tmp.unlink(missing_ok=True)


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder: so a rename in it is durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_part(folder: Path, name: str, table: pa.Table, *, fsync: bool = False) -> Path:
    """Write one data file `<name>.parquet` and its id index; with `fsync`, both are on
    disk, folder entry included, when this returns."""
    return StagedPart(folder, name, table, fsync=fsync).publish()


def model_parts(root: Path, table: str, model: str) -> Iterator[Path]:
    """Every data file of `model` in `table` (all versions and dates)."""
    base = Path(root) / table / f"model={model}"
    try:
        versions = list(os.scandir(base))
    except (FileNotFoundError, NotADirectoryError):
        return
    for version in versions:
        if not version.name.startswith("version=") or not version.is_dir():
            continue
        for day in os.scandir(version.path):
            if not day.name.startswith("date=") or not day.is_dir():
                continue
            for entry in os.scandir(day.path):
                name = entry.name
                if name.endswith(".parquet") and name[0] not in "._":
                    yield Path(entry.path)


def read_window(
    root: Path,
    *,
    table: str = PREDICTIONS,
    start: dt.datetime | None = None,
    end: dt.datetime | None = None,
    model: str | None = None,
    version: str | None = None,
    columns: list[str] | None = None,
) -> pa.Table:
    """The rows of `table` with start <= time < end (UTC), optionally for one model and
    version, and only some `columns` (None: all); an empty table (with the schema) when
    there are none. A column a file lacks (written before it existed) reads as null."""
    folder = Path(root) / table
    schema = SCHEMAS[table]
    if columns is not None:
        schema = pa.schema([schema.field(name) for name in columns])
    if not folder.exists():
        return schema.empty_table()
    # the folders only organise the files; every file carries all of its columns
    # (temporary files start with "." and are skipped)
    dataset = ds.dataset(folder, format="parquet", schema=SCHEMAS[table])
    condition = None
    clauses = []
    if model is not None:
        clauses.append(pc.field("model") == model)
    if version is not None:
        clauses.append(pc.field("version") == version)
    if start is not None:
        clauses.append(pc.field("time") >= pa.scalar(start, pa.timestamp("us", tz="UTC")))
    if end is not None:
        clauses.append(pc.field("time") < pa.scalar(end, pa.timestamp("us", tz="UTC")))
    for clause in clauses:
        condition = clause if condition is None else condition & clause
    table_out = dataset.to_table(filter=condition, columns=schema.names)
    return table_out.cast(schema)
