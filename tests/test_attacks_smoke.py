"""The attack benchmark runs end to end, and good clients are served through two attacks
(a smoke run with short attacks; the measurement is benchmarks/attacks.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_attack_benchmark_runs_and_good_clients_are_served() -> None:
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "attacks.py"), "--seconds", "1",
         "--attacks", "slowloris,big-headers", "--json"],
        capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    results = json.loads(run.stdout)
    assert set(results) == {"baseline", "slowloris", "big-headers"}
    for name, result in results.items():
        assert result["requests"] > 0 and result["errors"] == 0, (name, result)
        assert result["fresh_ok"] == 1.0, (name, result)
