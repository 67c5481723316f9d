"""Start `servo serve` as a real process on 127.0.0.1 and stop it by its PID."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx


def _port_slice() -> range:
    """The ports this test process hands out: below the kernel's ephemeral range (so no
    outgoing connection, of this process or another, holds one between `free_port` and
    the server's bind), one slice per pytest-xdist worker (so two workers never pick the
    same). Empty where the ephemeral range leaves no room below it."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return range(0)
    first, last = 10_000, min(low, 65_536)
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    index = int(worker) if worker.isdigit() else 0
    span = (last - first) // max(count, 1)
    if span < 100:
        return range(0)
    return range(first + index * span, first + (index + 1) * span)


_PORTS = _port_slice()
#: the next candidate: a random start in the slice, then in turn (a port just handed out
#: is not offered again soon)
_NEXT = [random.randrange(len(_PORTS)) if _PORTS else 0]


def free_port() -> int:
    """A port on 127.0.0.1 that a server started after this call can bind."""
    for _ in range(len(_PORTS)):
        port = _PORTS[_NEXT[0] % len(_PORTS)]
        _NEXT[0] += 1
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:  # no slice of our own: any port the kernel gives
        sock.bind(("127.0.0.1", 0))
        any_port: int = sock.getsockname()[1]
        return any_port


def read_http_reply(sock: socket.socket) -> tuple[int, bytes]:
    """Read one HTTP/1.1 answer with a Content-Length from a raw socket: (status, body).
    ConnectionError if the server closes before the whole answer arrived."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed before an answer")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    length = next(
        int(v)
        for k, _, v in (x.partition(b": ") for x in lines[1:])
        if k.lower() == b"content-length"
    )
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed inside an answer")
        rest += chunk
    return int(lines[0].split()[1]), rest[:length]


def stop_process(process: subprocess.Popen[bytes]) -> int:
    """SIGTERM a process we started, SIGKILL it if it is still there after 20 s."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
    return process.returncode


@dataclass
class RunningServer:
    process: subprocess.Popen[bytes]
    http_port: int
    grpc_port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        return stop_process(self.process)


def start_server(
    folders: Sequence[Path | str],
    log_path: Path,
    wait_for: Sequence[str] = (),
    env: dict[str, str] | None = None,
    timeout: float = 60.0,
) -> RunningServer:
    """Start a server; wait until it is live and every model in `wait_for` answers ready."""
    http_port, grpc_port = free_port(), free_port()
    with log_path.open("wb") as handle:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "servo.cli",
                "serve",
                *map(str, folders),
                "--http-port",
                str(http_port),
                "--grpc-port",
                str(grpc_port),
            ],
            stdout=handle,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
    server = RunningServer(process, http_port, grpc_port, log_path)
    deadline = time.monotonic() + timeout
    pending = list(wait_for)
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited early:\n{server.log()}")
        try:
            if httpx.get(f"{server.url}/v2/health/live", timeout=1).status_code == 200:
                pending = [
                    m
                    for m in pending
                    if httpx.get(f"{server.url}/v2/models/{m}/ready", timeout=1).status_code != 200
                ]
                if not pending:
                    return server
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"server not ready in {timeout}s (waiting for {pending}):\n{server.log()}")


def start_remote_gateway(
    backend: RunningServer,
    folders: Sequence[Path],
    log_path: Path,
    local: Sequence[Path] = (),
    env: dict[str, str] | None = None,
    grpc: bool = False,
) -> RunningServer:
    """A gateway whose routes serve every version of `folders` remotely from `backend`
    (each folder named .../NAME/VERSION; the highest version the champion, the folder
    read for its model card), over OIP REST or (`grpc`) OIP gRPC, and `local` folders
    itself."""
    url = f"grpc://{backend.grpc_target}" if grpc else backend.url
    by_model: dict[str, list[dict[str, str]]] = {}
    for folder in folders:
        by_model.setdefault(folder.parent.name, []).append(
            {"version": folder.name, "url": url, "path": str(folder)}
        )
    for folder in local:
        by_model.setdefault(folder.parent.name, []).append(
            {"version": folder.name, "path": str(folder)}
        )
    models = []
    for name, deployments in by_model.items():
        deployments.sort(key=lambda d: (d["version"].isdigit(), d["version"].zfill(20)))
        models.append({"name": name, "champion": deployments[-1], "others": deployments[:-1]})
    routes = log_path.with_suffix(".routes.json")
    routes.write_text(json.dumps({"models": models}))
    return start_server(["--routes", str(routes)], log_path, wait_for=list(by_model)[:1], env=env)
