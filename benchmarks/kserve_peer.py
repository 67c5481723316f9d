"""The peer: the stock KServe ModelServer serving an ONNX model through a plain
`kserve.Model` (ONNX Runtime inside `predict`), as a KServe user would write it.

    python benchmarks/kserve_peer.py HTTP_PORT GRPC_PORT MODEL_DIR [MODEL_DIR ...]

Each MODEL_DIR is a Servo model version folder (`<name>/<version>/model.onnx`).
"""

from __future__ import annotations

import sys
import uuid
from pathlib import Path
from typing import Any

import onnxruntime as ort

argv = sys.argv[1:]
sys.argv = sys.argv[:1]  # kserve parses sys.argv at import time
import kserve  # noqa: E402
from kserve import InferOutput, InferRequest, InferResponse  # noqa: E402
from kserve.utils.numpy_codec import from_np_dtype  # noqa: E402


class OnnxModel(kserve.Model):  # type: ignore[misc]
    def __init__(self, name: str, path: Path):
        super().__init__(name)
        self.path = path
        self.session: Any = None

    def load(self) -> bool:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(
            str(self.path), opts, providers=["CPUExecutionProvider"]
        )
        self.ready = True
        return True

    async def predict(self, payload: InferRequest, headers: Any = None, **_: Any) -> InferResponse:
        feeds = {inp.name: inp.as_numpy() for inp in payload.inputs}
        names = [o.name for o in self.session.get_outputs()]
        results = self.session.run(names, feeds)
        outputs = []
        for name, array in zip(names, results, strict=True):
            out = InferOutput(
                name=name, shape=list(array.shape), datatype=from_np_dtype(array.dtype)
            )
            out.set_data_from_numpy(array, binary_data=payload.use_binary_outputs)
            outputs.append(out)
        return InferResponse(
            response_id=payload.id or str(uuid.uuid4()),
            model_name=self.name,
            infer_outputs=outputs,
            use_binary_outputs=payload.use_binary_outputs,
        )


if __name__ == "__main__":
    http_port, grpc_port = int(argv[0]), int(argv[1])
    models = [OnnxModel(Path(f).parent.name, Path(f) / "model.onnx") for f in argv[2:]]
    for model in models:
        model.load()
    kserve.ModelServer(
        http_port=http_port, grpc_port=grpc_port, workers=1, enable_latency_logging=False
    ).start(models)
