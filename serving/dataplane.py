"""The data plane shared by REST and gRPC: look up, validate, run, answer.

Nothing that fails validation here reaches ONNX Runtime.
"""

from __future__ import annotations

import itertools
import math
import os
from typing import Any

import numpy as np

from serving.datatypes import FLOAT_TYPES
from serving.errors import InvalidInput
from serving.repository import ModelRepository, State
from serving.types import InferRequest, InferResponse, Tensor


class RequestIds:
    """Ids for requests that bring none: a random per-process prefix and a counter
    (unique without a system call per request)."""

    def __init__(self) -> None:
        self._prefix = os.urandom(6).hex()
        self._counter = itertools.count(1)

    def next(self) -> str:
        return f"{self._prefix}-{next(self._counter):x}"


class DataPlane:
    def __init__(self, repository: ModelRepository, server_name: str, server_version: str):
        self.repository = repository
        self.server_name = server_name
        self.server_version = server_version
        self._ids = RequestIds()

    # health and metadata

    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        return self.repository.all_ready()

    def server_metadata(self) -> dict[str, Any]:
        return {
            "name": self.server_name,
            "version": self.server_version,
            "extensions": ["binary_tensor_data"],
        }

    def model_ready(self, name: str, version: str | None = None) -> bool:
        return self.repository.entry(name, version).state is State.READY

    def model_metadata(self, name: str, version: str | None = None) -> dict[str, Any]:
        model = self.repository.model(name, version)
        if version is None:
            versions = [
                v
                for v in self.repository.versions(name)
                if self.repository.entry(name, v).state is State.READY
            ]
        else:
            versions = [version]
        return {
            "name": model.name,
            "versions": versions,
            "platform": model.platform,
            **model.signature.to_json(),
        }

    # inference

    async def infer(self, name: str, version: str | None, request: InferRequest) -> InferResponse:
        model = self.repository.model(name, version)
        signature = model.signature
        feeds: dict[str, Any] = {}
        allow_non_finite = model.card.allow_non_finite
        for tensor in request.inputs:
            spec = signature.input(tensor.name)
            if spec is None:
                known = ", ".join(s.name for s in signature.inputs)
                raise InvalidInput(
                    f"model '{model.name}' has no input '{tensor.name}' (inputs: {known})"
                )
            if tensor.name in feeds:
                raise InvalidInput(f"input '{tensor.name}' appears more than once")
            if tensor.datatype != spec.datatype:
                raise InvalidInput(
                    f"input '{tensor.name}': expected datatype {spec.datatype}, "
                    f"got {tensor.datatype}"
                )
            if not spec.accepts_shape(tensor.shape):
                raise InvalidInput(
                    f"input '{tensor.name}': expected shape {list(spec.shape)} "
                    f"(-1: any size), got {tensor.shape}"
                )
            if (
                spec.datatype in FLOAT_TYPES
                and tensor.name not in allow_non_finite
                # one reduction on the common path; a non-finite sum (also reached by
                # overflow of large finite values) takes the exact check
                and not math.isfinite(tensor.data.sum(dtype=np.float64))
            ):
                finite = np.isfinite(tensor.data)
                if not finite.all():
                    index = int(np.argmin(finite.reshape(-1)))
                    raise InvalidInput(
                        f"input '{tensor.name}': NaN or Inf at flat index {index}; "
                        "this input only takes finite values"
                    )
            feeds[tensor.name] = tensor.data
        if len(feeds) != len(signature.inputs):
            missing = [s.name for s in signature.inputs if s.name not in feeds]
            raise InvalidInput(f"model '{model.name}' needs input(s) {', '.join(missing)}")
        output_names: list[str] | None = None
        if request.outputs:
            output_names = []
            for wanted in request.outputs:
                if signature.output(wanted.name) is None:
                    known = ", ".join(s.name for s in signature.outputs)
                    raise InvalidInput(
                        f"model '{model.name}' has no output '{wanted.name}' (outputs: {known})"
                    )
                if wanted.name in output_names:
                    raise InvalidInput(f"output '{wanted.name}' is requested more than once")
                output_names.append(wanted.name)
        arrays = await model.predict(feeds, output_names)
        specs = (
            signature.outputs
            if output_names is None
            else tuple(s for n in output_names for s in signature.outputs if s.name == n)
        )
        outputs = [
            Tensor(spec.name, spec.datatype, list(array.shape), array)
            for spec, array in zip(specs, arrays, strict=True)
        ]
        return InferResponse(
            model_name=model.name,
            model_version=model.version,
            id=request.id if request.id is not None else self._ids.next(),
            outputs=outputs,
        )
