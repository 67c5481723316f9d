"""OIP REST bodies (JSON, and JSON + binary tensor extension) <-> InferRequest/InferResponse."""

from __future__ import annotations

from typing import Any

import orjson

from serving.codecs import check_shape, decode_binary, decode_json, encode_binary, json_data
from serving.errors import InvalidInput
from serving.types import InferRequest, InferResponse, RequestedOutput, Tensor

_DUMP_OPTIONS = orjson.OPT_SERIALIZE_NUMPY


def loads(body: bytes | memoryview) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"malformed JSON: {exc}") from None


def dumps(doc: Any) -> bytes:
    return orjson.dumps(doc, option=_DUMP_OPTIONS)


def parse_header_length(raw: bytes | None, body_size: int) -> int | None:
    """Inference-Header-Content-Length as a size within the body (None: no header)."""
    if raw is None:
        return None
    # never int() of more digits than the body's size has (Python refuses 4,300 and more)
    digits = raw if len(raw) <= 20 else raw.lstrip(b"0") or b"0"
    if len(digits) <= 20 and digits.isdigit():
        size = int(digits)
        if size <= body_size:
            return size
    shown = raw[:20].decode("latin-1") + ("..." if len(raw) > 20 else "")
    if not raw.isdigit():
        raise InvalidInput(f"Inference-Header-Content-Length {shown} is not a size")
    raise InvalidInput(
        f"Inference-Header-Content-Length {shown} exceeds the body ({body_size} bytes)"
    )


def parse_infer_request(body: bytes, header_length: int | None) -> InferRequest:
    """Parse an OIP infer body; `header_length` is Inference-Header-Content-Length."""
    binary: memoryview | None = None
    header: bytes | memoryview = body
    if header_length is not None:
        if header_length > len(body):
            raise InvalidInput(
                f"Inference-Header-Content-Length {header_length} exceeds the body "
                f"({len(body)} bytes)"
            )
        view = memoryview(body)
        header, binary = view[:header_length], view[header_length:]
    doc = loads(header)
    if not isinstance(doc, dict):
        raise InvalidInput("request body must be a JSON object")
    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise InvalidInput("request needs a non-empty 'inputs' list")
    inputs: list[Tensor] = []
    offset = 0
    for position, item in enumerate(raw_inputs):
        if not isinstance(item, dict):
            raise InvalidInput(f"inputs[{position}] must be an object")
        name = item.get("name")
        if not isinstance(name, str):
            raise InvalidInput(f"inputs[{position}] needs a string 'name'")
        datatype = item.get("datatype")
        if not isinstance(datatype, str):
            raise InvalidInput(f"input '{name}' needs a string 'datatype'")
        shape = check_shape(name, item.get("shape"))
        params = item.get("parameters")
        size = params.get("binary_data_size") if isinstance(params, dict) else None
        if size is not None:
            if binary is None:
                raise InvalidInput(
                    f"input '{name}': binary_data_size given, but the request has no "
                    "Inference-Header-Content-Length header"
                )
            if type(size) is not int or size < 0 or offset + size > len(binary):
                raise InvalidInput(
                    f"input '{name}': binary_data_size {size!r} does not fit the "
                    f"{len(binary) - offset} binary bytes left"
                )
            data = decode_binary(name, datatype, shape, binary[offset : offset + size])
            offset += size
        elif "data" in item:
            data = decode_json(name, datatype, shape, item["data"])
        else:
            raise InvalidInput(f"input '{name}' has neither 'data' nor binary_data_size")
        inputs.append(Tensor(name, datatype, shape, data))
    if binary is not None and offset != len(binary):
        raise InvalidInput(
            f"{len(binary) - offset} bytes of binary data are not claimed by any input"
        )
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidInput("'id' must be a string")
    parameters = doc.get("parameters")
    if parameters is None:
        parameters = {}
    elif not isinstance(parameters, dict):
        raise InvalidInput("'parameters' must be an object")
    return InferRequest(
        inputs=inputs,
        id=request_id,
        outputs=_parse_outputs(doc.get("outputs")),
        parameters=parameters,
    )


def _parse_outputs(raw: Any) -> list[RequestedOutput] | None:
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise InvalidInput("'outputs' must be a list")
    outputs: list[RequestedOutput] = []
    for position, item in enumerate(raw):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise InvalidInput(f"outputs[{position}] must be an object with a string 'name'")
        params = item.get("parameters")
        binary = params.get("binary_data") if isinstance(params, dict) else None
        if binary is not None and not isinstance(binary, bool):
            raise InvalidInput(f"output '{item['name']}': binary_data must be true or false")
        outputs.append(RequestedOutput(item["name"], binary))
    return outputs or None


def encode_infer_response(
    response: InferResponse, request: InferRequest
) -> tuple[bytes, int | None]:
    """The response body and, when any output is binary, its JSON header's length."""
    default_binary = request.parameters.get("binary_data_output") is True
    binary_for = {o.name: o.binary for o in request.outputs} if request.outputs else {}
    outputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for tensor in response.outputs:
        binary = binary_for.get(tensor.name)
        entry: dict[str, Any] = {
            "name": tensor.name,
            "datatype": tensor.datatype,
            "shape": tensor.shape,
        }
        if binary or (binary is None and default_binary):
            blob = encode_binary(tensor.datatype, tensor.data)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = json_data(tensor.name, tensor.datatype, tensor.data)
        outputs.append(entry)
    doc: dict[str, Any] = {
        "model_name": response.model_name,
        "model_version": response.model_version,
        "id": response.id,
        "outputs": outputs,
    }
    if response.parameters:
        doc["parameters"] = response.parameters
    head = dumps(doc)
    if not blobs:
        return head, None
    return b"".join([head, *blobs]), len(head)
