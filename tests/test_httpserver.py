"""Servo's own HTTP/1.1 server on the wire: raw sockets for what clients rarely do."""

from __future__ import annotations

import socket
import time

import orjson

from servo.demo import digits_holdout
from tests.servers import RunningServer

BODY = orjson.dumps(
    {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64],
                 "data": digits_holdout()[0][0].tolist()}]}
)  # fmt: skip


def post(path: str, body: bytes, extra: str = "") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n{extra}\r\n"
    ).encode() + body


def read_responses(
    sock: socket.socket, count: int, timeout: float = 10.0
) -> list[tuple[int, bytes]]:
    sock.settimeout(timeout)
    data = b""
    out: list[tuple[int, bytes]] = []
    while len(out) < count:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                return out
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        if status == 100:
            data = rest
            continue
        length = next(int(v) for k, _, v in (line.partition(b": ") for line in lines[1:])
                      if k.lower() == b"content-length")  # fmt: skip
        while len(rest) < length:
            rest += sock.recv(65536)
        out.append((status, rest[:length]))
        data = rest[length:]
    return out


def connect(server: RunningServer) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.http_port), timeout=10)


def with_id(ident: str) -> bytes:
    return BODY.replace(b'{"inputs"', f'{{"id":"{ident}","inputs"'.encode())


def test_pipelined_requests_are_answered_in_order(server: RunningServer) -> None:
    with connect(server) as sock:
        ids = [f"p{i}" for i in range(10)]
        requests = [
            post("/v2/models/digits/infer", with_id(i))
            if n % 3
            else post("/v2/models/x/infer", BODY)
            for n, i in enumerate(ids)
        ]
        sock.sendall(b"".join(requests))
        answers = read_responses(sock, 10)
    assert [status for status, _ in answers] == [404 if n % 3 == 0 else 200 for n in range(10)]
    for n, (status, body) in enumerate(answers):
        if status == 200:
            assert orjson.loads(body)["id"] == ids[n]


def test_expect_100_continue_and_chunked_bodies(server: RunningServer) -> None:
    with connect(server) as sock:
        head = post("/v2/models/digits/infer", BODY, "Expect: 100-continue\r\n")[: -len(BODY)]
        sock.sendall(head)
        sock.settimeout(10)
        assert sock.recv(1024).startswith(b"HTTP/1.1 100 Continue")
        sock.sendall(BODY)
        ((status, _),) = read_responses(sock, 1)
        assert status == 200
        chunks = (BODY[:100], BODY[100:])
        chunked = (
            b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
            + b"".join(f"{len(c):x}\r\n".encode() + c + b"\r\n" for c in chunks)
            + b"0\r\n\r\n"
        )
        sock.sendall(chunked)
        ((status, body),) = read_responses(sock, 1)
        assert status == 200 and orjson.loads(body)["outputs"][0]["data"] == [2]


def test_malformed_http_gets_400_and_a_closed_connection(server: RunningServer) -> None:
    with connect(server) as sock:
        sock.sendall(b"THIS IS NOT HTTP\r\n\r\n")
        ((status, body),) = read_responses(sock, 1)
        assert status == 400 and orjson.loads(body)["error"].startswith("malformed HTTP request")
        assert sock.recv(1024) == b""  # closed by the server


def test_connection_close_is_honoured(server: RunningServer) -> None:
    with connect(server) as sock:
        sock.sendall(post("/v2/models/digits/infer", BODY, "Connection: close\r\n"))
        ((status, _),) = read_responses(sock, 1)
        assert status == 200
        assert sock.recv(1024) == b""


def test_declared_oversize_is_refused_before_the_body(server: RunningServer) -> None:
    with connect(server) as sock:
        head = (
            "POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\n"
            f"Content-Length: {64 * 1024 * 1024}\r\n\r\n"
        )
        sock.sendall(head.encode())  # and never send the 64 MiB
        ((status, body),) = read_responses(sock, 1)
        assert status == 413
        assert orjson.loads(body)["error"] == "request body of 67108864 bytes exceeds 8388608 bytes"


def test_percent_encoded_paths_are_decoded(server: RunningServer) -> None:
    with connect(server) as sock:
        sock.sendall(b"GET /v2/models/%64igits HTTP/1.1\r\nHost: x\r\n\r\n")
        ((status, body),) = read_responses(sock, 1)
        assert status == 200 and orjson.loads(body)["name"] == "digits"


def test_server_keeps_serving_after_abrupt_disconnects(server: RunningServer) -> None:
    for _ in range(20):
        sock = connect(server)
        sock.sendall(post("/v2/models/digits/infer", BODY)[:50])  # half a request
        sock.close()
    time.sleep(0.1)
    with connect(server) as sock:
        sock.sendall(post("/v2/models/digits/infer", BODY))
        ((status, _),) = read_responses(sock, 1)
        assert status == 200
