"""Servo's own HTTP/1.1 server against hostile clients, on raw sockets against a real server:
slowloris headers and bodies, the connection cap, oversized heads, unparseable requests,
clients that never read, early 413s, and transfer codings it does not implement. Each test
also shows a good request served while the attack goes on.

Deadlines are set small through settings so the tests are quick; no test asserts a
duration, only what the server answered and whether it closed the connection.
"""

from __future__ import annotations

import contextlib
import re
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from servo.demo import digits_holdout, export_digits
from tests.servers import RunningServer, start_server

LIMIT = 8 * 1024 * 1024
BODY = orjson.dumps(
    {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64],
                 "data": digits_holdout()[0][0].tolist()}]}
)  # fmt: skip
INFER = "/v2/models/digits/infer"


def post(path: str, body: bytes, extra: str = "") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n{extra}\r\n"
    ).encode() + body


def parse(data: bytes) -> tuple[int, dict[str, str], bytes, bytes]:
    """The first response in `data` (skipping 100 Continue): status, headers, body, and
    the bytes after it; IndexError if it is not all there."""
    while True:
        if b"\r\n\r\n" not in data:
            raise IndexError("incomplete head")
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        if status != 100:
            break
        data = rest
    headers = {k.lower(): v for k, _, v in (line.partition(": ") for line in lines[1:])}
    length = int(headers["content-length"])
    if len(rest) < length:
        raise IndexError("incomplete body")
    return status, headers, rest[:length], rest[length:]


def read_response(
    sock: socket.socket, timeout: float = 10.0, data: bytes = b""
) -> tuple[int, dict[str, str], bytes]:
    """One response from a connection (`data`: its first bytes, if already read)."""
    sock.settimeout(timeout)
    while True:
        try:
            status, headers, body, _ = parse(data)
            return status, headers, body
        except IndexError:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed before a response ({data[:200]!r})") from None
            data += chunk


def read_all(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """Everything the server sends until it closes."""
    sock.settimeout(timeout)
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            data += chunk
    return data


def read_available(sock: socket.socket, timeout: float) -> bytes:
    """What the server sends until it closes or goes quiet for `timeout` seconds."""
    data = b""
    with contextlib.suppress(TimeoutError):
        data = read_all(sock, timeout)
    return data


def closed_by_server(sock: socket.socket, timeout: float = 10.0) -> bool:
    """True once the server has closed (EOF or reset), reading and dropping what it sent."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        return False
    return True


def connect(server: RunningServer) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.http_port), timeout=10)


def good_request(server: RunningServer) -> None:
    """A normal inference on a new connection: 200 and the right class."""
    with connect(server) as sock:
        sock.sendall(post(INFER, BODY))
        status, _, body = read_response(sock)
    assert status == 200, body
    assert orjson.loads(body)["outputs"][0]["data"] == [digits_holdout()[1][0]]


def metric(server: RunningServer, name: str) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else float("nan")


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("hostile") / "digits" / "1"
    export_digits(folder, version="1", seed=0)
    return folder


@pytest.fixture(scope="module")
def server(
    digits_folder: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    """Short deadlines: headers within 1 s, bodies at 1,000 bytes/s over 0.5 s windows,
    unread answers stalled 1 s at most."""
    running = start_server(
        [digits_folder],
        tmp_path_factory.mktemp("logs") / "hostile.log",
        wait_for=["digits"],
        env={
            "SERVO_MAX_REQUEST_BYTES": str(LIMIT),
            "SERVO_HTTP_HEADER_TIMEOUT_S": "1.0",
            "SERVO_HTTP_MIN_BODY_RATE": "1000",
            "SERVO_HTTP_BODY_RATE_WINDOW_S": "0.5",
            "SERVO_HTTP_STALL_TIMEOUT_S": "1.0",
            "SERVO_GRPC_ENABLED": "false",
        },
    )
    yield running
    assert running.stop() == 0, running.log()


# 4. slowloris


def test_trickled_headers_get_408_at_the_deadline(server: RunningServer) -> None:
    """Eight clients trickle a header a byte at a time, forever: each is answered 408 and
    closed at the header deadline, while good requests are served throughout."""
    head = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 10_000
    attackers = [connect(server) for _ in range(8)]
    silent = connect(server)  # opens and never sends a byte
    sent = dict.fromkeys(attackers, 0)
    answers: dict[socket.socket, bytes] = {}
    served = 0
    for _ in range(300):  # at most 300 bytes each, 30 s: far past the 1 s deadline
        for sock in attackers:
            if sock in answers:
                continue
            try:
                sock.send(head[sent[sock] : sent[sock] + 1])
                sent[sock] += 1
            except OSError:
                answers[sock] = b""
        good_request(server)
        served += 1
        time.sleep(0.1)
        for sock in attackers:
            sock.setblocking(False)
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                data = None
            except ConnectionResetError:
                data = b""
            sock.setblocking(True)
            if data is not None:
                answers[sock] = answers.get(sock, b"") + data
        if len(answers) == len(attackers):
            break
    assert len(answers) == len(attackers), "a trickling client was never cut"
    assert all(sent[sock] < len(head) for sock in attackers)  # cut mid-header
    for sock in attackers:
        assert answers[sock].startswith(b"HTTP/1.1 408 ")
        body = answers[sock].partition(b"\r\n\r\n")[2]
        assert orjson.loads(body) == {"error": "request headers not complete within 1 s"}
        assert closed_by_server(sock)
        sock.close()
    assert closed_by_server(silent)  # closed without an answer: it asked nothing
    silent.close()
    assert served >= 1
    assert metric(server, 'servo_http_timeouts_total{reason="header"}') >= 9


def test_slow_body_is_cut_and_others_are_served(server: RunningServer) -> None:
    with connect(server) as slow:
        slow.sendall(post(INFER, b"x" * 100_000)[:-100_000])
        answer = b""
        for n in range(300):  # 10 bytes per 0.1 s: 100 bytes/s, under the 1,000 minimum
            try:
                slow.send(b" " * 10)
            except OSError:
                break
            if n % 5 == 0:
                good_request(server)
            time.sleep(0.1)
            slow.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                answer += slow.recv(65536)
            slow.setblocking(True)
            if b"\r\n\r\n" in answer:
                break
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        body = answer.partition(b"\r\n\r\n")[2]
        assert orjson.loads(body) == {"error": "request body slower than 1000 bytes/s"}
        assert closed_by_server(slow)
    good_request(server)


@pytest.fixture(scope="module")
def capped(
    digits_folder: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    running = start_server(
        [digits_folder],
        tmp_path_factory.mktemp("logs") / "capped.log",
        wait_for=["digits"],
        env={"SERVO_MAX_CONNECTIONS": "8", "SERVO_GRPC_ENABLED": "false"},
    )
    yield running
    assert running.stop() == 0, running.log()


def test_past_the_connection_cap_new_connections_get_503(capped: RunningServer) -> None:
    """Connections that are served (idle keep-alive) are not evicted: past the cap a new
    connection gets 503 and a close, and the open ones keep being served."""
    keeper = connect(capped)  # a good keep-alive client, there before the flood
    keeper.sendall(post(INFER, BODY))
    assert read_response(keeper)[0] == 200
    held: list[socket.socket] = []
    refused: tuple[int, dict[str, str], bytes] | None = None
    try:
        for _ in range(20):
            sock = connect(capped)
            sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = read_response(sock)
            if answer[0] == 200:
                held.append(sock)  # served, now idle on keep-alive
                continue
            refused = answer
            assert closed_by_server(sock)
            sock.close()
            break
        assert refused is not None, "no connection was refused past the cap"
        status, headers, body = refused
        assert status == 503 and headers["connection"] == "close"
        assert orjson.loads(body) == {"error": "too many connections (at most 8); retry later"}
        assert len(held) <= 7  # the keeper and the held ones fill the cap
        # the connections already open keep being served
        for sock in [keeper, *held]:
            sock.sendall(post(INFER, BODY))
            assert read_response(sock)[0] == 200
        keeper.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        text = read_response(keeper)[2].decode()
        assert re.search(r"^servo_http_connections_refused_total [1-9]", text, re.MULTILINE)
    finally:
        for sock in held:
            sock.close()
        keeper.close()
    for _ in range(100):  # once the flood is gone, new connections are served again
        try:
            good_request(capped)
            break
        except (ConnectionError, AssertionError):
            time.sleep(0.05)
    else:
        pytest.fail("new connections still refused after the others closed")


def test_at_the_cap_a_new_connection_evicts_the_oldest_slow_head(capped: RunningServer) -> None:
    """Slowloris past the cap: twelve connections send half a head and stall (the cap is
    8): each new connection closes the oldest of them (408), and good ones are served."""
    slow = [connect(capped) for _ in range(12)]
    for sock in slow:
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    try:
        for _ in range(3):
            good_request(capped)
        answers = [read_available(sock, 0.5) for sock in slow]
        evicted = [a for a in answers if a.startswith(b"HTTP/1.1 408 ")]
        assert evicted, [a[:40] for a in answers]
        assert orjson.loads(parse(evicted[0])[2]) == {
            "error": "request headers not complete; closed to make room for a new connection"
        }
        after = metric_when_served(capped, 'servo_http_timeouts_total{reason="evicted"}')
        assert after >= len(evicted)
    finally:
        for sock in slow:
            sock.close()


def metric_when_served(server: RunningServer, name: str) -> float:
    """`metric`, on a new connection (that may itself evict a slow one)."""
    with connect(server) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        status, _, body = read_response(sock)
    assert status == 200
    match = re.search(rf"^{re.escape(name)} (\S+)$", body.decode(), re.MULTILINE)
    assert match is not None, name
    return float(match.group(1))


# 5. and 6. heads too large, unparseable requests


@pytest.mark.parametrize(
    ("request_bytes", "status", "error"),
    [
        (b"GET /v2/" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414,
         "request target longer than 16384 bytes"),
        (b"GET /v2 HTTP/1.1\r\nX-Big: " + b"b" * 20_000 + b"\r\n\r\n", 431,
         "header X-Big longer than 16384 bytes"),
        (b"GET /v2 HTTP/1.1\r\n" + b"".join(b"X-%d: %s\r\n" % (i, b"c" * 1000) for i in range(100))
         + b"\r\n", 431, "request headers exceed 65536 bytes"),
        (b"GET http://[::1/v2 HTTP/1.1\r\nHost: x\r\n\r\n", 400,
         "invalid request target 'http://[::1/v2'"),
        (b"CONNECT host:443 HTTP/1.1\r\nHost: host:443\r\n\r\n", 405, "CONNECT is not supported"),
        (b"POST /v2 HTTP/1.1\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n", 400,
         "malformed HTTP request (Content-Length overflow)"),
        (b"GET /v2 HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
         400, "protocol upgrades are not supported"),
    ],
    ids=["long-target", "long-header", "big-head", "invalid-target", "connect", "huge-length",
         "upgrade"],
)  # fmt: skip
def test_bad_heads_are_answered_and_closed(
    server: RunningServer, request_bytes: bytes, status: int, error: str
) -> None:
    with connect(server) as sock:
        sock.sendall(request_bytes)
        good_request(server)
        data = read_all(sock)  # one answer, then the server's close
    status_seen, headers, body, rest = parse(data)
    assert (status_seen, rest) == (status, b"")
    assert orjson.loads(body) == {"error": error}
    if status == 405:
        assert headers["allow"] == "GET, POST"


def test_a_huge_head_is_refused_at_the_limit_not_after_it(server: RunningServer) -> None:
    """A 100 MB header: 431 once 64 KiB have arrived, while the rest is still unsent; the
    client's further bytes are read and dropped, so it can keep sending and read the 431."""
    with connect(server) as sock:
        sock.sendall(b"GET /v2 HTTP/1.1\r\nHost: x\r\nX-Huge: " + b"h" * 70_000)
        status, _, body = read_response(sock)
        assert status == 431
        assert orjson.loads(body) == {"error": "request headers exceed 65536 bytes"}
        good_request(server)
        sock.sendall(b"h" * 1_000_000)  # read and dropped while the server lingers
        assert closed_by_server(sock)


def test_a_large_valid_head_is_served(server: RunningServer) -> None:
    headers = "".join(f"X-{i}: {'v' * 8000}\r\n" for i in range(6))  # 48 KB, lines < 16 KiB
    with connect(server) as sock:
        sock.sendall(post(INFER, BODY, headers))
        assert read_response(sock)[0] == 200


# 7. write backpressure


def test_a_client_that_never_reads_is_paused_then_cut(server: RunningServer) -> None:
    """20,000 pipelined GET /metrics never read: the server stops reading (and answering)
    once the unread answers pass the high-water mark, and cuts the connection when they
    stall; everyone else is served meanwhile."""
    pauses_before = metric(server, "servo_http_backpressure_pauses_total")
    stalls_before = metric(server, 'servo_http_timeouts_total{reason="write"}')
    flood = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" * 20_000
    attacker = connect(server)
    attacker.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    attacker.settimeout(0.2)
    sent = 0
    for _ in range(50):  # send until the server stops reading (the send blocks)
        try:
            sent += attacker.send(flood[sent : sent + 65536])
        except TimeoutError:
            break
        if sent == len(flood):
            break
    try:
        for _ in range(200):  # the kernel's buffers fill first, then the server's
            good_request(server)
            if metric(server, "servo_http_backpressure_pauses_total") > pauses_before:
                break
            time.sleep(0.05)
        else:
            pytest.fail("reading was never paused")
        for _ in range(200):  # the stalled connection is cut after 1 s
            if metric(server, 'servo_http_timeouts_total{reason="write"}') > stalls_before:
                break
            good_request(server)
            time.sleep(0.05)
        else:
            pytest.fail("the stalled connection was never cut")
        received = b""
        attacker.settimeout(10)
        try:
            while chunk := attacker.recv(1 << 20):
                received += chunk
        except (ConnectionResetError, TimeoutError):
            pass
        assert 0 < received.count(b"HTTP/1.1 200 OK") < 20_000
    finally:
        attacker.close()


def test_a_half_closed_client_still_gets_its_answer(server: RunningServer) -> None:
    with connect(server) as sock:
        sock.sendall(post(INFER, BODY) * 2)
        sock.shutdown(socket.SHUT_WR)
        data = read_all(sock)  # both answers, then the server's close
    first, _, _, rest = parse(data)
    second, _, _, rest = parse(rest)
    assert (first, second, rest) == (200, 200, b"")


# 9. an early 413 reaches the client


def test_urllib_sending_64_mib_reads_the_413(server: RunningServer) -> None:
    """urllib sends the whole body before it reads: without a lingering close it gets a
    connection reset instead of the answer."""
    request = urllib.request.Request(
        f"{server.url}{INFER}", data=b"0" * (64 * 1024 * 1024), method="POST",
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=60)
    assert caught.value.code == 413
    assert orjson.loads(caught.value.read()) == {
        "error": f"request body of {64 * 1024 * 1024} bytes exceeds {LIMIT} bytes"
    }
    good_request(server)


def test_raw_oversize_bodies_read_the_413(server: RunningServer) -> None:
    body = b"0" * (16 * 1024 * 1024)
    with connect(server) as sock:  # declared: answered before the body, then drained
        sock.sendall(post(INFER, body))
        status, _, answer = read_response(sock)
        assert status == 413, answer
        assert closed_by_server(sock)
    chunked = b"".join(b"100000\r\n" + body[:0x100000] + b"\r\n" for _ in range(12))
    with connect(server) as sock:  # chunked, 12 MiB: answered once it passes 8 MiB
        sock.sendall(
            b"POST " + INFER.encode() + b" HTTP/1.1\r\nHost: x\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + chunked + b"0\r\n\r\n"
        )
        status, _, answer = read_response(sock)
        assert status == 413
        assert orjson.loads(answer) == {"error": f"request body exceeds {LIMIT} bytes"}
        assert closed_by_server(sock)
    good_request(server)


# 12. transfer codings


@pytest.mark.parametrize("coding", ["gzip, chunked", "deflate", "identity"])
def test_unimplemented_transfer_codings_get_501(server: RunningServer, coding: str) -> None:
    chunk = b"%x\r\n%s\r\n0\r\n\r\n" % (len(BODY), BODY)
    with connect(server) as sock:
        sock.sendall(
            f"POST {INFER} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: {coding}\r\n\r\n".encode()
            + chunk
        )
        status, _, body = read_response(sock)
        good_request(server)
        assert closed_by_server(sock)
    assert status == 501
    assert orjson.loads(body) == {
        "error": f"Transfer-Encoding '{coding}' is not supported (only chunked)"
    }
