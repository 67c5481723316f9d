"""`servo demo` (what `make demo` runs): trains, serves, and prints a curl that works."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.servers import free_port


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_demo_prints_a_curl_that_works(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "servo.cli", "demo", "--dir", str(tmp_path)]
    command += ["--http-port", str(free_port()), "--grpc-port", str(free_port())]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=os.environ
    )
    lines: list[str] = []
    try:
        assert process.stdout is not None
        deadline = time.monotonic() + 90
        curl = None
        while time.monotonic() < deadline and curl is None:
            line = process.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("curl "):
                curl = line.strip()
        assert curl is not None, "".join(lines)
        assert any("holdout accuracy" in line for line in lines)
        assert any("is predicted as" in line for line in lines)
        reply = subprocess.run(shlex.split(curl), capture_output=True, text=True, check=True)
        doc = json.loads(reply.stdout)
        assert doc["model_name"] == "digits" and doc["model_version"] == "1"
        assert doc["outputs"][0]["name"] == "label" and doc["outputs"][0]["data"] == [2]
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0, "".join(lines)
        if process.stdout is not None:
            process.stdout.close()
    assert (tmp_path / "digits" / "1" / "model.onnx").exists()
