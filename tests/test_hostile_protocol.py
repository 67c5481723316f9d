"""Hostile OIP requests against a real server (issue 9, points 10 and 11; point 8 is in
test_offloop_decode.py).

Each case goes over REST JSON, REST binary and gRPC (typed and raw contents) where it
applies, and checks four things: the status, that the message names the problem, that
`servo_requests_total` counted the answer, and that a good request is served afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from serving.grpc_stubs import pb, pb_grpc
from servo.demo import digits_holdout
from tests.models import failing_model, write_model
from tests.servers import RunningServer, start_server

MAX_BODY = 96 * 1024 * 1024
GRPC_TO_HTTP = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNKNOWN: 520,  # what an escaped exception became before the fix
}
PROTOCOLS = ["rest-json", "rest-binary", "grpc-typed", "grpc-raw"]
HUGE = [2**62, 0, 3]


@pytest.fixture(scope="module")
def hostile(model_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """digits, the FP32 and BYTES identity models and one that fails in ONNX Runtime, with a
    body limit large enough for the big-body cases."""
    extra = tmp_path_factory.mktemp("hostile-models")
    write_model(extra / "failing" / "1", failing_model(), "failing")
    running = start_server(
        [
            model_root / "digits" / "1",
            model_root / "identity_fp32" / "1",
            model_root / "identity_bytes" / "1",
            extra / "failing" / "1",
        ],
        tmp_path_factory.mktemp("hostile-logs") / "server.log",
        wait_for=["digits", "identity_fp32", "identity_bytes", "failing"],
        env={"SERVO_MAX_REQUEST_BYTES": str(MAX_BODY)},
    )
    yield running
    assert running.stop() == 0, running.log()


@pytest.fixture(scope="module")
def stub(hostile: RunningServer) -> Iterator[Any]:
    options = [
        ("grpc.max_send_message_length", MAX_BODY),
        ("grpc.max_receive_message_length", MAX_BODY),
    ]
    with grpc.insecure_channel(hostile.grpc_target, options=options) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


# what the tests send


def rest_json(
    server: RunningServer, model: str, inputs: list[dict[str, Any]], **doc: Any
) -> httpx.Response:
    body = orjson.dumps({**doc, "inputs": inputs})
    return httpx.post(f"{server.url}/v2/models/{model}/infer", content=body, timeout=60)


def rest_binary(
    server: RunningServer,
    model: str,
    inputs: list[tuple[dict[str, Any], bytes]],
    header_length: str | None = None,
    **doc: Any,
) -> httpx.Response:
    entries = [{**entry, "parameters": {"binary_data_size": len(blob)}} for entry, blob in inputs]
    head = orjson.dumps({**doc, "inputs": entries})
    headers = {
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": header_length or str(len(head)),
    }
    body = head + b"".join(blob for _, blob in inputs)
    return httpx.post(
        f"{server.url}/v2/models/{model}/infer", content=body, headers=headers, timeout=60
    )


def grpc_infer(stub: Any, message: Any) -> tuple[int, str]:
    """(status, message) of a ModelInfer call: 200 and "" when it succeeds."""
    try:
        stub.ModelInfer(message, timeout=60)
    except grpc.RpcError as exc:
        return GRPC_TO_HTTP.get(exc.code(), 599), exc.details() or ""
    return 200, ""


def grpc_message(
    model: str, shape: list[int], values: list[float], raw: bool, **fields: Any
) -> Any:
    message = pb.ModelInferRequest(model_name=model, **fields)
    item = message.inputs.add()
    item.name = "input" if model in ("digits", "failing") else "x"
    item.datatype = "FP32"
    item.shape.extend(shape)
    if raw:
        message.raw_input_contents.append(np.asarray(values, dtype="<f4").tobytes())
    else:
        item.contents.fp32_contents.extend(values)
    return message


def send(
    server: RunningServer,
    stub: Any,
    protocol: str,
    model: str,
    shape: list[int],
    values: list[float],
    **doc: Any,
) -> tuple[int, str]:
    """One FP32 input `input` (digits, failing) or `x` (identity) over `protocol`."""
    name = "input" if model in ("digits", "failing") else "x"
    entry = {"name": name, "datatype": "FP32", "shape": shape}
    if protocol.startswith("grpc"):
        return grpc_infer(stub, grpc_message(model, shape, values, protocol == "grpc-raw", **doc))
    if protocol == "rest-json":
        reply = rest_json(server, model, [{**entry, "data": values}], **doc)
    else:
        reply = rest_binary(server, model, [(entry, np.asarray(values, "<f4").tobytes())], **doc)
    return reply.status_code, reply.json().get("error", "") if reply.status_code != 200 else ""


# what the tests check


def requests_counted(server: RunningServer, model: str, protocol: str, code: str) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "servo_requests"
        for sample in family.samples
        if sample.name == "servo_requests_total"
        and sample.labels["model"] == model
        and sample.labels["protocol"] == protocol
        and sample.labels["code"] == code
    )


def wire(protocol: str) -> str:
    return "grpc" if protocol.startswith("grpc") else "rest"


def good_request_works(server: RunningServer, stub: Any, protocol: str) -> None:
    row = digits_holdout()[0][0].astype(np.float32).tolist()
    assert send(server, stub, protocol, "digits", [1, 64], row) == (200, "")


def check(
    server: RunningServer,
    stub: Any,
    protocol: str,
    model: str,
    call: Callable[[], tuple[int, str]],
    status: int,
    needle: str,
) -> None:
    code = str(status)
    before = requests_counted(server, model, wire(protocol), code)
    got, message = call()
    assert got == status, message
    assert needle in message
    assert requests_counted(server, model, wire(protocol), code) == before + 1
    good_request_works(server, stub, protocol)


# point 11: shapes and sizes


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_shape_of_65_dimensions_is_refused(
    hostile: RunningServer, stub: Any, protocol: str
) -> None:
    shape = [1] * 65
    check(
        hostile, stub, protocol, "digits",
        lambda: send(hostile, stub, protocol, "digits", shape, [1.0]),
        400, "input 'input': shape has 65 dimensions; at most 64 are supported",
    )  # fmt: skip


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("shape", [HUGE, [2**61, 0, 2**3], [2**40, 2**40]], ids=str)
def test_a_shape_too_large_for_any_array_is_refused(
    hostile: RunningServer, stub: Any, protocol: str, shape: list[int]
) -> None:
    check(
        hostile, stub, protocol, "digits",
        lambda: send(hostile, stub, protocol, "digits", shape, []),
        400, f"input 'input': shape {shape} is too large",
    )  # fmt: skip


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("shape", [[0, 64], [2**40, 0]], ids=str)
def test_an_empty_batch_never_reaches_onnx_runtime(
    hostile: RunningServer, stub: Any, protocol: str, shape: list[int]
) -> None:
    message = f"input 'input': shape {shape} has no elements" if shape[1] else "expected shape"
    check(
        hostile, stub, protocol, "digits",
        lambda: send(hostile, stub, protocol, "digits", shape, []),
        400, message,
    )  # fmt: skip


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_an_empty_tensor_with_a_valid_shape_is_refused(
    hostile: RunningServer, stub: Any, protocol: str
) -> None:
    """identity [N, 3]: [0, 3] passes the signature, and has no rows to run."""
    check(
        hostile, stub, protocol, "identity_fp32",
        lambda: send(hostile, stub, protocol, "identity_fp32", [0, 3], []),
        400, "input 'x': shape [0, 3] has no elements",
    )  # fmt: skip


@pytest.mark.parametrize("protocol", ["rest-json", "rest-binary"])
def test_negative_and_non_integer_dimensions_are_refused(
    hostile: RunningServer, stub: Any, protocol: str
) -> None:
    for shape in ([-1, 64], [1.5, 64], [True, 64]):
        check(
            hostile, stub, protocol, "digits",
            lambda shape=shape: send(hostile, stub, protocol, "digits", shape, [1.0] * 64),
            400, "shape must be a list of non-negative integers",
        )  # fmt: skip


@pytest.mark.parametrize("protocol", ["grpc-typed", "grpc-raw"])
def test_negative_dimensions_are_refused_over_grpc(
    hostile: RunningServer, stub: Any, protocol: str
) -> None:
    check(
        hostile, stub, protocol, "digits",
        lambda: send(hostile, stub, protocol, "digits", [-1, 64], [1.0] * 64),
        400, "shape must be a list of non-negative integers",
    )  # fmt: skip


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_element_count_must_match_the_data(
    hostile: RunningServer, stub: Any, protocol: str
) -> None:
    check(
        hostile, stub, protocol, "digits",
        lambda: send(hostile, stub, protocol, "digits", [3, 64], [1.0] * 64),
        400, "input 'input': shape [3, 64]",
    )  # fmt: skip


def test_bytes_data_nested_deeper_than_any_shape_is_refused(
    hostile: RunningServer, stub: Any
) -> None:
    """900 levels: deeper than orjson writes (255) and than Python's recursion limit."""
    data = b"[" * 900 + b'"x", "y", "z"' + b"]" * 900
    body = b'{"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1, 3], "data": %s}]}'
    check(
        hostile, stub, "rest-json", "identity_bytes",
        lambda: _status(httpx.post(f"{hostile.url}/v2/models/identity_bytes/infer",
                                   content=body % data, timeout=60)),
        400, "input 'x': data is nested deeper than 64 levels",
    )  # fmt: skip


def _status(reply: httpx.Response) -> tuple[int, str]:
    return reply.status_code, reply.json().get("error", "")


@pytest.mark.parametrize("value", ["9" * 5000, "1" + "0" * 30, "12a"], ids=["5000", "30", "12a"])
def test_inference_header_content_length_that_cannot_fit_the_body(
    hostile: RunningServer, stub: Any, value: str
) -> None:
    entry = {"name": "input", "datatype": "FP32", "shape": [1, 64]}
    blob = np.ones(64, "<f4").tobytes()
    needle = "is not a size" if not value.isdigit() else "exceeds the body"
    check(
        hostile, stub, "rest-binary", "digits",
        lambda: _status(rest_binary(hostile, "digits", [(entry, blob)], header_length=value)),
        400, f"Inference-Header-Content-Length {value[:20]}",
    )  # fmt: skip
    reply = rest_binary(hostile, "digits", [(entry, blob)], header_length=value)
    assert needle in reply.json()["error"]
    assert len(reply.json()["error"]) < 200  # the 5,000 digits are not echoed back


# point 11: every answer is counted, a 500 included


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_500_is_counted(hostile: RunningServer, stub: Any, protocol: str) -> None:
    """The failing model's Reshape fails in ONNX Runtime on every call."""
    check(
        hostile, stub, protocol, "failing",
        lambda: send(hostile, stub, protocol, "failing", [1, 64], [1.0] * 64),
        500, "model 'failing' version 1",
    )  # fmt: skip


def test_an_unexpected_error_becomes_a_counted_500() -> None:
    """An exception that is no ServingError (a bug) is answered 500 and counted, through the
    one place that counts failures."""
    from prometheus_client import CollectorRegistry

    from serving.dataplane import DataPlane
    from serving.recorder import Recorder
    from serving.repository import ModelRepository
    from serving.router import Router
    from serving.runtime import RuntimeOptions
    from serving.shadow import ShadowRunner

    recorder = Recorder(CollectorRegistry())
    repository = ModelRepository(RuntimeOptions(), 1)
    try:
        plane = DataPlane(
            repository=repository,
            router=Router(),
            recorder=recorder,
            shadows=ShadowRunner(recorder, 1, 1.0),
            server_name="servo",
            server_version="0",
        )
        error = plane.failed("digits", None, "grpc", ZeroDivisionError("bug"), 0.0)
        assert int(error.status) == 500 and error.message == "internal server error"
        assert recorder.requests == {("_unknown", "", "", "grpc", "500"): 1}
    finally:
        repository.close()


# point 10: inference ids


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_inference_ids_are_limited_to_256_characters(
    hostile: RunningServer, stub: Any, protocol: str
) -> None:
    row = [1.0] * 64
    ok = "i" * 256
    assert send(hostile, stub, protocol, "digits", [1, 64], row, id=ok) == (200, "")
    long = "i" * (4 * 1024 * 1024)
    check(
        hostile, stub, protocol, "digits",
        lambda: send(hostile, stub, protocol, "digits", [1, 64], row, id=long),
        400, "'id' must be at most 256 characters (got 4194304)",
    )  # fmt: skip


@pytest.mark.parametrize("server", ["uvicorn", "native"])
def test_a_413_before_the_endpoint_is_counted(
    model_root: Path, tmp_path: Path, server: str
) -> None:
    """Both HTTP servers refuse an oversize body before the endpoint runs (413): counted
    through AsgiApp.refuse, like the endpoint's own answers."""
    running = start_server(
        [model_root / "digits" / "1"],
        tmp_path / "server.log",
        wait_for=["digits"],
        env={"SERVO_HTTP_SERVER": server, "SERVO_MAX_REQUEST_BYTES": "100000"},
    )
    try:
        before = requests_counted(running, "digits", "rest", "413")
        reply = httpx.post(f"{running.url}/v2/models/digits/infer", content=b"x" * 200_000)
        assert reply.status_code == 413
        assert reply.json()["error"] == "request body of 200000 bytes exceeds 100000 bytes"
        assert requests_counted(running, "digits", "rest", "413") == before + 1
        row = digits_holdout()[0][0].astype(np.float32).tolist()
        good = rest_json(running, "digits", [{"name": "input", "datatype": "FP32",
                                              "shape": [1, 64], "data": row}])  # fmt: skip
        assert good.status_code == 200
    finally:
        assert running.stop() == 0, running.log()
