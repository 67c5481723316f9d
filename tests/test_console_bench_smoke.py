"""benchmarks/console.py at a tiny size: every console page renders through the admin
app's dispatch for a logged-in viewer, and the table names each one (no time asserted:
the figures are the benchmark's, at 1,000 runs and 100 requests)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "console.py"
PAGES = ["models", "promotions", "promotion", "runs", "run", "rollouts", "rollout", "monitors",
         "monitor"]  # fmt: skip


def load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("console_benchmark", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_the_console_benchmark_renders_every_page(tmp_path: Path) -> None:
    bench = load()
    timings = bench.run(tmp_path / "s", runs=5, requests=2, n=2)
    assert [t.page for t in timings] == PAGES
    assert {t.page: t.status for t in timings} == dict.fromkeys(PAGES, 200)
    assert all(t.bytes > 1000 and 0 < t.median_ms <= t.p95_ms for t in timings)
    text = bench.table(timings)
    assert all(t.path in text for t in timings)
