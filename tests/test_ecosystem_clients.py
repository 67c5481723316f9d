"""Servo driven by clients other projects wrote: tritonclient (http, grpc) and KServe's
InferenceRESTClient / InferenceGRPCClient."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

from servo.demo import digits_holdout
from tests.servers import RunningServer

# kserve parses sys.argv at import; grpc_stubs hides ours (and imports kserve first)
from serving.grpc_stubs import pb  # noqa: F401  isort: skip
import kserve


@pytest.fixture(scope="module")
def expected(model_root: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x_test, _ = digits_holdout()
    rows = x_test[:8]
    session = ort.InferenceSession(str(model_root / "digits" / "2" / "model.onnx"))
    labels, probs = session.run(None, {"input": rows})
    return rows, labels, probs


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_tritonclient_http(
    server: RunningServer, expected: tuple[np.ndarray, ...], binary: bool
) -> None:
    rows, labels, probs = expected
    client = triton_http.InferenceServerClient(url=f"127.0.0.1:{server.http_port}")
    try:
        assert client.is_server_live() is True
        assert client.is_server_ready() is False  # the corrupt model keeps it unready
        assert client.is_model_ready("digits") is True
        assert client.is_model_ready("digits", "1") is True
        assert client.is_model_ready("corrupt") is False
        meta = client.get_model_metadata("digits")
        assert meta["platform"] == "onnx_onnxv1"
        assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]
        server_meta = client.get_server_metadata()
        assert server_meta["name"] == "servo"
        inp = triton_http.InferInput("input", [8, 64], "FP32")
        inp.set_data_from_numpy(rows, binary_data=binary)
        outputs = [
            triton_http.InferRequestedOutput("label", binary_data=binary),
            triton_http.InferRequestedOutput("probabilities", binary_data=binary),
        ]
        result = client.infer("digits", [inp], outputs=outputs, request_id="t-1")
        np.testing.assert_array_equal(result.as_numpy("label"), labels)
        np.testing.assert_allclose(result.as_numpy("probabilities"), probs, atol=1e-6)
        response = result.get_response()
        assert (response["model_name"], response["model_version"], response["id"]) == (
            "digits",
            "2",
            "t-1",
        )
        bad = triton_http.InferInput("input", [1, 63], "FP32")
        bad.set_data_from_numpy(rows[:1, :63], binary_data=binary)
        with pytest.raises(InferenceServerException) as info:
            client.infer("digits", [bad])
        assert "expected shape [-1, 64]" in info.value.message()
        bytes_in = triton_http.InferInput("x", [1, 3], "BYTES")
        words = np.array([[b"a", "é".encode(), b""]], dtype=object)
        bytes_in.set_data_from_numpy(words, binary_data=binary)
        echoed = client.infer("identity_bytes", [bytes_in]).as_numpy("y")
        np.testing.assert_array_equal(echoed.astype(bytes), words.astype(bytes))
    finally:
        client.close()


def test_tritonclient_grpc(server: RunningServer, model_root: Path) -> None:
    # tritonclient.grpc and kserve register the same protobuf package ("inference") and
    # cannot share one process: the probe runs in its own interpreter.
    probe = subprocess.run(
        [sys.executable, "-m", "tests.triton_grpc_probe", server.grpc_target, str(model_root)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=Path(__file__).parent.parent,
    )
    assert probe.returncode == 0, probe.stdout + probe.stderr
    assert probe.stdout.strip().endswith("tritonclient.grpc: all checks passed")


def test_kserve_rest_client(server: RunningServer, expected: tuple[np.ndarray, ...]) -> None:
    rows, labels, probs = expected

    async def run() -> None:
        client = kserve.InferenceRESTClient(kserve.RESTConfig(protocol="v2", timeout=30))
        try:
            assert await client.is_server_live(server.url) is True
            assert await client.is_model_ready(server.url, "digits") is True
            for binary in (False, True):
                inp = kserve.InferInput("input", [8, 64], "FP32")
                inp.set_data_from_numpy(rows, binary_data=binary)
                request = kserve.InferRequest("digits", [inp], request_id="k-1")
                response = await client.infer(server.url, request, model_name="digits")
                assert response.id == "k-1"  # (KServe's REST decoder drops model_version)
                by_name = {o.name: o.as_numpy() for o in response.outputs}
                np.testing.assert_array_equal(by_name["label"], labels)
                np.testing.assert_allclose(by_name["probabilities"], probs, atol=1e-6)
            bad = kserve.InferInput("pixels", [8, 64], "FP32")
            bad.set_data_from_numpy(rows, binary_data=False)
            with pytest.raises(httpx.HTTPStatusError) as info:
                await client.infer(server.url, kserve.InferRequest("digits", [bad]), "digits")
            assert info.value.response.status_code == 400
            assert info.value.response.json() == {
                "error": "model 'digits' has no input 'pixels' (inputs: input)"
            }
            v1 = kserve.InferenceRESTClient(kserve.RESTConfig(protocol="v1", timeout=30))
            try:
                reply = await v1.infer(server.url, {"instances": rows.tolist()}, "digits")
                assert [p["label"] for p in reply["predictions"]] == labels.tolist()
            finally:
                await v1.close()
        finally:
            await client.close()

    asyncio.run(run())


def test_kserve_grpc_client(server: RunningServer, expected: tuple[np.ndarray, ...]) -> None:
    rows, labels, probs = expected

    async def run() -> None:
        client = kserve.InferenceGRPCClient(server.grpc_target, timeout=30, retries=2)
        try:
            assert await client.is_server_live() is True
            assert await client.is_model_ready("digits") is True
            inp = kserve.InferInput("input", [8, 64], "FP32")
            inp.set_data_from_numpy(rows, binary_data=False)  # typed contents
            response = await client.infer(kserve.InferRequest("digits", [inp], request_id="kg"))
            assert response.id == "kg"
            by_name = {o.name: o.as_numpy() for o in response.outputs}
            np.testing.assert_array_equal(by_name["label"], labels)
            np.testing.assert_allclose(by_name["probabilities"], probs, atol=1e-6)
            raw = kserve.InferInput("input", [8, 64], "FP32")
            raw.set_data_from_numpy(rows, binary_data=True)  # raw_input_contents
            response = await client.infer(kserve.InferRequest("digits", [raw]))
            by_name = {o.name: o.as_numpy() for o in response.outputs}
            np.testing.assert_array_equal(by_name["label"], labels)
        finally:
            await client.close()

    asyncio.run(run())
