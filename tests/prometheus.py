"""A real Prometheus (Debian package `prometheus`) started as a plain process for a test:
temp storage, listening on 127.0.0.1, scraping the given targets every second; stopped by
its PID."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.servers import free_port, stop_process


def binary() -> str | None:
    return shutil.which("prometheus")


@dataclass
class RunningPrometheus:
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def query(self, promql: str) -> list[dict[str, Any]]:
        url = f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
        with urllib.request.urlopen(url, timeout=5) as response:
            result: list[dict[str, Any]] = json.loads(response.read())["data"]["result"]
            return result

    def wait_for(self, promql: str, predicate: Any, timeout: float = 30.0) -> list[Any]:
        """Poll `promql` until `predicate(result)` holds."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(promql)
            if predicate(result):
                return result
            if time.monotonic() > deadline:
                raise TimeoutError(f"{promql}: {result}\n{self.log_path.read_text()[-2000:]}")
            time.sleep(0.2)

    def stop(self) -> None:
        stop_process(self.process)


def _spawn(exe: str, config: Path, workdir: Path, port: int, log: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            exe,
            f"--config.file={config}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--storage.tsdb.retention.time=1h",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def start_prometheus(workdir: Path, targets: list[str], timeout: float = 60.0) -> RunningPrometheus:
    exe = binary()
    if exe is None:
        raise RuntimeError("the Debian package `prometheus` is not installed (.ci/run installs it)")
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: servo\n    static_configs:\n"
        f"      - targets: {json.dumps(targets)}\n"
    )
    port = free_port()
    log_path = workdir / "prometheus.log"
    with log_path.open("wb") as log:
        process = _spawn(exe, config, workdir, port, log)
    running = RunningPrometheus(process, port, log_path)
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{running.url}/-/ready", timeout=2) as response:
                if response.status == 200:
                    return running
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            running.stop()
            raise RuntimeError(f"prometheus did not start:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.2)
