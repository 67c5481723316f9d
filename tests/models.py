"""Tiny real ONNX models built in fixtures (never written into the source tree)."""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import TensorProto, helper

from serving import signature
from serving.datatypes import NUMPY_DTYPES
from serving.model_folder import MODEL_FILE, ModelCard, write_card

ONNX_TYPES = {
    "BOOL": TensorProto.BOOL,
    "UINT8": TensorProto.UINT8,
    "UINT16": TensorProto.UINT16,
    "UINT32": TensorProto.UINT32,
    "UINT64": TensorProto.UINT64,
    "INT8": TensorProto.INT8,
    "INT16": TensorProto.INT16,
    "INT32": TensorProto.INT32,
    "INT64": TensorProto.INT64,
    "FP16": TensorProto.FLOAT16,
    "FP32": TensorProto.FLOAT,
    "FP64": TensorProto.DOUBLE,
    "BYTES": TensorProto.STRING,
}
assert set(ONNX_TYPES) == set(NUMPY_DTYPES)


def write_model(
    folder: Path, model: onnx.ModelProto, name: str, version: str = "1", **card: object
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MODEL_FILE).write_bytes(model.SerializeToString())
    write_card(
        folder,
        ModelCard(
            name=name,
            version=version,
            framework="onnx",
            created_at="2026-11-29T00:00:00+00:00",
            signature=signature.from_onnx(model),
            **card,  # type: ignore[arg-type]
        ),
    )
    return folder


def identity_model(datatype: str) -> onnx.ModelProto:
    """x [N, 3] of `datatype` -> y = x."""
    elem = ONNX_TYPES[datatype]
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        f"identity_{datatype.lower()}",
        [helper.make_tensor_value_info("x", elem, ["N", 3])],
        [helper.make_tensor_value_info("y", elem, ["N", 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def two_input_model() -> onnx.ModelProto:
    """a [N, 2] FP32, b [N, 2] FP32 -> sum = a + b, scaled = a * 2 (INT check: none)."""
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["a", "b"], ["sum"]),
            helper.make_node("Add", ["a", "a"], ["double"]),
        ],
        "two_inputs",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 2]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", 2]),
        ],
        [
            helper.make_tensor_value_info("sum", TensorProto.FLOAT, ["N", 2]),
            helper.make_tensor_value_info("double", TensorProto.FLOAT, ["N", 2]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def failing_model() -> onnx.ModelProto:
    """input [N, 64] FP32 -> fails at run time (64 values per row do not reshape to 7s)."""
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [-1, 7])
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["input", "shape"], ["label"])],
        "failing",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("label", TensorProto.FLOAT, ["N", 7])],
        initializer=[shape],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def slow_model(size: int = 1536) -> onnx.ModelProto:
    """input [N, 64] FP32 -> probabilities [N, 10]: correct shapes, but each call tiles the
    input to `size` rows and multiplies `size`x`size` matrices (hundreds of ms)."""
    import numpy as np
    from onnx import numpy_helper

    rng = np.random.default_rng(0)
    inits = [
        helper.make_tensor("repeats", TensorProto.INT64, [2], [size, 1]),
        numpy_helper.from_array(rng.standard_normal((64, size)).astype(np.float32), "w0"),
        numpy_helper.from_array(rng.standard_normal((size, size)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.standard_normal((size, 10)).astype(np.float32), "w2"),
        helper.make_tensor("axes", TensorProto.INT64, [1], [0]),
    ]
    nodes = [
        helper.make_node("Tile", ["input", "repeats"], ["tiled"]),
        helper.make_node("MatMul", ["tiled", "w0"], ["h0"]),
        helper.make_node("MatMul", ["h0", "w1"], ["h1"]),
        helper.make_node("MatMul", ["h1", "w1"], ["h2"]),
        helper.make_node("MatMul", ["h2", "w1"], ["h3"]),
        helper.make_node("MatMul", ["h3", "w2"], ["h4"]),
        helper.make_node("ReduceMean", ["h4", "axes"], ["mean"], keepdims=1),
        helper.make_node("Softmax", ["mean"], ["probabilities"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "slow",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 10])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    return model


def gather_model() -> onnx.ModelProto:
    """idx [N, 1] INT64 -> rows [N, 1, 3] FP32 of a fixed 10x3 table; an index outside
    0..9 fails at run time, for that request only."""
    import numpy as np
    from onnx import numpy_helper

    table = np.arange(30, dtype=np.float32).reshape(10, 3)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "idx"], ["rows"], axis=0)],
        "gather",
        [helper.make_tensor_value_info("idx", TensorProto.INT64, ["N", 1])],
        [helper.make_tensor_value_info("rows", TensorProto.FLOAT, ["N", 1, 3])],
        initializer=[numpy_helper.from_array(table, "table")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model
