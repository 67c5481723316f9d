"""Hypothesis round trips for every tensor codec over every datatype and random shapes."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from serving import grpc_codec
from serving.codecs import decode_binary, decode_json, encode_binary, json_data
from serving.datatypes import NUMPY_DTYPES
from serving.errors import InvalidInput
from serving.grpc_stubs import pb
from serving.types import InferRequest, InferResponse, Tensor

NUMERIC = [d for d in NUMPY_DTYPES if d != "BYTES"]
shapes = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)


def arrays(
    datatype: str, allow_nan: bool = True, text_only: bool = False
) -> st.SearchStrategy[Any]:
    if datatype == "BYTES":
        element = (
            st.text(max_size=8).map(lambda s: s.encode("utf-8"))
            if text_only
            else st.binary(max_size=8)
        )
        return shapes.flatmap(
            lambda shape: st.lists(
                element, min_size=int(np.prod(shape)), max_size=int(np.prod(shape))
            ).map(lambda items, shape=shape: _objects(items, shape))
        )
    dtype = NUMPY_DTYPES[datatype]
    elements = None
    if dtype.kind == "f":
        elements = st.floats(
            width=dtype.itemsize * 8, allow_nan=allow_nan, allow_infinity=allow_nan
        )
    return hnp.arrays(dtype, shapes, elements=elements)


def _objects(items: list[bytes], shape: tuple[int, ...]) -> np.ndarray:
    out = np.empty(len(items), dtype=object)
    out[:] = items
    return out.reshape(shape)


def assert_same(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape
    assert got.dtype == want.dtype
    if want.dtype.kind == "f":  # bit for bit: NaN payloads and -0.0 included
        assert np.ascontiguousarray(got).tobytes() == np.ascontiguousarray(want).tobytes()
    else:
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("datatype", list(NUMPY_DTYPES))
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_json_round_trip(datatype: str, data: st.DataObject) -> None:
    array = data.draw(arrays(datatype, allow_nan=False, text_only=True))
    wire = orjson.loads(
        orjson.dumps(json_data("x", datatype, array), option=orjson.OPT_SERIALIZE_NUMPY)
    )
    back = decode_json("x", datatype, list(array.shape), wire)
    assert_same(back, array)


@pytest.mark.parametrize("datatype", list(NUMPY_DTYPES))
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_binary_round_trip(datatype: str, data: st.DataObject) -> None:
    array = data.draw(arrays(datatype))
    back = decode_binary("x", datatype, list(array.shape), encode_binary(datatype, array))
    assert_same(back, array)


# FP16 has no typed field: that case is not a round trip but a refusal (tested below)
GRPC_CASES = [
    pytest.param(datatype, raw, id=f"{datatype}-{'raw' if raw else 'typed'}")
    for datatype in NUMPY_DTYPES
    for raw in (False, True)
    if raw or datatype != "FP16"
]


@pytest.mark.parametrize(("datatype", "raw"), GRPC_CASES)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_grpc_round_trip(datatype: str, raw: bool, data: st.DataObject) -> None:
    array = data.draw(arrays(datatype))
    tensor = Tensor("x", datatype, list(array.shape), array)
    wire = grpc_codec.encode_request(InferRequest(inputs=[tensor], id="r"), "m", raw=raw)
    message = pb.ModelInferRequest.FromString(wire.SerializeToString())
    (back,) = grpc_codec.decode_request(message).inputs
    assert (back.name, back.datatype, back.shape) == ("x", datatype, list(array.shape))
    assert_same(back.data, array)
    response = InferResponse("m", "1", "r", [tensor])
    reply = pb.ModelInferResponse.FromString(
        grpc_codec.encode_response(response, raw=raw).SerializeToString()
    )
    (out,) = grpc_codec.decode_response(reply).outputs
    assert_same(out.data, array)


def test_grpc_typed_fp16_is_refused() -> None:
    message = pb.ModelInferRequest(model_name="m")
    item = message.inputs.add()
    item.name, item.datatype = "x", "FP16"
    item.shape.extend([1])
    with pytest.raises(InvalidInput, match="FP16 has no typed contents; send it raw"):
        grpc_codec.decode_request(message)


def test_truncated_bytes_are_refused() -> None:
    with pytest.raises(InvalidInput, match="truncated BYTES element length"):
        decode_binary("x", "BYTES", [1], b"\x01\x00")
    with pytest.raises(InvalidInput, match="runs past the data"):
        decode_binary("x", "BYTES", [1], b"\x09\x00\x00\x00abc")


def test_non_utf8_bytes_cannot_be_json() -> None:
    array = _objects([b"\xff\xfe"], (1,))
    with pytest.raises(InvalidInput, match="not UTF-8"):
        json_data("y", "BYTES", array)


def test_json_bool_ints_floats_are_kept_apart() -> None:
    with pytest.raises(InvalidInput, match="data is not INT32 \\(found non-integer numbers\\)"):
        decode_json("x", "INT32", [2], [1.5, 2])
    with pytest.raises(InvalidInput, match="data is not BOOL"):
        decode_json("x", "BOOL", [2], [1, 0])
    with pytest.raises(InvalidInput, match="value out of range for UINT64"):
        decode_json("x", "UINT64", [2], [2**64, 1])
    assert decode_json("x", "FP32", [2], [1, 2]).dtype == np.float32
