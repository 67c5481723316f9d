"""OIP gRPC messages (typed `contents` and `raw_*_contents`) <-> InferRequest/InferResponse."""

from __future__ import annotations

from typing import Any

import numpy as np

from serving.codecs import (
    check_shape,
    decode_binary,
    element_count,
    encode_binary,
    numpy_dtype,
)
from serving.datatypes import BYTES
from serving.errors import InvalidInput
from serving.grpc_stubs import pb
from serving.types import InferRequest, InferResponse, RequestedOutput, Tensor

#: OIP datatype -> the InferTensorContents field that carries it (FP16 has none: raw only)
TYPED_FIELD: dict[str, str] = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    BYTES: "bytes_contents",
}


def _parameter(value: Any) -> Any:
    kind = value.WhichOneof("parameter_choice")
    return getattr(value, kind) if kind else None


def payload_bytes(message: Any) -> int:
    """About how many bytes a request's inputs carry (raw contents exactly, typed contents
    4 per element), without walking them: what decides whether it is decoded off the loop."""
    raw = message.raw_input_contents
    if raw:
        return sum(len(item) for item in raw)
    total = 0
    for item in message.inputs:
        field = TYPED_FIELD.get(item.datatype)
        if field is not None:
            total += 4 * len(getattr(item.contents, field))
    return total


def decode_serialized(data: bytes) -> InferRequest:
    """decode_request of a serialized ModelInferRequest (in the decoding worker process)."""
    return decode_request(pb.ModelInferRequest.FromString(data))


def decode_request(message: Any) -> InferRequest:
    raw = message.raw_input_contents
    if raw and len(raw) != len(message.inputs):
        raise InvalidInput(
            f"raw_input_contents has {len(raw)} entries for {len(message.inputs)} inputs"
        )
    if not message.inputs:
        raise InvalidInput("request has no inputs")
    inputs: list[Tensor] = []
    for position, item in enumerate(message.inputs):
        name, datatype = item.name, item.datatype
        shape = check_shape(name, list(item.shape))
        if raw:
            data = decode_binary(name, datatype, shape, raw[position])
        else:
            data = _decode_typed(name, datatype, shape, item.contents)
        inputs.append(Tensor(name, datatype, shape, data))
    outputs = [RequestedOutput(o.name) for o in message.outputs] or None
    parameters = {key: _parameter(value) for key, value in message.parameters.items()}
    return InferRequest(
        inputs=inputs, id=message.id or None, outputs=outputs, parameters=parameters
    )


def _decode_typed(name: str, datatype: str, shape: list[int], contents: Any) -> Any:
    dtype = numpy_dtype(name, datatype)
    field = TYPED_FIELD.get(datatype)
    if field is None:
        raise InvalidInput(f"input '{name}': {datatype} has no typed contents; send it raw")
    values = getattr(contents, field)
    count = element_count(shape)
    if len(values) != count:
        raise InvalidInput(
            f"input '{name}': shape {shape} needs {count} elements, {field} has {len(values)}"
        )
    if datatype == BYTES:
        out = np.empty(count, dtype=object)
        out[:] = list(values)
        return out.reshape(shape)
    try:
        return np.array(values, dtype=dtype).reshape(shape)
    except OverflowError:
        raise InvalidInput(f"input '{name}': value out of range for {datatype}") from None


def encode_response(response: InferResponse, raw: bool) -> Any:
    message = pb.ModelInferResponse(
        model_name=response.model_name, model_version=response.model_version, id=response.id
    )
    use_raw = raw or any(t.datatype not in TYPED_FIELD for t in response.outputs)
    for tensor in response.outputs:
        out = message.outputs.add()
        out.name = tensor.name
        out.datatype = tensor.datatype
        out.shape.extend(tensor.shape)
        if use_raw:
            message.raw_output_contents.append(encode_binary(tensor.datatype, tensor.data))
        elif tensor.datatype == BYTES:
            out.contents.bytes_contents.extend(
                item.encode("utf-8") if isinstance(item, str) else bytes(item)
                for item in tensor.data.reshape(-1)
            )
        else:
            getattr(out.contents, TYPED_FIELD[tensor.datatype]).extend(
                tensor.data.reshape(-1).tolist()
            )
    return message


def encode_request(request: InferRequest, model_name: str, raw: bool) -> Any:
    """The client side (tests and benchmarks): an InferRequest as a ModelInferRequest."""
    message = pb.ModelInferRequest(model_name=model_name, id=request.id or "")
    for tensor in request.inputs:
        item = message.inputs.add()
        item.name, item.datatype = tensor.name, tensor.datatype
        item.shape.extend(tensor.shape)
        if raw:
            message.raw_input_contents.append(encode_binary(tensor.datatype, tensor.data))
        elif tensor.datatype == BYTES:
            item.contents.bytes_contents.extend(tensor.data.reshape(-1).tolist())
        elif tensor.datatype in TYPED_FIELD:
            getattr(item.contents, TYPED_FIELD[tensor.datatype]).extend(
                tensor.data.reshape(-1).tolist()
            )
    return message


def decode_response(message: Any) -> InferResponse:
    """The client side: a ModelInferResponse as an InferResponse."""
    raw = message.raw_output_contents
    outputs: list[Tensor] = []
    for position, item in enumerate(message.outputs):
        shape = list(item.shape)
        if raw:
            data = decode_binary(item.name, item.datatype, shape, raw[position])
        else:
            data = _decode_typed(item.name, item.datatype, shape, item.contents)
        outputs.append(Tensor(item.name, item.datatype, shape, data))
    return InferResponse(message.model_name, message.model_version, message.id, outputs)
