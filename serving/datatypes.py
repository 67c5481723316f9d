"""Open Inference Protocol datatypes and their numpy and ONNX equivalents."""

from __future__ import annotations

from typing import Final

import numpy as np
from onnx import TensorProto

BYTES: Final = "BYTES"

#: OIP datatype -> numpy dtype. BYTES tensors are object arrays of ``bytes``.
NUMPY_DTYPES: Final[dict[str, np.dtype[np.generic]]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    BYTES: np.dtype(object),
}

#: ONNX tensor element type -> OIP datatype (the types ONNX Runtime takes from numpy).
ONNX_TO_OIP: Final[dict[int, str]] = {
    TensorProto.BOOL: "BOOL",
    TensorProto.UINT8: "UINT8",
    TensorProto.UINT16: "UINT16",
    TensorProto.UINT32: "UINT32",
    TensorProto.UINT64: "UINT64",
    TensorProto.INT8: "INT8",
    TensorProto.INT16: "INT16",
    TensorProto.INT32: "INT32",
    TensorProto.INT64: "INT64",
    TensorProto.FLOAT16: "FP16",
    TensorProto.FLOAT: "FP32",
    TensorProto.DOUBLE: "FP64",
    TensorProto.STRING: BYTES,
}

#: Size in bytes of one element in the binary tensor format (BYTES is variable).
ITEM_SIZE: Final[dict[str, int]] = {
    name: dtype.itemsize for name, dtype in NUMPY_DTYPES.items() if name != BYTES
}

FLOAT_TYPES: Final = frozenset({"FP16", "FP32", "FP64"})
INT_TYPES: Final = frozenset(
    {"UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64"}
)


def oip_datatype(dtype: np.dtype[np.generic]) -> str:
    """The OIP datatype of a numpy dtype (strings and objects are BYTES)."""
    if dtype.kind in "OSU":
        return BYTES
    for name, candidate in NUMPY_DTYPES.items():
        if candidate == dtype:
            return name
    raise ValueError(f"numpy dtype {dtype} has no Open Inference Protocol datatype")
