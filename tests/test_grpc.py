"""gRPC-only behaviour: message-level failure modes and status codes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from serving.grpc_stubs import pb, pb_grpc
from tests.conftest import good_folders
from tests.servers import RunningServer, start_server


@pytest.fixture(scope="module")
def aio_server(
    model_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    """The same models behind grpcio's asyncio server (SERVO_GRPC_SERVER=aio)."""
    folders = [*good_folders(model_root), model_root / "corrupt" / "1"]
    running = start_server(
        folders,
        tmp_path_factory.mktemp("aio") / "server.log",
        wait_for=["digits", "identity_int8"],
        env={"SERVO_GRPC_SERVER": "aio"},
    )
    yield running
    assert running.stop() == 0, running.log()


@pytest.fixture(params=["threaded", "aio"])
def stub(request: pytest.FixtureRequest, server: RunningServer) -> Iterator[object]:
    """Every test here runs against both gRPC servers: grpcio's threaded one (the default,
    calls handed to the event loop) and its asyncio one."""
    target = server if request.param == "threaded" else request.getfixturevalue("aio_server")
    with grpc.insecure_channel(target.grpc_target) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def infer_error(stub: object, message: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(message, timeout=10)  # type: ignore[attr-defined]
    return info.value.code(), info.value.details()


def digits_request(**fields: object) -> object:
    message = pb.ModelInferRequest(model_name="digits", **fields)
    item = message.inputs.add()
    item.name, item.datatype = "input", "FP32"
    item.shape.extend([1, 64])
    return message


def test_raw_contents_must_match_inputs(stub: object) -> None:
    message = digits_request()
    message.raw_input_contents.extend([b"\x00" * 256, b"\x00" * 4])
    assert infer_error(stub, message) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "raw_input_contents has 2 entries for 1 inputs",
    )


def test_model_name_required_and_inputs_required(stub: object) -> None:
    assert infer_error(stub, pb.ModelInferRequest()) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "model_name is required",
    )
    assert infer_error(stub, pb.ModelInferRequest(model_name="digits")) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "request has no inputs",
    )


def test_typed_values_out_of_range(stub: object) -> None:
    message = pb.ModelInferRequest(model_name="identity_int8")
    item = message.inputs.add()
    item.name, item.datatype = "x", "INT8"
    item.shape.extend([1, 3])
    item.contents.int_contents.extend([1, 2, 300])
    assert infer_error(stub, message) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "input 'x': value out of range for INT8",
    )


def test_status_codes_for_models(stub: object) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelReady(pb.ModelReadyRequest(name="nope"), timeout=10)  # type: ignore[attr-defined]
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelMetadata(pb.ModelMetadataRequest(name="corrupt"), timeout=10)  # type: ignore[attr-defined]
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "not a valid ONNX model" in info.value.details()
    meta = stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=10)  # type: ignore[attr-defined]
    assert meta.name == "servo" and list(meta.extensions) == ["binary_tensor_data"]
