"""REST-only behaviour: the wire format's own failure modes, V1, routing, readiness."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from servo.demo import digits_holdout
from tests.conftest import good_folders
from tests.servers import RunningServer, start_server


@pytest.fixture
def http(server: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


def one_row() -> list[float]:
    x_test, _ = digits_holdout()
    return [float(v) for v in x_test[0]]


def infer_doc(data: object, shape: object = (1, 64), datatype: str = "FP32") -> dict[str, object]:
    return {"inputs": [{"name": "input", "datatype": datatype, "shape": list(shape), "data": data}]}  # type: ignore[call-overload]


BAD_BODIES = [
    (b'{"inputs": [', "malformed JSON: "),
    (b"[1, 2, 3]", "request body must be a JSON object"),
    (b'{"inputs": []}', "request needs a non-empty 'inputs' list"),
    (
        b'{"id": 5, "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], '
        b'"data": []}]}',
        "input 'input': shape [1, 64] needs 64 elements, data has 0",
    ),
    (orjson.dumps(infer_doc(["a"] * 64)), "input 'input': data is not FP32 (found strings)"),
    (
        orjson.dumps(infer_doc([[1.0] * 64, [1.0] * 3], shape=(2, 64))),
        "input 'input': data is not a rectangular array",
    ),
    (
        orjson.dumps(infer_doc([1.0] * 64, shape=(1, "64"))),
        "input 'input': shape must be a list of non-negative integers, got [1, '64']",
    ),
    (
        orjson.dumps(infer_doc([1.0] * 64, shape=(1, -64))),
        "input 'input': shape must be a list of non-negative integers, got [1, -64]",
    ),
    (
        orjson.dumps(infer_doc([1.0] * 64, datatype="FLOAT")),
        "input 'input': unknown datatype 'FLOAT'",
    ),
    (
        b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64]}]}',
        "input 'input' has neither 'data' nor binary_data_size",
    ),
    (
        b'{"inputs": [{"datatype": "FP32", "shape": [1, 64], "data": []}]}',
        "inputs[0] needs a string 'name'",
    ),
    (
        b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], '
        b'"parameters": {"binary_data_size": 256}}]}',
        "input 'input': binary_data_size given, but the request has no "
        "Inference-Header-Content-Length header",
    ),
    (b"NaN", "malformed JSON: "),
]


@pytest.mark.parametrize(("body", "message"), BAD_BODIES)
def test_malformed_bodies(http: httpx.Client, body: bytes, message: str) -> None:
    reply = http.post("/v2/models/digits/infer", content=body)
    assert reply.status_code == 400
    assert reply.json()["error"].startswith(message)
    # still serving
    ok = http.post("/v2/models/digits/infer", content=orjson.dumps(infer_doc(one_row())))
    assert ok.status_code == 200


def test_int_values_out_of_range(http: httpx.Client) -> None:
    doc = {"inputs": [{"name": "x", "datatype": "INT8", "shape": [1, 3], "data": [1, 2, 300]}]}
    reply = http.post("/v2/models/identity_int8/infer", content=orjson.dumps(doc))
    assert (reply.status_code, reply.json()) == (
        400,
        {"error": "input 'x': value out of range for INT8"},
    )


def binary_body(header: dict[str, object], blob: bytes) -> tuple[bytes, dict[str, str]]:
    head = orjson.dumps(header)
    return head + blob, {"Inference-Header-Content-Length": str(len(head))}


def test_binary_sizes_must_add_up(http: httpx.Client) -> None:
    blob = b"\x00" * 256
    spec = {"name": "input", "datatype": "FP32", "shape": [1, 64]}
    body, headers = binary_body(
        {"inputs": [{**spec, "parameters": {"binary_data_size": 300}}]}, blob
    )
    reply = http.post("/v2/models/digits/infer", content=body, headers=headers)
    assert reply.status_code == 400
    assert reply.json()["error"] == (
        "input 'input': binary_data_size 300 does not fit the 256 binary bytes left"
    )
    body, headers = binary_body(
        {"inputs": [{**spec, "parameters": {"binary_data_size": 256}}]}, blob + b"xx"
    )
    reply = http.post("/v2/models/digits/infer", content=body, headers=headers)
    assert reply.json()["error"] == "2 bytes of binary data are not claimed by any input"
    reply = http.post(
        "/v2/models/digits/infer", content=b"{}", headers={"Inference-Header-Content-Length": "99"}
    )
    assert reply.json()["error"] == "Inference-Header-Content-Length 99 exceeds the body (2 bytes)"
    reply = http.post(
        "/v2/models/digits/infer", content=b"{}", headers={"Inference-Header-Content-Length": "x"}
    )
    assert reply.status_code == 400


def test_binary_output_only_where_asked(http: httpx.Client) -> None:
    doc = {
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": one_row()}],
        "outputs": [
            {"name": "label"},
            {"name": "probabilities", "parameters": {"binary_data": True}},
        ],
    }
    reply = http.post("/v2/models/digits/infer", content=orjson.dumps(doc))
    assert reply.status_code == 200
    assert reply.headers["content-type"] == "application/octet-stream"
    length = int(reply.headers["inference-header-content-length"])
    head = orjson.loads(reply.content[:length])
    label, probs = head["outputs"]
    assert label["data"] == [2] and "parameters" not in label
    assert probs["parameters"] == {"binary_data_size": 40}
    assert len(reply.content) == length + 40


def test_oversized_body_is_413_before_reading_it(http: httpx.Client) -> None:
    reply = http.post("/v2/models/digits/infer", content=b" " * (8 * 1024 * 1024 + 1))
    assert reply.status_code == 413
    assert reply.json() == {"error": "request body of 8388609 bytes exceeds 8388608 bytes"}

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted while reading
        for _ in range(9):
            yield b" " * (1024 * 1024)

    reply = http.post("/v2/models/digits/infer", content=chunks())
    assert reply.status_code == 413
    assert reply.json() == {"error": "request body exceeds 8388608 bytes"}


def test_routing_errors(http: httpx.Client) -> None:
    assert http.get("/v2/nothing").status_code == 404
    assert http.get("/v2/nothing").json() == {"error": "no route for /v2/nothing"}
    reply = http.get("/v2/models/digits/infer")
    assert (reply.status_code, reply.json()) == (
        405,
        {"error": "GET not allowed here (allowed: POST)"},
    )
    reply = http.get("/v2/models/..%2F..%2Fetc/ready")
    assert reply.status_code == 404


def test_server_metadata(http: httpx.Client) -> None:
    doc = http.get("/v2").json()
    assert doc["name"] == "servo" and doc["extensions"] == ["binary_tensor_data"]
    assert doc["version"]


def test_failed_model_explains_itself(http: httpx.Client) -> None:
    reply = http.get("/v2/models/corrupt")
    assert reply.status_code == 503
    assert "not a valid ONNX model" in reply.json()["error"]
    reply = http.get("/v2/models/corrupt/ready")
    doc = reply.json()
    assert (reply.status_code, doc["name"], doc["ready"]) == (503, "corrupt", False)
    assert doc["reason"].startswith("version 1 is failed: ") and "not a valid ONNX" in doc["reason"]


def test_v1(http: httpx.Client) -> None:
    models = http.get("/v1/models").json()["models"]
    assert {"digits", "mlp", "pair", "corrupt"} <= set(models)
    assert http.get("/v1/models/digits").json() == {"name": "digits", "ready": True}
    assert http.get("/v1/models/nope").status_code == 404
    x_test, y_test = digits_holdout()
    reply = http.post("/v1/models/digits:predict", json={"instances": x_test[:20].tolist()})
    assert reply.status_code == 200
    predictions = reply.json()["predictions"]
    assert len(predictions) == 20 and set(predictions[0]) == {"label", "probabilities"}
    assert sum(p["label"] == y for p, y in zip(predictions, y_test[:20], strict=True)) >= 18
    pair = http.post(
        "/v1/models/pair:predict",
        json={"instances": [{"a": [1, 2], "b": [3, 4]}, {"a": [0, 0], "b": [1, 1]}]},
    )
    assert pair.json()["predictions"] == [
        {"sum": [4.0, 6.0], "double": [2.0, 4.0]},
        {"sum": [1.0, 1.0], "double": [0.0, 0.0]},
    ]
    for body, message in [
        ({"instances": []}, "'instances' is empty"),
        ({"inputs": [1]}, "V1 request needs an 'instances' list"),
        (
            {"instances": [[1, 2]]},
            "input 'input': expected shape [-1, 64] (-1: any size), got [1, 2]",
        ),
        ({"instances": [{"a": [1, 2]}]}, None),
    ]:
        model = "pair" if message is None else "digits"
        reply = http.post(f"/v1/models/{model}:predict", json=body)
        assert reply.status_code == 400
        if message is not None:
            assert reply.json()["error"] == message


def test_ready_when_every_model_loaded(model_root: Path, tmp_path: Path) -> None:
    good = start_server(good_folders(model_root)[:3], tmp_path / "good.log", wait_for=["digits"])
    try:
        assert httpx.get(f"{good.url}/v2/health/ready").status_code == 200
    finally:
        assert good.stop() == 0
    assert "loaded model digits version 1" in good.log()
