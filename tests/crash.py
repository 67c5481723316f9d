"""Helpers for the crash-safety tests: real `servo train` processes, a read-only look at
the registry's tables (sqlite3, so that looking does not run the recovery check), and the
registry's invariants."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from retrain.pipeline import file_hash

ROOT = Path(__file__).resolve().parents[1]


def servo(*args: str, log: Path | None = None) -> subprocess.Popen[bytes]:
    """`servo ARGS` as a real process (stdout and stderr to `log`)."""
    out = log.open("ab") if log is not None else subprocess.DEVNULL
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "servo.cli", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
    finally:
        if log is not None and not isinstance(out, int):
            out.close()


def train(url: str, work: Path, *args: str, log: Path | None = None) -> subprocess.Popen[bytes]:
    return servo("train", "--registry", url, "--work-dir", str(work), *args, log=log)


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "servo.cli", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def kill(process: subprocess.Popen[Any]) -> None:
    """kill -9 a process we started, and reap it."""
    if process.poll() is None:
        process.kill()
    process.wait(timeout=30)
    if process.stdout is not None:
        process.stdout.close()


def wait_for(condition: Callable[[], Any], timeout: float = 120, every: float = 0.002) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"not reached in {timeout} s")


def query(db: Path, sql: str, *params: Any) -> list[sqlite3.Row]:
    """Read the registry's tables directly (no recovery check)."""
    connection = sqlite3.connect(db, timeout=30)
    connection.row_factory = sqlite3.Row
    try:
        return list(connection.execute(sql, params))
    finally:
        connection.close()


def folder_of(uri: str) -> Path:
    return Path(unquote(urlparse(uri).path))


def leftovers(work: Path) -> list[Path]:
    """Temporary folders and files left anywhere in a work folder."""
    found = [p for p in work.rglob("*") if p.name.endswith(".tmp")]
    scratch = work / "pipeline" / "tmp"
    return found + (list(scratch.iterdir()) if scratch.is_dir() else [])


def check_invariants(db: Path, work: Path) -> dict[str, int]:
    """The registry's invariants after a crash and the recovery check; returns counts."""
    running = query(db, "SELECT id FROM pipeline_runs WHERE status = 'running'")
    assert running == [], f"runs left running: {[r['id'] for r in running]}"
    versions = query(db, "SELECT * FROM model_versions ORDER BY model, version")
    servable = {(v["model"], v["version"]) for v in versions if v["servable"]}
    for v in versions:
        assert v["servable"] or v["status"] == "failed", dict(v)
        if not v["servable"]:
            continue
        folder = folder_of(v["artifact_uri"])
        hashes = json.loads(v["artifact_hashes"])
        assert sorted(hashes) == sorted(p.name for p in folder.iterdir()), folder
        for name, digest in hashes.items():
            assert file_hash(folder / name) == digest, folder / name
        assert json.loads((folder / "servo.json").read_text())["version"] == str(v["version"])
    for alias in query(db, "SELECT * FROM aliases"):
        assert (alias["model"], alias["version"]) in servable, dict(alias)
    for deployment in query(db, "SELECT * FROM deployments"):
        assert (deployment["model"], deployment["version"]) in servable, dict(deployment)
    # every published step folder is complete and holds what its manifest says
    cached = 0
    for manifest in (work / "pipeline" / "artifacts").glob("*/*/manifest.json"):
        doc = json.loads(manifest.read_text())
        for name, digest in doc["hashes"].items():
            assert file_hash(manifest.parent / name) == digest, manifest.parent / name
        cached += 1
    # and every output the lineage recorded is still there, with its recorded hash
    outputs = query(db, "SELECT uri, content_hash FROM artifacts WHERE direction = 'output'")
    for artifact in outputs:
        assert file_hash(Path(artifact["uri"])) == artifact["content_hash"], artifact["uri"]
    assert leftovers(work) == []
    return {
        "versions": len(versions),
        "servable": len(servable),
        "failed": len(versions) - len(servable),
        "step_folders": cached,
        "recorded_outputs": len(outputs),
    }
