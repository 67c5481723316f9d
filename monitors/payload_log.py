"""The payload log's table format, defined once: the gateway writes it, the monitors and
the retraining pipeline read it.

Layout: `<root>/<table>/model=<m>/version=<v>/date=<YYYY-MM-DD>/part-*.parquet` (the
folders organise the files; each file carries all its columns), with two tables:

- `predictions`: one row per request: id, time (UTC, microseconds), model, version,
  variant, inputs and outputs. A tensor is a struct of name, datatype (OIP), shape and its
  data in the binary tensor format (little-endian, row-major; BYTES length-prefixed), so
  every datatype round-trips exactly.
- `feedback`: one row per label: id, time, model, version (of the prediction it joined, or
  null when unmatched), label (as text), outcome (correct, incorrect, unmatched).

Files are written to a temporary name and renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import datetime as dt
import struct
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

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


def read_window(
    root: Path,
    *,
    table: str = PREDICTIONS,
    start: dt.datetime | None = None,
    end: dt.datetime | None = None,
    model: str | None = None,
    version: str | None = None,
) -> pa.Table:
    """The rows of `table` with start <= time < end (UTC), optionally for one model and
    version; an empty table (with the schema) when there are none."""
    folder = Path(root) / table
    schema = SCHEMAS[table]
    if not folder.exists():
        return schema.empty_table()
    # the folders only organise the files; every file carries all of its columns
    # (temporary files start with "." and are skipped)
    dataset = ds.dataset(folder, format="parquet", schema=schema)
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
