"""The data plane shared by REST and gRPC: look up, validate, run, answer.

Nothing that fails validation here reaches ONNX Runtime.
"""

from __future__ import annotations

import itertools
import math
import os
from typing import Any

import numpy as np

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
        plan = model.plan
        feeds: dict[str, Any] = {}
        for tensor in request.inputs:
            found = plan.inputs.get(tensor.name)
            if found is None:
                raise InvalidInput(
                    f"model '{model.name}' has no input '{tensor.name}' "
                    f"(inputs: {', '.join(plan.inputs)})"
                )
            spec, finite_only = found
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
            # one reduction on the common path; a non-finite sum (also reached by overflow
            # of large finite values) takes the exact check
            if finite_only and not math.isfinite(tensor.data.sum(dtype=np.float64)):
                finite = np.isfinite(tensor.data)
                if not finite.all():
                    index = int(np.argmin(finite.reshape(-1)))
                    raise InvalidInput(
                        f"input '{tensor.name}': NaN or Inf at flat index {index}; "
                        "this input only takes finite values"
                    )
            feeds[tensor.name] = tensor.data
        if len(feeds) != len(plan.inputs):
            missing = [n for n in plan.inputs if n not in feeds]
            raise InvalidInput(f"model '{model.name}' needs input(s) {', '.join(missing)}")
        specs = plan.output_specs
        output_names: list[str] | None = None
        if request.outputs:
            output_names = []
            for wanted in request.outputs:
                if wanted.name not in plan.outputs:
                    raise InvalidInput(
                        f"model '{model.name}' has no output '{wanted.name}' "
                        f"(outputs: {', '.join(plan.outputs)})"
                    )
                if wanted.name in output_names:
                    raise InvalidInput(f"output '{wanted.name}' is requested more than once")
                output_names.append(wanted.name)
            specs = tuple(plan.outputs[n] for n in output_names)
        arrays = await model.predict(feeds, output_names)
        return InferResponse(
            model_name=model.name,
            model_version=model.version,
            id=request.id if request.id is not None else self._ids.next(),
            outputs=[
                Tensor(spec.name, spec.datatype, list(array.shape), array)
                for spec, array in zip(specs, arrays, strict=True)
            ],
        )
