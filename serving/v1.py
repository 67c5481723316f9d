"""The V1 (TensorFlow Serving style) protocol: `instances` in, `predictions` out.

A model with one input takes `instances` as a list of rows; a model with several takes a
list of objects keyed by input name. With one output, `predictions` is a list of that
output's rows; with several, a list of objects keyed by output name.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from serving.codecs import decode_json
from serving.errors import InvalidInput
from serving.rest_codec import loads
from serving.signature import Signature
from serving.types import InferRequest, InferResponse, Tensor


def _tensor(name: str, datatype: str, rows: list[Any]) -> Tensor:
    try:
        shape = list(np.asarray(rows, dtype=object if datatype == "BYTES" else None).shape)
    except (ValueError, TypeError):
        raise InvalidInput(f"input '{name}': instances are not a rectangular array") from None
    return Tensor(name, datatype, shape, decode_json(name, datatype, shape, rows))


def parse_predict_body(body: bytes, signature: Signature) -> InferRequest:
    """A V1 predict body (JSON) as an InferRequest for a model of `signature`."""
    return parse_predict(loads(body), signature)


def parse_predict(doc: Any, signature: Signature) -> InferRequest:
    if not isinstance(doc, dict) or not isinstance(doc.get("instances"), list):
        raise InvalidInput("V1 request needs an 'instances' list")
    instances: list[Any] = doc["instances"]
    if not instances:
        raise InvalidInput("'instances' is empty")
    if len(signature.inputs) == 1:
        spec = signature.inputs[0]
        return InferRequest(inputs=[_tensor(spec.name, spec.datatype, instances)])
    tensors: list[Tensor] = []
    for spec in signature.inputs:
        rows: list[Any] = []
        for position, instance in enumerate(instances):
            if not isinstance(instance, dict) or spec.name not in instance:
                raise InvalidInput(
                    f"instances[{position}] must be an object with key '{spec.name}' "
                    "(this model has several inputs)"
                )
            rows.append(instance[spec.name])
        tensors.append(_tensor(spec.name, spec.datatype, rows))
    return InferRequest(inputs=tensors)


def _rows(tensor: Tensor) -> list[Any]:
    data = tensor.data
    if tensor.datatype == "BYTES":
        return [
            item.decode("utf-8", "replace") if isinstance(item, bytes) else item
            for item in data.reshape(-1)
        ]
    rows: list[Any] = data.tolist()
    return rows


def encode_predict(response: InferResponse) -> dict[str, Any]:
    if len(response.outputs) == 1:
        return {"predictions": _rows(response.outputs[0])}
    columns = {tensor.name: _rows(tensor) for tensor in response.outputs}
    count = len(next(iter(columns.values())))
    return {
        "predictions": [{name: rows[i] for name, rows in columns.items()} for i in range(count)]
    }
