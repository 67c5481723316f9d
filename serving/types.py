"""Internal values of the data plane: one request type in, one response type out."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

#: the longest request id (characters), as for feedback ids: ids are kept by the feedback
#: index and the payload log, so a client must not choose their size
MAX_ID_CHARS = 256


@dataclass(slots=True)
class Tensor:
    """A named tensor; ``data`` already has ``shape`` and the numpy dtype of ``datatype``."""

    name: str
    datatype: str
    shape: list[int]
    data: npt.NDArray[Any]


@dataclass(slots=True)
class RequestedOutput:
    name: str
    #: REST only: send this output in the binary tensor format (None: the request's default).
    binary: bool | None = None


@dataclass(slots=True)
class InferRequest:
    inputs: list[Tensor]
    id: str | None = None
    #: None means every output of the model.
    outputs: list[RequestedOutput] | None = None
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class InferResponse:
    model_name: str
    model_version: str
    id: str
    outputs: list[Tensor]
    parameters: dict[str, Any] = field(default_factory=dict)
    #: who answered: champion, canary or other (not sent on the wire)
    variant: str = "champion"


def as_tensor(name: str, datatype: str, array: npt.NDArray[Any]) -> Tensor:
    return Tensor(name=name, datatype=datatype, shape=list(array.shape), data=np.asarray(array))
