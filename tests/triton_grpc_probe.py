"""tritonclient.grpc against a running Servo. Run by tests/test_ecosystem_clients.py in its
own interpreter: tritonclient's protobufs clash with kserve's in one process."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import tritonclient.grpc as triton_grpc
from tritonclient.utils import InferenceServerException

from servo.demo import digits_holdout


def expect_error(call: object, status: str, message: str) -> None:
    try:
        call()  # type: ignore[operator]
    except InferenceServerException as exc:
        assert exc.status() == status, (exc.status(), exc.message())
        assert exc.message() == message, exc.message()
        return
    raise AssertionError(f"expected {status}")


def main(target: str, model_root: Path) -> None:
    x_test, _ = digits_holdout()
    rows = x_test[:8]
    session = ort.InferenceSession(str(model_root / "digits" / "2" / "model.onnx"))
    labels, probs = session.run(None, {"input": rows})
    client = triton_grpc.InferenceServerClient(url=target)
    try:
        assert client.is_server_live() is True
        assert client.is_server_ready() is False  # the corrupt model keeps it unready
        assert client.is_model_ready("digits") is True
        assert client.is_model_ready("corrupt") is False
        meta = client.get_model_metadata("digits", as_json=True)
        assert meta["platform"] == "onnx_onnxv1", meta
        assert meta["versions"] == ["1", "2"], meta
        assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": ["-1", "64"]}]
        inp = triton_grpc.InferInput("input", [8, 64], "FP32")
        inp.set_data_from_numpy(rows)  # tritonclient sends raw_input_contents
        result = client.infer("digits", [inp], model_version="1", request_id="g-1")
        response = result.get_response()
        assert (response.model_version, response.id) == ("1", "g-1"), response
        assert result.as_numpy("label").shape == (8,)
        result = client.infer("digits", [inp])
        np.testing.assert_array_equal(result.as_numpy("label"), labels)
        np.testing.assert_allclose(result.as_numpy("probabilities"), probs, atol=1e-6)
        expect_error(
            lambda: client.infer("nope", [inp]), "StatusCode.NOT_FOUND", "model 'nope' not found"
        )
        bad = triton_grpc.InferInput("input", [8, 64], "FP64")
        bad.set_data_from_numpy(rows.astype(np.float64))
        expect_error(
            lambda: client.infer("digits", [bad]),
            "StatusCode.INVALID_ARGUMENT",
            "input 'input': expected datatype FP32, got FP64",
        )
        words = np.array([[b"a", "é".encode(), b""]], dtype=object)
        bytes_in = triton_grpc.InferInput("x", [1, 3], "BYTES")
        bytes_in.set_data_from_numpy(words)
        echoed = client.infer("identity_bytes", [bytes_in]).as_numpy("y")
        np.testing.assert_array_equal(echoed.astype(bytes), words.astype(bytes))
    finally:
        client.close()
    print("tritonclient.grpc: all checks passed")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
