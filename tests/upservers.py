"""Start `servo up` as a real process on free 127.0.0.1 ports, read its JSON log lines,
stop it by its PID (SIGTERM, or SIGKILL for the crash tests)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tests.servers import free_port, stop_process


@dataclass
class Up:
    process: subprocess.Popen[bytes]
    directory: Path
    http_port: int
    grpc_port: int
    admin_port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def events(self) -> list[dict[str, Any]]:
        """The JSON log lines (SERVO_LOG_FORMAT=json), in order."""
        out = []
        for line in self.log().splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
        return out

    def named(self, event: str) -> list[dict[str, Any]]:
        return [e for e in self.events() if e.get("event") == event]

    def stop(self) -> int:
        return stop_process(self.process)

    def kill(self) -> None:
        """SIGKILL: no clean-up runs at all."""
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=20)


def start_up(
    directory: Path,
    log_path: Path,
    *,
    policy: Path | None = None,
    registry_url: str | None = None,
    env: dict[str, str] | None = None,
    wait_model: str | None = "digits",
    timeout: float = 120.0,
    extra: tuple[str, ...] = (),
    http_port: int | None = None,
) -> Up:
    """`servo up --dir DIR` with JSON logs; waits until it is live and `wait_model` is ready."""
    http_port = http_port or free_port()
    grpc_port, admin_port = free_port(), free_port()
    args = [
        sys.executable, "-m", "servo.cli", "up", "--dir", str(directory),
        "--http-port", str(http_port), "--grpc-port", str(grpc_port),
        "--admin-port", str(admin_port), *extra,
    ]  # fmt: skip
    if policy is not None:
        args += ["--policy", str(policy)]
    if registry_url is not None:
        args += ["--registry", registry_url]
    with log_path.open("ab") as handle:
        process = subprocess.Popen(
            args,
            stdout=handle,
            stderr=subprocess.STDOUT,
            env={**os.environ, "SERVO_LOG_FORMAT": "json", **(env or {})},
        )
    up = Up(process, directory, http_port, grpc_port, admin_port, log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"servo up exited early ({process.returncode}):\n{up.log()}")
        try:
            live = httpx.get(f"{up.url}/v2/health/live", timeout=1).status_code == 200
            if live and (
                wait_model is None
                or httpx.get(f"{up.url}/v2/models/{wait_model}/ready", timeout=1).status_code == 200
            ):
                return up
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    up.stop()
    raise RuntimeError(f"servo up not ready in {timeout}s:\n{up.log()}")


def wait_for(what: Callable[[], Any], *, every_s: float = 0.2) -> Any:
    """Poll until `what()` is truthy and return it (pytest-timeout bounds the wait)."""
    while True:
        value = what()
        if value:
            return value
        time.sleep(every_s)
