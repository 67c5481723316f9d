"""Tensor codecs: OIP JSON data and the binary tensor format <-> numpy arrays.

Decoders check what they can know from the wire alone (shape well-formed, element
count, values representable in the declared datatype); checks against a model's
signature live in `serving.dataplane`.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from serving.datatypes import BYTES, FLOAT_TYPES, INT_TYPES, ITEM_SIZE, NUMPY_DTYPES
from serving.errors import InvalidInput

_LENGTH = struct.Struct("<I")

# numpy kinds that JSON data may carry for each family of datatypes
_FLOAT_KINDS = "fiu"
_INT_KINDS = "iu"


#: numpy's limit on dimensions
MAX_RANK = 64
#: the most elements a shape may describe, its zero dimensions aside: any more, times the
#: largest item size (8 bytes), is more than numpy can address (`[2**62, 0, 3]` included)
MAX_ELEMENTS = 2**60 - 1


def check_shape(name: str, shape: Any) -> list[int]:
    """A shape must be a list of at most MAX_RANK non-negative integers describing at most
    MAX_ELEMENTS elements (zero dimensions aside); returns it as a list."""
    if not isinstance(shape, list):
        raise InvalidInput(f"input '{name}': shape must be a list of integers, got {shape!r}")
    if len(shape) > MAX_RANK:
        raise InvalidInput(
            f"input '{name}': shape has {len(shape)} dimensions; at most {MAX_RANK} are supported"
        )
    for dim in shape:
        if type(dim) is not int or dim < 0:
            raise InvalidInput(
                f"input '{name}': shape must be a list of non-negative integers, got {shape!r}"
            )
    count = math.prod(shape)
    if count > MAX_ELEMENTS or (count == 0 and math.prod(d for d in shape if d) > MAX_ELEMENTS):
        raise InvalidInput(
            f"input '{name}': shape {shape} is too large (its non-zero dimensions multiply "
            "to more than 2**60 - 1)"
        )
    return shape


def element_count(shape: Sequence[int]) -> int:
    return math.prod(shape)


def numpy_dtype(name: str, datatype: Any) -> np.dtype[Any]:
    dtype = NUMPY_DTYPES.get(datatype) if isinstance(datatype, str) else None
    if dtype is None:
        known = ", ".join(NUMPY_DTYPES)
        raise InvalidInput(f"input '{name}': unknown datatype {datatype!r} (known: {known})")
    return dtype


def _flatten(name: str, data: Any) -> list[Any]:
    """Nested lists, row-major, as one flat list; nesting deeper than MAX_RANK is refused
    (no recursion, so no depth reaches Python's recursion limit)."""
    if not isinstance(data, list):
        return [data]
    out: list[Any] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                if len(stack) >= MAX_RANK:
                    raise InvalidInput(
                        f"input '{name}': data is nested deeper than {MAX_RANK} levels"
                    )
                stack.append(iter(item))
                break
            out.append(item)
        else:
            stack.pop()
    return out


def decode_json(name: str, datatype: str, shape: list[int], data: Any) -> npt.NDArray[Any]:
    """JSON `data` (flat or nested, row-major) -> array of `shape` and `datatype`."""
    dtype = numpy_dtype(name, datatype)
    count = element_count(shape)
    if datatype == BYTES:
        items = _flatten(name, data)
        if len(items) != count:
            raise InvalidInput(
                f"input '{name}': shape {shape} needs {count} elements, data has {len(items)}"
            )
        out = np.empty(count, dtype=object)
        for i, item in enumerate(items):
            if isinstance(item, str):
                out[i] = item.encode("utf-8")
            else:
                raise InvalidInput(f"input '{name}': BYTES data must be strings, got {item!r}")
        return out.reshape(shape)
    try:
        arr = np.asarray(data)
    except (ValueError, TypeError) as exc:
        raise InvalidInput(f"input '{name}': data is not a rectangular array ({exc})") from None
    if datatype in INT_TYPES and arr.dtype.kind in "fO":
        # numpy infers float64 (or object) for ints beyond int64 mixed with smaller ones
        arr = _exact_ints(name, datatype, data, arr)
    kind = arr.dtype.kind
    allowed = "b" if datatype == "BOOL" else _FLOAT_KINDS if datatype in FLOAT_TYPES else _INT_KINDS
    if kind not in allowed and arr.size:
        raise InvalidInput(f"input '{name}': data is not {datatype} ({_describe(arr)})")
    if arr.size != count:
        raise InvalidInput(
            f"input '{name}': shape {shape} needs {count} elements, data has {arr.size}"
        )
    if datatype in INT_TYPES and arr.size and arr.dtype != dtype:
        info = np.iinfo(dtype)
        if arr.min() < info.min or arr.max() > info.max:
            raise InvalidInput(f"input '{name}': value out of range for {datatype}")
    return arr.astype(dtype, copy=False).reshape(shape)


def _exact_ints(name: str, datatype: str, data: Any, inferred: npt.NDArray[Any]) -> Any:
    objects = np.array(data, dtype=object)
    if objects.shape != inferred.shape or not all(
        type(item) is int for item in objects.reshape(-1)
    ):
        return inferred
    try:
        return np.array(objects.tolist(), dtype=NUMPY_DTYPES[datatype])
    except OverflowError:
        raise InvalidInput(f"input '{name}': value out of range for {datatype}") from None


def _describe(arr: npt.NDArray[Any]) -> str:
    if arr.dtype.kind in "US":
        return "found strings"
    if arr.dtype.kind == "O":
        return "found mixed, nested-ragged or out-of-range values"
    if arr.dtype.kind == "b":
        return "found booleans"
    if arr.dtype.kind == "f":
        return "found non-integer numbers"
    return f"found {arr.dtype.name} values"


def decode_binary(
    name: str, datatype: str, shape: list[int], raw: bytes | memoryview
) -> npt.NDArray[Any]:
    """Binary tensor data (little-endian, row-major; BYTES length-prefixed) -> array."""
    dtype = numpy_dtype(name, datatype)
    count = element_count(shape)
    if datatype == BYTES:
        items = deserialize_bytes(name, raw)
        if len(items) != count:
            raise InvalidInput(
                f"input '{name}': shape {shape} needs {count} elements, data has {len(items)}"
            )
        out = np.empty(count, dtype=object)
        out[:] = items
        return out.reshape(shape)
    expected = count * ITEM_SIZE[datatype]
    if len(raw) != expected:
        raise InvalidInput(
            f"input '{name}': shape {shape} of {datatype} needs {expected} bytes, got {len(raw)}"
        )
    return np.frombuffer(raw, dtype=dtype.newbyteorder("<")).reshape(shape)


def encode_binary(datatype: str, array: npt.NDArray[Any]) -> bytes:
    if datatype == BYTES:
        return serialize_bytes(array.ravel())
    return np.ascontiguousarray(array, dtype=NUMPY_DTYPES[datatype].newbyteorder("<")).tobytes()


def serialize_bytes(items: Iterable[Any]) -> bytes:
    """Length-prefixed (uint32 little-endian) concatenation of BYTES elements."""
    parts: list[bytes] = []
    for item in items:
        value = item.encode("utf-8") if isinstance(item, str) else bytes(item)
        parts.append(_LENGTH.pack(len(value)))
        parts.append(value)
    return b"".join(parts)


def deserialize_bytes(name: str, raw: bytes | memoryview) -> list[bytes]:
    items: list[bytes] = []
    offset, end = 0, len(raw)
    view = memoryview(raw)
    while offset < end:
        if end - offset < 4:
            raise InvalidInput(f"input '{name}': truncated BYTES element length at byte {offset}")
        (length,) = _LENGTH.unpack_from(view, offset)
        offset += 4
        if offset + length > end:
            raise InvalidInput(f"input '{name}': BYTES element at byte {offset} runs past the data")
        items.append(bytes(view[offset : offset + length]))
        offset += length
    return items


def json_data(name: str, datatype: str, array: npt.NDArray[Any]) -> Any:
    """An output array as JSON-ready data (flat, row-major). Numeric arrays stay numpy
    (orjson serialises them natively); BYTES become strings."""
    if datatype == BYTES:
        out: list[str] = []
        for item in array.ravel():
            if isinstance(item, str):
                out.append(item)
                continue
            try:
                out.append(bytes(item).decode("utf-8"))
            except UnicodeDecodeError:
                raise InvalidInput(
                    f"output '{name}' holds bytes that are not UTF-8; "
                    "ask for it with binary_data (binary tensor format)"
                ) from None
        return out
    flat = array.ravel()
    if not flat.flags.c_contiguous or flat.dtype.byteorder == ">":
        flat = np.ascontiguousarray(flat, dtype=flat.dtype.newbyteorder("="))
    return flat
