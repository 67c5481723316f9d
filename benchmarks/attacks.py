"""Hostile clients against `servo serve`, each for a bounded time, and what good clients see
meanwhile (a script, not a timed test).

The server runs with its default limits under `ulimit -n 1024` (so at most 512
connections). For each attack, one attacker process runs it against it (127.0.0.1 only) for
`--seconds`, while this process sends good inference requests on a keep-alive connection
(latency median and p99) and on fresh connections (how many succeed). The baseline is the
same measurement with no attack. Prints a Markdown table, and JSON with `--json`.

  slowloris     200 connections trickling a header a byte every 0.5 s (reconnecting when cut)
  slowloris-1100  the same with 1,100 connections, past the cap
  slow-body     100 connections trickling a declared 1 MB body at 20 bytes/s
  conn-flood    600 connections, each served once then idle on keep-alive (reconnecting)
  big-headers   1 MB headers, one connection after another
  unread        4 connections pipelining 20,000 GET /metrics each, never reading
  oversize      64 MiB bodies without Expect: 100-continue (answered 413 early)

    python benchmarks/attacks.py [--seconds 5] [--attacks slowloris,unread] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import resource
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import orjson

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from servo.demo import digits_holdout, export_digits  # noqa: E402
from tests.servers import read_http_reply, start_server  # noqa: E402

FILES = 1024
BODY = orjson.dumps(
    {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64],
                 "data": digits_holdout()[0][0].tolist()}]}
)  # fmt: skip
GOOD = (
    b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(BODY), BODY)
)


def _connect(port: int, timeout: float = 5.0) -> socket.socket | None:
    try:
        return socket.create_connection(("127.0.0.1", port), timeout=timeout)
    except OSError:
        return None


def _send(sock: socket.socket, data: bytes) -> bool:
    try:
        sock.setblocking(False)
        sock.send(data)
        return True
    except BlockingIOError:
        return True
    except OSError:
        return False


def _alive(sock: socket.socket) -> bool:
    """False once the server has answered (408, 503) or closed the connection."""
    try:
        sock.setblocking(False)
        return not sock.recv(65536) and False
    except BlockingIOError:
        return True
    except OSError:
        return False


def _trickle(
    port: int, until: float, count: int, head: bytes, *, piece: bytes, every: float
) -> None:
    """`count` connections sending `head`, then `piece` every `every` seconds; a connection
    the server answers or cuts is opened again."""
    socks: list[socket.socket | None] = [None] * count
    while time.monotonic() < until:
        for i, held in enumerate(socks):
            if held is None:
                fresh = _connect(port)
                socks[i] = fresh if fresh is not None and _send(fresh, head) else None
            elif not _alive(held) or (piece and not _send(held, piece)):
                held.close()
                socks[i] = None
        time.sleep(every)
    for sock in socks:
        if sock is not None:
            sock.close()


def slowloris(port: int, until: float) -> None:
    head = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-a: "
    _trickle(port, until, 200, head, piece=b"a", every=0.5)


def slowloris_1100(port: int, until: float) -> None:
    head = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-a: "
    _trickle(port, until, 1100, head, piece=b"a", every=0.5)


def slow_body(port: int, until: float) -> None:
    head = b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n"
    _trickle(port, until, 100, head, piece=b" " * 10, every=0.5)


def conn_flood(port: int, until: float) -> None:
    """Idle keep-alive connections (served once each), which the cap does not evict."""
    socks: list[socket.socket | None] = [None] * 600
    while time.monotonic() < until:
        for i, held in enumerate(socks):
            if held is not None and _alive(held):
                continue
            if held is not None:
                held.close()
            fresh = _connect(port)
            socks[i] = None
            if fresh is not None:
                with contextlib.suppress(OSError):
                    fresh.settimeout(5)
                    fresh.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
                    fresh.recv(65536)
                    socks[i] = fresh
            if time.monotonic() >= until:
                break
        time.sleep(0.2)
    for sock in socks:
        if sock is not None:
            sock.close()


def big_headers(port: int, until: float) -> None:
    request = b"GET /v2 HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 1_000_000 + b"\r\n\r\n"
    while time.monotonic() < until:
        sock = _connect(port)
        if sock is None:
            continue
        with sock, contextlib.suppress(OSError):
            sock.sendall(request)
            sock.recv(65536)


def unread(port: int, until: float) -> None:
    flood = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" * 20_000
    socks: list[tuple[socket.socket, int] | None] = [None] * 4
    while time.monotonic() < until:
        for i in range(len(socks)):
            if socks[i] is None:
                opened = _connect(port)
                if opened is None:
                    continue
                opened.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
                socks[i] = (opened, 0)
            entry = socks[i]
            assert entry is not None
            sock, sent = entry
            try:
                sock.setblocking(False)
                sent += sock.send(flood[sent : sent + 65536]) if sent < len(flood) else 0
                socks[i] = (sock, sent)
            except BlockingIOError:
                socks[i] = (sock, sent)
            except OSError:
                sock.close()
                socks[i] = None
        time.sleep(0.05)
    for entry in socks:
        if entry is not None:
            entry[0].close()


def oversize(port: int, until: float) -> None:
    body = b"0" * (64 * 1024 * 1024)
    head = b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
    while time.monotonic() < until:
        sock = _connect(port, timeout=10)
        if sock is None:
            continue
        with sock, contextlib.suppress(OSError):
            sock.sendall(head % len(body) + body)
            sock.recv(65536)


ATTACKS: dict[str, Callable[[int, float], None]] = {
    "slowloris": slowloris,
    "slowloris-1100": slowloris_1100,
    "slow-body": slow_body,
    "conn-flood": conn_flood,
    "big-headers": big_headers,
    "unread": unread,
    "oversize": oversize,
}


def measure(port: int, seconds: float, keep: socket.socket | None = None) -> dict[str, float]:
    """Good requests for `seconds`: latencies on a keep-alive connection (`keep`, opened
    before the attack; opened again if the server closes it), and every 10th request on a
    fresh connection (counted as ok only with a 200)."""
    latencies: list[float] = []
    errors = fresh = fresh_ok = 0
    until = time.monotonic() + seconds
    n = 0
    while time.monotonic() < until:
        n += 1
        if n % 10 == 0:
            fresh += 1
            sock = _connect(port, timeout=2)
            if sock is not None:
                with sock, contextlib.suppress(OSError):
                    sock.sendall(GOOD)
                    fresh_ok += read_http_reply(sock)[0] == 200
            continue
        try:
            if keep is None:
                keep = socket.create_connection(("127.0.0.1", port), timeout=5)
            started = time.perf_counter()
            keep.sendall(GOOD)
            status = read_http_reply(keep)[0]
            if status != 200:
                raise ConnectionError(f"status {status}")
            latencies.append(time.perf_counter() - started)
        except OSError:
            errors += 1
            if keep is not None:
                keep.close()
            keep = None
        time.sleep(0.002)
    if keep is not None:
        keep.close()
    ordered = sorted(latencies) or [float("nan")]
    return {
        "requests": len(latencies),
        "errors": errors,
        "p50_ms": statistics.median(ordered) * 1000,
        "p99_ms": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000,
        "fresh_ok": fresh_ok / fresh if fresh else float("nan"),
    }


def run(seconds: float, names: list[str]) -> dict[str, dict[str, float]]:
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "digits" / "1"
        export_digits(folder, version="1", seed=0)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(FILES, hard), hard))  # the server's
        try:
            server = start_server(
                [folder], Path(tmp) / "server.log", wait_for=["digits"],
                env={"SERVO_GRPC_ENABLED": "false", "SERVO_MAX_REQUEST_BYTES": str(8 << 20)},
            )  # fmt: skip
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        try:
            measure(server.http_port, 0.5)  # warm-up
            results["baseline"] = measure(server.http_port, seconds)
            for name in names:
                keep = socket.create_connection(("127.0.0.1", server.http_port), timeout=5)
                keep.sendall(GOOD)  # a client already served when the attack begins
                read_http_reply(keep)[0]
                attacker = multiprocessing.Process(
                    target=ATTACKS[name], args=(server.http_port, time.monotonic() + seconds + 1)
                )
                attacker.start()
                time.sleep(1.0)  # let the attack build up
                results[name] = measure(server.http_port, seconds, keep)
                attacker.join(timeout=30)
                if attacker.is_alive():
                    attacker.kill()
                    attacker.join()
                time.sleep(0.5)
        finally:
            server.stop()
    return results


def table(results: dict[str, dict[str, float]]) -> str:
    base = results["baseline"]["p50_ms"]
    lines = [
        "| attack | good p50 ms | ratio to baseline | good p99 ms | keep-alive errors "
        "| fresh connections ok |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['p50_ms']:.2f} | {r['p50_ms'] / base:.2f} | {r['p99_ms']:.2f} "
            f"| {r['errors']:.0f} | {r['fresh_ok']:.0%} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--attacks", default=",".join(ATTACKS))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    names = [n for n in args.attacks.split(",") if n]
    unknown = set(names) - set(ATTACKS)
    if unknown:
        parser.error(f"unknown attacks: {', '.join(sorted(unknown))}")
    results = run(args.seconds, names)
    print(json.dumps(results, indent=2) if args.json else table(results))


if __name__ == "__main__":
    main()
