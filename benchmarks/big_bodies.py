"""What one big request body costs everyone else (issue 9, point 8): a script, not a test.

One client sends small digits requests back to back on a keep-alive connection while
another sends big JSON bodies (about 38 MB, ending in 400 after the whole decode), once
with every body decoded on the event loop (SERVO_OFFLOOP_DECODE_BYTES=0) and once with the
default (bodies over 1 MiB in a worker process). Prints the small requests' latency
without and during the big ones, side by side, on 127.0.0.1 only.

    python benchmarks/big_bodies.py [--bodies 3] [--baseline-s 2]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the packages, before this folder's serving.py and monitors.py

from servo.demo import export_digits  # noqa: E402
from tests.servers import free_port, read_http_reply  # noqa: E402


def _request(path: str, body: bytes) -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


def _start(folder: Path, env: dict[str, str], log: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    command = [sys.executable, "-m", "servo.cli", "serve", str(folder), "--http-port", str(port),
               "--grpc-port", str(free_port()), "--log-level", "WARNING"]  # fmt: skip
    with log.open("wb") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT,
                                   env={**os.environ, "PYTHONPATH": str(ROOT), **env})  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            url = f"http://127.0.0.1:{port}/v2/models/digits/ready"
            if httpx.get(url, timeout=2).status_code == 200:
                return process, port
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    process.kill()
    raise RuntimeError(log.read_text()[-2000:])


def _measure(port: int, big: bytes, bodies: int, baseline_s: float) -> dict[str, float]:
    small = _request("/v2/models/digits/infer", orjson.dumps(
        {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [0.5] * 64}]}
    ))  # fmt: skip
    latencies: list[tuple[float, float]] = []  # (sent at, seconds)
    stop = threading.Event()

    def smalls() -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
            while not stop.is_set():
                start = time.perf_counter()
                sock.sendall(small)
                read_http_reply(sock)[0]
                latencies.append((start, time.perf_counter() - start))

    thread = threading.Thread(target=smalls)
    thread.start()
    time.sleep(baseline_s)
    big_started = time.perf_counter()
    big_seconds = []
    with socket.create_connection(("127.0.0.1", port), timeout=300) as sock:
        for _ in range(bodies):
            start = time.perf_counter()
            sock.sendall(big)
            status = read_http_reply(sock)[0]
            assert status == 400, status
            big_seconds.append(time.perf_counter() - start)
    stop.set()
    thread.join()
    before = [s for at, s in latencies if at < big_started]
    during = [s for at, s in latencies if at >= big_started]
    return {
        "alone_p50_ms": statistics.median(before) * 1e3,
        "during_n": len(during),
        "during_p50_ms": statistics.median(during) * 1e3,
        "during_p99_ms": float(np.percentile(during, 99)) * 1e3,
        "during_max_ms": max(during) * 1e3,
        "big_p50_s": statistics.median(big_seconds),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bodies", type=int, default=3)
    parser.add_argument("--baseline-s", type=float, default=2.0)
    args = parser.parse_args()
    rows = 30_000
    data = np.random.default_rng(0).random((rows, 64)).tolist()
    big_body = orjson.dumps({"inputs": [{"name": "input", "datatype": "FP32",
                                         "shape": [rows + 1, 64], "data": data}]})  # fmt: skip
    big = _request("/v2/models/digits/infer", big_body)
    print(f"big body: {len(big_body) / 1e6:.1f} MB JSON, {args.bodies} in a row\n")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "digits" / "1"
        export_digits(folder, version="1", seed=0)
        rows_out = []
        for label, value in (("on the loop (=0)", "0"), ("worker (default 1 MiB)", None)):
            env = {"SERVO_MAX_REQUEST_BYTES": str(128 * 1024 * 1024)}
            if value is not None:
                env["SERVO_OFFLOOP_DECODE_BYTES"] = value
            process, port = _start(folder, env, Path(tmp) / "server.log")
            try:
                rows_out.append((label, _measure(port, big, args.bodies, args.baseline_s)))
            finally:
                process.terminate()
                process.wait(timeout=30)
    print("| big bodies decoded | small alone p50 ms | small during: n | p50 ms | p99 ms "
          "| max ms | big request p50 s |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, m in rows_out:
        print(f"| {label} | {m['alone_p50_ms']:.2f} | {m['during_n']:.0f} | "
              f"{m['during_p50_ms']:.2f} | {m['during_p99_ms']:.1f} | {m['during_max_ms']:.0f} | "
              f"{m['big_p50_s']:.2f} |")  # fmt: skip
    print(
        "\ngoal: during the big bodies, small requests keep their latency (p99 and max far "
        "below the big request's own time)"
    )


if __name__ == "__main__":
    main()
