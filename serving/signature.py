"""A model's input/output signature, derived from the ONNX graph itself."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from serving.errors import ModelLoadError

if TYPE_CHECKING:  # imported where a graph is read: reading a model card needs no ONNX
    import onnx


@dataclass(frozen=True, slots=True)
class TensorSpec:
    name: str
    datatype: str
    #: -1 marks a variable dimension
    shape: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}

    def accepts_shape(self, shape: list[int]) -> bool:
        if len(shape) != len(self.shape):
            return False
        return all(want in (-1, got) for want, got in zip(self.shape, shape, strict=True))


@dataclass(frozen=True, slots=True)
class Signature:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def input(self, name: str) -> TensorSpec | None:
        for spec in self.inputs:
            if spec.name == name:
                return spec
        return None

    def output(self, name: str) -> TensorSpec | None:
        for spec in self.outputs:
            if spec.name == name:
                return spec
        return None

    def to_json(self) -> dict[str, Any]:
        return {
            "inputs": [spec.to_json() for spec in self.inputs],
            "outputs": [spec.to_json() for spec in self.outputs],
        }


def _spec(value: onnx.ValueInfoProto, role: str) -> TensorSpec:
    import onnx

    from serving.datatypes import ONNX_TO_OIP

    kind = value.type.WhichOneof("value")
    if kind != "tensor_type":
        raise ModelLoadError(
            f"{role} '{value.name}' is a {kind}, not a tensor; only tensor inputs and outputs "
            "can be served (export scikit-learn classifiers with zipmap=False)"
        )
    tensor = value.type.tensor_type
    datatype = ONNX_TO_OIP.get(tensor.elem_type)
    if datatype is None:
        type_name = onnx.TensorProto.DataType.Name(tensor.elem_type)
        raise ModelLoadError(
            f"{role} '{value.name}' has ONNX type {type_name}, which is not served"
        )
    if not tensor.HasField("shape"):
        raise ModelLoadError(f"{role} '{value.name}' has no shape (not even a rank)")
    dims = tuple(
        dim.dim_value if dim.HasField("dim_value") and dim.dim_value > 0 else -1
        for dim in tensor.shape.dim
    )
    return TensorSpec(name=value.name, datatype=datatype, shape=dims)


def from_onnx(model: onnx.ModelProto) -> Signature:
    """Graph inputs (initializers excluded) and outputs as OIP tensor specs."""
    graph = model.graph
    initializers = {init.name for init in graph.initializer}
    inputs = tuple(_spec(v, "input") for v in graph.input if v.name not in initializers)
    outputs = tuple(_spec(v, "output") for v in graph.output)
    return Signature(inputs=inputs, outputs=outputs)
