"""The gateway's remote backend (serving.remote): a route's version served by another
Servo server over OIP REST or gRPC, next to local versions; faults from real HTTP and gRPC
servers on 127.0.0.1 that fail on purpose (refused connections, hangs, 5xx, 4xx, gRPC
status codes); batching at the edge and the metadata retry on real backends in-process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import orjson
import pytest

from serving.batcher import BatchingConfig
from serving.errors import ModelLoadError
from serving.grpc_stubs import pb, pb_grpc
from serving.remote import RemoteModel
from serving.routes import RouteError, parse_routes
from serving.runtime import RemoteOptions, RuntimeOptions
from tests.servers import RunningServer, free_port, start_server
from tests.test_routing import BODY, metric, versions_answering, wait_until, write_routes

PAIR_BODY = orjson.dumps(
    {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 3], "data": [1, 2, 3, 4, 5, 6]}]}
)
ECHO_SIGNATURE = {
    "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 3]}],
    "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 3]}],
}


class FaultyBackend:
    """An OIP server answering metadata for any model (an echo signature, x -> y) whose
    infer does what `mode` says: "echo" (answers y = x), "hang", "500", "400". `calls`
    holds the rows of every infer request it got."""

    def __init__(self, mode: str, port: int | None = None):
        self.mode = mode
        self.release = threading.Event()
        self.connections: list[socket.socket] = []
        self.calls: list[int] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def setup(self) -> None:
                super().setup()
                owner.connections.append(self.connection)

            def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
                self.send_response(status)
                for key, value in {**headers, "Content-Length": str(len(body))}.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                name = self.path.split("/")[3]
                self._send(200, json.dumps({"name": name, **ECHO_SIGNATURE}).encode(), {})

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                size = int(self.headers["Inference-Header-Content-Length"])
                shape = orjson.loads(body[:size])["inputs"][0]["shape"]
                owner.calls.append(shape[0])
                if owner.mode == "hang":
                    owner.release.wait(30)
                    return self._send(500, b'{"error": "late"}', {})
                if owner.mode in ("500", "400"):
                    message = f'{{"error": "backend says {owner.mode}"}}'.encode()
                    return self._send(int(owner.mode), message, {})
                head = orjson.dumps(
                    {"model_name": "x", "model_version": "1", "outputs": [
                        {"name": "y", "datatype": "FP32", "shape": shape,
                         "parameters": {"binary_data_size": len(body) - size}}]}
                )  # fmt: skip
                self._send(200, head + body[size:], {"Inference-Header-Content-Length":
                                                      str(len(head))})  # fmt: skip

        self.port = port or free_port()
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
        for connection in self.connections:  # as a process that dies: keep-alives too
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)


_Servicer: Any = pb_grpc.GRPCInferenceServiceServicer
GRPC_ERRORS = {
    "invalid": grpc.StatusCode.INVALID_ARGUMENT,
    "notfound": grpc.StatusCode.NOT_FOUND,
    "internal": grpc.StatusCode.INTERNAL,
    "unavailable": grpc.StatusCode.UNAVAILABLE,
}


class FaultyGrpcBackend:
    """FaultyBackend over OIP gRPC (grpcio's threaded server): metadata for any model,
    infer by `mode`: "echo" (raw contents back as y), "hang", or a GRPC_ERRORS key."""

    def __init__(self, mode: str, port: int | None = None):
        self.mode = mode
        self.release = threading.Event()
        self.calls: list[int] = []
        owner = self

        class Servicer(_Servicer):  # type: ignore[misc]
            def ModelMetadata(self, request: Any, context: Any) -> Any:
                def specs(key: str) -> list[Any]:
                    return [pb.ModelMetadataResponse.TensorMetadata(**spec)
                            for spec in ECHO_SIGNATURE[key]]  # fmt: skip

                return pb.ModelMetadataResponse(
                    name=request.name, versions=["1"], platform="echo",
                    inputs=specs("inputs"), outputs=specs("outputs"),
                )  # fmt: skip

            def ModelInfer(self, request: Any, context: Any) -> Any:
                if owner.mode == "hang":
                    owner.release.wait(30)
                    context.abort(grpc.StatusCode.INTERNAL, "late")
                if owner.mode in GRPC_ERRORS:
                    context.abort(GRPC_ERRORS[owner.mode], f"backend says {owner.mode}")
                shape = list(request.inputs[0].shape)
                owner.calls.append(shape[0])
                reply = pb.ModelInferResponse(model_name=request.model_name, model_version="1")
                out = reply.outputs.add()
                out.name, out.datatype = "y", "FP32"
                out.shape.extend(shape)
                reply.raw_output_contents.append(request.raw_input_contents[0])
                return reply

        self.port = port or free_port()
        self.pool = ThreadPoolExecutor(8)
        self.server = grpc.server(self.pool, options=[("grpc.so_reuseport", 0)])
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(Servicer(), self.server)
        self.server.add_insecure_port(f"127.0.0.1:{self.port}")
        self.server.start()

    @property
    def url(self) -> str:
        return f"grpc://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.release.set()
        self.server.stop(0).wait()
        self.pool.shutdown(wait=False)


@pytest.fixture(scope="module")
def backend(model_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    server = start_server(
        [model_root / "digits" / "1"],
        tmp_path_factory.mktemp("backend") / "backend.log",
        wait_for=["digits"],
    )
    yield server
    assert server.stop() == 0, server.log()


@pytest.fixture(scope="module")
def faulty() -> Iterator[dict[str, FaultyBackend]]:
    names = ("hang", "500", "400", "echo", "gone")
    backends = {name: FaultyBackend(name) for name in names} | {"twin": FaultyBackend("echo")}
    yield backends
    for one in backends.values():
        one.close()


@pytest.fixture(scope="module")
def faulty_grpc() -> Iterator[dict[str, FaultyGrpcBackend]]:
    names = ("echo", "hang", "gone", "twin", *GRPC_ERRORS)
    backends = {name: FaultyGrpcBackend("echo" if name in ("gone", "twin") else name)
                for name in names}  # fmt: skip
    yield backends
    for one in backends.values():
        one.close()


@pytest.fixture(scope="module")
def gateway(
    backend: RunningServer,
    faulty: dict[str, FaultyBackend],
    faulty_grpc: dict[str, FaultyGrpcBackend],
    model_root: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RunningServer]:
    tmp = tmp_path_factory.mktemp("gateway")
    digits = model_root / "digits"
    remote = {"version": "1", "url": backend.url, "path": str(digits / "1")}
    write_routes(
        tmp / "routes.json",
        [
            {"name": "digits", "champion": remote,
             "canary": {"version": "2", "path": str(digits / "2"), "percent": 50},
             "others": [{"version": "3", "url": backend.url}]},
            {"name": "identity_fp32",
             "champion": {"version": "1", "path": str(model_root / "identity_fp32/1")},
             "shadows": [{"version": "2", "url": faulty["twin"].url, "percent": 100},
                         {"version": "3", "url": faulty_grpc["twin"].url, "percent": 100}]},
            *({"name": mode, "champion": {"version": "1", "url": one.url}}
              for mode, one in faulty.items() if mode != "twin"),
            *({"name": f"grpc-{mode}", "champion": {"version": "1", "url": one.url}}
              for mode, one in faulty_grpc.items() if mode != "twin"),
            {"name": "never", "champion": {"version": "1",
                                           "url": f"grpc://127.0.0.1:{free_port()}"}},
        ],
    )  # fmt: skip
    server = start_server(
        ["--routes", str(tmp / "routes.json")],
        tmp / "gateway.log",
        wait_for=["digits", "identity_fp32", "gone", "hang", "grpc-gone", "grpc-hang"],
        env={"SERVO_REMOTE_TIMEOUT_S": "1.5", "SERVO_REMOTE_FAILURES": "2",
             "SERVO_REMOTE_COOLDOWN_S": "1", "SERVO_REMOTE_METADATA_TIMEOUT_S": "1"},
    )  # fmt: skip
    yield server
    assert server.stop() == 0, server.log()


def infer(server: RunningServer, path: str, body: bytes = BODY, **headers: str) -> httpx.Response:
    return httpx.post(f"{server.url}/v2/models/{path}/infer", content=body, headers=headers,
                      timeout=30)  # fmt: skip


def test_remote_answers_equal_the_backends(gateway: RunningServer, backend: RunningServer) -> None:
    direct = infer(backend, "digits/versions/1")
    assert direct.status_code == 200, direct.text
    for path in ("digits/versions/1", "digits"):
        for key in range(20):  # routed: half of the keys reach the remote champion
            reply = infer(gateway, path, **{"servo-routing-key": f"k{key}"})
            assert reply.status_code == 200, reply.text
            if reply.json()["model_version"] == "1":
                assert reply.json()["outputs"] == direct.json()["outputs"]
                break
        else:
            raise AssertionError(f"{path}: version 1 never answered")
    meta = httpx.get(f"{gateway.url}/v2/models/digits/versions/1").json()
    direct_meta = httpx.get(f"{backend.url}/v2/models/digits/versions/1").json()
    assert (meta["inputs"], meta["outputs"]) == (direct_meta["inputs"], direct_meta["outputs"])
    # binary outputs through the gateway decode to the same classes
    wanted = orjson.loads(BODY) | {"parameters": {"binary_data_output": True}}
    binary = infer(gateway, "digits/versions/1", orjson.dumps(wanted))
    size = int(binary.headers["inference-header-content-length"])
    label = np.frombuffer(binary.content[size:][:8], dtype="<i8")
    assert label.tolist() == direct.json()["outputs"][0]["data"][:1]


def test_backend_never_up_fails_its_load_after_the_metadata_timeout(
    gateway: RunningServer,
) -> None:
    wait_until(lambda: "metadata not read" in infer(gateway, "never", PAIR_BODY).text)
    reply = infer(gateway, "never", PAIR_BODY)
    assert reply.status_code == 503, reply.text
    assert "metadata not read in 1.0 s (" in reply.json()["error"], reply.text
    assert "last: UNAVAILABLE" in reply.json()["error"], reply.text


def test_canary_split_local_and_remote_and_recording(gateway: RunningServer) -> None:
    seen = versions_answering(gateway, 60)
    assert seen["1"] > 5 and seen["2"] > 5, seen
    ok = metric(gateway, "servo_requests_total", model="digits", version="1", code="200")
    assert ok >= seen["1"]
    assert metric(gateway, "servo_prediction_total", model="digits", version="1") >= seen["1"]
    assert metric(gateway, "servo_feature_bin_total", model="digits", version="1") > 0
    assert metric(gateway, "servo_inference_duration_seconds_count", version="1") > 0


def test_remote_version_the_backend_lacks_fails_its_load(gateway: RunningServer) -> None:
    reply = infer(gateway, "digits/versions/3")
    assert reply.status_code == 503
    assert "metadata answered 404" in reply.json()["error"], reply.text
    assert metric(gateway, "servo_model_load_failures_total", model="digits", version="3") >= 1


def test_backend_down_opens_the_circuit_local_models_serve(
    gateway: RunningServer, faulty: dict[str, FaultyBackend]
) -> None:
    assert infer(gateway, "gone", PAIR_BODY).status_code == 200
    faulty["gone"].close()  # the backend goes away after the gateway loaded its version
    first = [infer(gateway, "gone", PAIR_BODY) for _ in range(2)]
    for reply in first:
        assert reply.status_code == 503
        assert "unreachable (" in reply.json()["error"], reply.text
        assert "backend http://127.0.0.1:" in reply.json()["error"]
    opened = infer(gateway, "gone", PAIR_BODY)
    assert opened.status_code == 503
    assert "circuit open after 2 consecutive failures" in opened.json()["error"], opened.text
    assert infer(gateway, "identity_fp32", PAIR_BODY).status_code == 200
    assert infer(gateway, "digits/versions/2").status_code == 200


def test_remote_shadow_of_a_local_champion(gateway: RunningServer) -> None:
    for _ in range(5):
        assert infer(gateway, "identity_fp32", PAIR_BODY).status_code == 200
    for version in ("2", "3"):  # over REST and over gRPC (the sync channel)
        wait_until(
            lambda v=version: metric(gateway, "servo_shadow_agreement_total",
                                     model="identity_fp32", version=v, agree="true") >= 5
        )  # fmt: skip
    assert metric(gateway, "servo_shadow_errors_total", model="identity_fp32") == 0


def test_timeout_then_fail_fast(gateway: RunningServer) -> None:
    for _ in range(2):
        reply = infer(gateway, "hang", PAIR_BODY)
        assert reply.status_code == 504, reply.text
        assert "no answer in 1.5 s" in reply.json()["error"]
    reply = infer(gateway, "hang", PAIR_BODY)
    assert reply.status_code == 503 and "circuit open" in reply.json()["error"], reply.text


def test_backend_errors_map_with_its_message(gateway: RunningServer) -> None:
    for _ in range(3):  # the backend's 4xx is the client's error: no failure counted
        reply = infer(gateway, "400", PAIR_BODY)
        assert reply.status_code == 400, reply.text
        assert reply.json()["error"].endswith("backend says 400")
    reply = infer(gateway, "500", PAIR_BODY)
    assert reply.status_code == 502 and "backend says 400" not in reply.text
    assert "backend says 500 (answered 500)" in reply.json()["error"], reply.text


def test_circuit_closes_after_the_cooldown(
    gateway: RunningServer, faulty: dict[str, FaultyBackend]
) -> None:
    echo = faulty["echo"]
    reply = infer(gateway, "echo", PAIR_BODY)
    assert reply.status_code == 200, reply.text
    assert reply.json()["outputs"][0]["data"] == [1, 2, 3, 4, 5, 6]
    echo.mode = "500"
    try:
        codes = [infer(gateway, "echo", PAIR_BODY).status_code for _ in range(3)]
        assert codes == [502, 502, 503]
    finally:
        echo.mode = "echo"
    wait_until(lambda: infer(gateway, "echo", PAIR_BODY).status_code == 200, timeout=15)


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("ftp://host:1", "needs http://, https:// or grpc://"),
        ("http://", "needs http://, https:// or grpc:// and a host"),
        ("grpc://h", "needs grpc://host:port, no path"),
        ("grpc://h:1/v2", "needs grpc://host:port, no path"),
        ("http://h:99999", "is not a URL"),
        ("http://h:1/?q=1", "takes no query"),
        ("http://user:pw@h:1", "credentials"),
    ],
)
def test_routes_file_validates_urls(url: str, why: str) -> None:
    doc = {"models": [{"name": "m", "champion": {"version": "1", "url": url}}]}
    with pytest.raises(RouteError, match=why):
        parse_routes(json.dumps(doc), Path("."))


def test_routes_file_reads_a_remote_deployment() -> None:
    doc = {"models": [{"name": "m", "champion": {"version": "1", "url": "https://h.example/"}}]}
    table = parse_routes(json.dumps(doc), Path("."))
    assert table.models["m"].champion.url == "https://h.example"
    doc["models"][0]["champion"]["url"] = "grpc://h.example:8081/"
    assert parse_routes(json.dumps(doc), Path(".")).models["m"].champion.url == (
        "grpc://h.example:8081"
    )
    with pytest.raises(RouteError, match="needs string 'version' and 'path'"):
        parse_routes(
            json.dumps({"models": [{"name": "m", "champion": {"version": "1"}}]}), Path(".")
        )


def test_grpc_backend_answers_and_its_errors_map(
    gateway: RunningServer, faulty_grpc: dict[str, FaultyGrpcBackend]
) -> None:
    reply = infer(gateway, "grpc-echo", PAIR_BODY)
    assert reply.status_code == 200, reply.text
    assert reply.json()["outputs"][0]["data"] == [1, 2, 3, 4, 5, 6]
    assert faulty_grpc["echo"].calls[-1] == 2
    for mode, status in (("invalid", 400), ("notfound", 404)):
        for _ in range(3):  # the client's errors: passed on, no failure counted
            reply = infer(gateway, f"grpc-{mode}", PAIR_BODY)
            assert reply.status_code == status, reply.text
            assert reply.json()["error"].endswith(f"backend says {mode}")
            assert "backend grpc://127.0.0.1:" in reply.json()["error"]
    reply = infer(gateway, "grpc-internal", PAIR_BODY)
    assert reply.status_code == 502, reply.text
    assert "backend says internal (INTERNAL)" in reply.json()["error"]
    for _ in range(2):
        reply = infer(gateway, "grpc-unavailable", PAIR_BODY)
        assert reply.status_code == 503, reply.text
        assert "unavailable (backend says unavailable)" in reply.json()["error"]
    reply = infer(gateway, "grpc-unavailable", PAIR_BODY)
    assert reply.status_code == 503 and "circuit open after 2" in reply.json()["error"]


def test_grpc_timeout_and_backend_down(
    gateway: RunningServer, faulty_grpc: dict[str, FaultyGrpcBackend]
) -> None:
    for _ in range(2):
        reply = infer(gateway, "grpc-hang", PAIR_BODY)
        assert reply.status_code == 504, reply.text
        assert "no answer in 1.5 s" in reply.json()["error"]
    reply = infer(gateway, "grpc-hang", PAIR_BODY)
    assert reply.status_code == 503 and "circuit open" in reply.json()["error"], reply.text
    assert infer(gateway, "grpc-gone", PAIR_BODY).status_code == 200
    faulty_grpc["gone"].close()
    for _ in range(2):
        reply = infer(gateway, "grpc-gone", PAIR_BODY)
        assert reply.status_code == 503, reply.text
        assert "unavailable (" in reply.json()["error"], reply.text
    reply = infer(gateway, "grpc-gone", PAIR_BODY)
    assert "circuit open after 2 consecutive failures (last: UNAVAILABLE)" in reply.text
    assert infer(gateway, "identity_fp32", PAIR_BODY).status_code == 200


Backend = FaultyBackend | FaultyGrpcBackend
BACKENDS: dict[str, Callable[..., Backend]] = {"rest": FaultyBackend, "grpc": FaultyGrpcBackend}


async def _open(url: str, executor: ThreadPoolExecutor, **remote: Any) -> RemoteModel:
    return await RemoteModel.open(
        url, "echo", "1", card_folder=None, options=RuntimeOptions(), executor=executor,
        remote=RemoteOptions(**remote),
    )  # fmt: skip


@pytest.mark.parametrize("kind", list(BACKENDS))
def test_edge_batching_merges_concurrent_requests(kind: str) -> None:
    backend = BACKENDS[kind]("echo")
    rows = [np.full((1, 3), i, dtype=np.float32) for i in range(16)]

    async def run() -> list[list[np.ndarray]]:
        with ThreadPoolExecutor(2) as executor:
            model = await _open(backend.url, executor)
            assert model.configure_batching(BatchingConfig(True, 64, 50_000))
            try:
                return await asyncio.gather(*(model.predict({"x": row}) for row in rows))
            finally:
                model.unload()
                await asyncio.sleep(0.05)  # the channels close

    try:
        answers = asyncio.run(run())
    finally:
        backend.close()
    assert sum(backend.calls) == 16 and len(backend.calls) < 16, backend.calls
    for row, (y,) in zip(rows, answers, strict=True):
        np.testing.assert_array_equal(y, row)  # each caller its own row


@pytest.mark.parametrize(
    ("mode", "calls", "status"), [("400", [8] + [1] * 8, 400), ("500", [8], 502)]
)
def test_edge_batch_failures(mode: str, calls: list[int], status: int) -> None:
    """A merged request the backend refuses runs again request by request (one of them may
    be the culprit); one that meets a failing backend fails all of them at once."""
    backend = FaultyBackend("echo")
    rows = [np.full((1, 3), i, dtype=np.float32) for i in range(8)]

    async def run() -> list[Any]:
        with ThreadPoolExecutor(2) as executor:
            model = await _open(backend.url, executor)
            assert model.configure_batching(BatchingConfig(True, 64, 50_000))
            backend.mode = mode
            try:
                predictions = (model.predict({"x": row}) for row in rows)
                return await asyncio.gather(*predictions, return_exceptions=True)
            finally:
                model.unload()
                await asyncio.sleep(0.05)

    try:
        answers = asyncio.run(run())
    finally:
        backend.close()
    assert backend.calls == calls
    assert [getattr(a, "status", None) for a in answers] == [status] * 8, answers
    assert all(f"backend says {mode}" in str(a) for a in answers)


@pytest.mark.parametrize("kind", list(BACKENDS))
def test_metadata_is_retried_until_the_backend_is_up(kind: str) -> None:
    port = free_port()
    started: list[Backend] = []
    timer = threading.Timer(1.0, lambda: started.append(BACKENDS[kind]("echo", port)))
    scheme = "grpc" if kind == "grpc" else "http"

    async def run() -> None:
        with ThreadPoolExecutor(1) as executor:
            timer.start()
            model = await _open(f"{scheme}://127.0.0.1:{port}", executor, metadata_timeout_s=20)
            assert [s.name for s in model.signature.outputs] == ["y"]
            (y,) = await model.predict({"x": np.ones((2, 3), np.float32)})
            assert y.tolist() == [[1, 1, 1], [1, 1, 1]]
            model.unload()
            await asyncio.sleep(0.05)  # the channels close
            with pytest.raises(ModelLoadError) as info:  # never up: a clear failure
                await _open(f"{scheme}://127.0.0.1:{free_port()}", executor,
                            metadata_timeout_s=0.5)  # fmt: skip
            message = str(info.value)
            assert "metadata not read in 0.5 s (" in message and " attempts; last: " in message
            attempts = message.split("(")[1].split(" ", maxsplit=1)[0]
            assert int(attempts) > 1, message  # it did retry

    try:
        asyncio.run(run())
    finally:
        timer.cancel()
        for one in started:
            one.close()
