"""One OIP conformance suite, run over REST (JSON, binary) and gRPC (typed, raw)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from serving.types import InferRequest, Tensor
from servo.demo import digits_holdout
from tests.clients import GrpcClient, OipError, RestClient, request_of
from tests.conftest import good_folders
from tests.models import ONNX_TYPES
from tests.servers import RunningServer, start_remote_gateway
from tests.test_routing import wait_until


def gateway_ready(server: RunningServer, name: str) -> bool:
    return httpx.get(f"{server.url}/v2/models/{name}/ready").status_code == 200


CLIENTS = ["rest-json", "rest-binary", "grpc-typed", "grpc-raw"]
Client = RestClient | GrpcClient


def _gateway(
    server: RunningServer, model_root: Path, log: Path, grpc: bool
) -> Iterator[RunningServer]:
    gateway = start_remote_gateway(
        server,
        good_folders(model_root),
        log,
        local=[model_root / "corrupt" / "1", model_root / "missing" / "1"],
        env={"SERVO_MAX_REQUEST_BYTES": str(8 * 1024 * 1024)},
        grpc=grpc,
    )
    wait_until(lambda: all(gateway_ready(gateway, f.parent.name) for f in good_folders(model_root)))
    yield gateway
    assert gateway.stop() == 0, gateway.log()


@pytest.fixture(scope="module")
def remote(
    server: RunningServer, model_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    """A gateway in front of `server` that serves every good version remotely
    (serving.remote) over OIP REST, and the broken ones locally."""
    yield from _gateway(server, model_root, tmp_path_factory.mktemp("remote") / "gw.log", False)


@pytest.fixture(scope="module")
def remote_grpc(
    server: RunningServer, model_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    """The same gateway, its remote versions over OIP gRPC."""
    yield from _gateway(server, model_root, tmp_path_factory.mktemp("grpc") / "gw.log", True)


#: (what serves, client): every client against the server itself and the REST-remote
#: gateway; the gRPC-remote gateway (what it adds is the gateway -> backend transport, the
#: same for every client) with one client per protocol, to keep the suite cheap
SERVED_CLIENTS = [
    *((served, client) for served in ("server", "remote") for client in CLIENTS),
    ("remote_grpc", "rest-json"),
    ("remote_grpc", "grpc-raw"),
]


@pytest.fixture(params=SERVED_CLIENTS, ids=["-".join(pair) for pair in SERVED_CLIENTS])
def client(request: pytest.FixtureRequest) -> Iterator[Client]:
    served_by, kind = request.param
    served: RunningServer = request.getfixturevalue(served_by)
    made: Client
    if kind.startswith("rest"):
        made = RestClient(served.url, binary=kind == "rest-binary")
    else:
        made = GrpcClient(served.grpc_target, raw=kind == "grpc-raw")
    yield made
    made.close()


def digits_input(rows: np.ndarray) -> Tensor:
    data = np.ascontiguousarray(rows, dtype=np.float32)
    return Tensor("input", "FP32", list(data.shape), data)


def test_health(client: Client) -> None:
    assert client.live() is True
    # the server holds a corrupt model, so it is not ready as a whole
    assert client.ready() is False


def test_metadata_from_the_onnx_graph(client: Client) -> None:
    assert client.metadata("digits") == {
        "name": "digits",
        "versions": ["1", "2"],
        "platform": "onnx_onnxv1",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}],
        "outputs": [
            {"name": "label", "datatype": "INT64", "shape": [-1]},
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]},
        ],
    }
    assert client.metadata("digits", "1")["versions"] == ["1"]


def test_model_ready(client: Client) -> None:
    assert client.model_ready("digits") is True
    assert client.model_ready("digits", "1") is True
    assert client.model_ready("corrupt") is False
    with pytest.raises(OipError) as info:
        client.model_ready("no-such-model")
    assert info.value.status == 404


def test_infer_matches_onnx_runtime_for_each_version(client: Client, model_root: Path) -> None:
    x_test, y_test = digits_holdout()
    rows = x_test[:50]
    for version in ("1", "2"):
        session = ort.InferenceSession(str(model_root / "digits" / version / "model.onnx"))
        want_labels, want_probs = session.run(None, {"input": rows})
        reply = client.infer("digits", request_of(digits_input(rows)), version=version)
        assert (reply.model_name, reply.model_version) == ("digits", version)
        label, probs = reply.outputs
        assert (label.name, label.datatype, label.shape) == ("label", "INT64", [50])
        assert (probs.name, probs.datatype, probs.shape) == ("probabilities", "FP32", [50, 10])
        np.testing.assert_array_equal(label.data, want_labels)
        np.testing.assert_allclose(probs.data, want_probs, rtol=0, atol=1e-6)
        assert (label.data == y_test[:50]).mean() > 0.9
    # no version: the highest one answers
    assert client.infer("digits", request_of(digits_input(rows[:1]))).model_version == "2"


def test_request_id_is_echoed_or_generated(client: Client) -> None:
    x_test, _ = digits_holdout()
    reply = client.infer("digits", request_of(digits_input(x_test[:1]), id="req-42"))
    assert reply.id == "req-42"
    first = client.infer("digits", request_of(digits_input(x_test[:1]))).id
    second = client.infer("digits", request_of(digits_input(x_test[:1]))).id
    assert first and second and first != second


def test_requested_outputs_only(client: Client) -> None:
    x_test, _ = digits_holdout()
    reply = client.infer("digits", request_of(digits_input(x_test[:3]), outputs=["probabilities"]))
    assert [o.name for o in reply.outputs] == ["probabilities"]
    assert reply.outputs[0].shape == [3, 10]


def sample(datatype: str, rows: int) -> np.ndarray:
    rng = np.random.default_rng(7)
    shape = (rows, 3)
    if datatype == "BOOL":
        return rng.integers(0, 2, shape).astype(bool)
    if datatype == "BYTES":
        words = np.array([f"w{i}-é".encode() for i in range(rows * 3)], dtype=object)
        return words.reshape(shape)
    dtype = np.dtype(
        {"FP16": "float16", "FP32": "float32", "FP64": "float64"}.get(datatype, datatype.lower())
    )
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)


@pytest.mark.parametrize("datatype", list(ONNX_TYPES))
def test_every_datatype_round_trips(client: Client, datatype: str) -> None:
    data = sample(datatype, 4)
    if datatype == "FP16" and client.protocol == "grpc-typed":
        # OIP gRPC has no typed contents field for FP16: it must travel raw
        with pytest.raises(OipError) as info:
            client.infer("identity_fp16", request_of(Tensor("x", datatype, [4, 3], data)))
        assert info.value.status == 400
        assert info.value.message == "input 'x': FP16 has no typed contents; send it raw"
        return
    reply = client.infer(
        f"identity_{datatype.lower()}", request_of(Tensor("x", datatype, [4, 3], data))
    )
    (out,) = reply.outputs
    assert (out.name, out.datatype, out.shape) == ("y", datatype, [4, 3])
    np.testing.assert_array_equal(out.data, data)


def test_two_inputs_and_missing_input(client: Client) -> None:
    a = np.array([[1, 2], [3, 4]], dtype=np.float32)
    b = np.array([[10, 20], [30, 40]], dtype=np.float32)
    reply = client.infer(
        "pair", request_of(Tensor("a", "FP32", [2, 2], a), Tensor("b", "FP32", [2, 2], b))
    )
    outs = {o.name: o.data for o in reply.outputs}
    np.testing.assert_array_equal(outs["sum"], a + b)
    np.testing.assert_array_equal(outs["double"], a * 2)
    with pytest.raises(OipError) as info:
        client.infer("pair", request_of(Tensor("a", "FP32", [2, 2], a)))
    assert (info.value.status, info.value.message) == (400, "model 'pair' needs input(s) b")


def fp32(shape: list[int], fill: float = 1.0, size: int | None = None) -> Tensor:
    count = math.prod(shape) if size is None else size
    return Tensor("input", "FP32", shape, np.full(count, fill, dtype=np.float32))


# (case, model, version, request, status, message substring per protocol or for all)
BAD: list[tuple[str, str, str | None, Callable[[], InferRequest], int, str | dict[str, str]]] = [
    (
        "unknown input",
        "digits",
        None,
        lambda: request_of(Tensor("pixels", "FP32", [1, 64], np.ones((1, 64), np.float32))),
        400,
        "model 'digits' has no input 'pixels' (inputs: input)",
    ),
    (
        "wrong datatype",
        "digits",
        None,
        lambda: request_of(Tensor("input", "FP64", [1, 64], np.ones((1, 64), np.float64))),
        400,
        "input 'input': expected datatype FP32, got FP64",
    ),
    (
        "wrong shape",
        "digits",
        None,
        lambda: request_of(fp32([1, 63])),
        400,
        "input 'input': expected shape [-1, 64] (-1: any size), got [1, 63]",
    ),
    (
        "wrong rank",
        "digits",
        None,
        lambda: request_of(fp32([64])),
        400,
        "input 'input': expected shape [-1, 64] (-1: any size), got [64]",
    ),
    (
        "count not matching shape",
        "digits",
        None,
        lambda: request_of(fp32([2, 64], size=64)),
        400,
        {
            "rest-json": "input 'input': shape [2, 64] needs 128 elements, data has 64",
            "rest-binary": "input 'input': shape [2, 64] of FP32 needs 512 bytes, got 256",
            "grpc-typed": "input 'input': shape [2, 64] needs 128 elements, fp32_contents has 64",
            "grpc-raw": "input 'input': shape [2, 64] of FP32 needs 512 bytes, got 256",
        },
    ),
    (
        "NaN",
        "digits",
        None,
        lambda: request_of(fp32([1, 64], math.nan)),
        400,
        {
            "rest-json": "input 'input': data is not FP32",
            "*": "input 'input': NaN or Inf at flat index 0; this input only takes finite values",
        },
    ),
    (
        "Inf",
        "digits",
        None,
        lambda: request_of(fp32([1, 64], math.inf)),
        400,
        {
            "rest-json": "input 'input': data is not FP32",
            "*": "input 'input': NaN or Inf at flat index 0; this input only takes finite values",
        },
    ),
    (
        "unknown output",
        "digits",
        None,
        lambda: request_of(fp32([1, 64]), outputs=["logits"]),
        400,
        "model 'digits' has no output 'logits' (outputs: label, probabilities)",
    ),
    (
        "unknown model",
        "nope",
        None,
        lambda: request_of(fp32([1, 64])),
        404,
        "model 'nope' not found",
    ),
    (
        "unknown version",
        "digits",
        "9",
        lambda: request_of(fp32([1, 64])),
        404,
        "model 'digits' has no version '9'",
    ),
    (
        "corrupt model.onnx",
        "corrupt",
        None,
        lambda: request_of(Tensor("x", "FP32", [1, 3], np.ones((1, 3), np.float32))),
        503,
        "not a valid ONNX model",
    ),
    (
        "missing model.onnx",
        "missing",
        None,
        lambda: request_of(Tensor("x", "FP32", [1, 3], np.ones((1, 3), np.float32))),
        503,
        "model.onnx: cannot read (No such file or directory)",
    ),
    (
        "too large",
        "mlp",
        None,
        lambda: request_of(Tensor("input", "FP32", [3000, 784], np.ones((3000, 784), np.float32))),
        413,
        {
            # grpcio's own refusal, past SERVO_MAX_BODY_BYTES as its max_receive_message_length
            "grpc": "Received message larger than max (",
            "*": "exceeds 8388608 bytes",
        },
    ),
]


@pytest.mark.parametrize(
    ("case", "model", "version", "build", "status", "message"), BAD, ids=[c[0] for c in BAD]
)
def test_bad_requests_get_precise_errors(
    client: Client,
    case: str,
    model: str,
    version: str | None,
    build: Callable[[], InferRequest],
    status: int,
    message: str | dict[str, str],
) -> None:
    with pytest.raises(OipError) as info:
        client.infer(model, build(), version=version)
    if isinstance(message, str):
        expected = message
    else:  # by protocol, else by family (grpc-typed, grpc-raw: grpc), else "*"
        family = client.protocol.split("-")[0]
        expected = message.get(client.protocol) or message.get(family) or message["*"]
    assert expected, case  # an empty message would be contained in any answer
    assert info.value.status == status, info.value.message
    assert expected in info.value.message, info.value.message
    if status == 413:  # the limit is named, whoever refused
        assert "8388608" in info.value.message, info.value.message
    # and the server keeps serving
    x_test, _ = digits_holdout()
    assert client.infer("digits", request_of(digits_input(x_test[:1]))).outputs[0].shape == [1]


def test_non_finite_allowed_where_the_card_says_so(client: Client) -> None:
    data = np.array([[math.nan, math.inf, -math.inf]], dtype=np.float64)
    if client.protocol == "rest-json":
        # JSON has no NaN literal (the client sends null): a precise 400, not a crash
        with pytest.raises(OipError) as info:
            client.infer("identity_fp64", request_of(Tensor("x", "FP64", [1, 3], data)))
        assert info.value.status == 400
        assert info.value.message.startswith("input 'x': data is not FP64")
        return
    reply = client.infer("identity_fp64", request_of(Tensor("x", "FP64", [1, 3], data)))
    np.testing.assert_array_equal(reply.outputs[0].data, data)
