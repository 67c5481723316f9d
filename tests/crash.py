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
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import pyarrow.parquet as pq

from monitors.payload_log import FEEDBACK, PREDICTIONS, read_window
from registry.routes import ROUTE_ACTIONS
from retrain.pipeline import file_hash
from serving.instance import writer_alive

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
    """Temporary folders and files left anywhere in a work folder (not those a running
    payload-log writer has in flight: their names carry its instance)."""
    found = [p for p in work.rglob("*") if p.name.endswith(".tmp") and not _in_flight(p)]
    scratch = work / "pipeline" / "tmp"
    return found + (list(scratch.iterdir()) if scratch.is_dir() else [])


def _in_flight(path: Path) -> bool:
    # "<root>/<table>/model=/version=/date=/.part-<ns>-<n>.<instance>.parquet.tmp"
    root = path.parents[4] if len(path.parents) > 4 else path.parent
    return path.name.startswith(".") and writer_alive(root, path.name) is True


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


def run_of(db: Path, pid: int) -> dict[str, object] | None:
    """The run a `servo train` process started (its lease names the pid)."""
    rows = query(db, "SELECT * FROM pipeline_runs WHERE lease_pid = ? ORDER BY id DESC", pid)
    return dict(rows[0]) if rows else None


def version_of(db: Path, run_id: object) -> dict[str, object] | None:
    rows = query(db, "SELECT * FROM model_versions WHERE run_id = ?", run_id)
    return dict(rows[0]) if rows else None


def phase(db: Path, work: Path, pid: int, exited: int | None) -> str:
    """Where a kill landed, read from what the killed run left behind."""
    if exited is not None:
        return f"exited {exited} before the kill"
    run = run_of(db, pid)
    if run is None:
        return "1 startup: no run yet"
    if run["status"] == "succeeded":
        return "7 after the run finished (interpreter exit)"
    version = version_of(db, run["id"])
    if version is None:
        steps = query(db, "SELECT step, status FROM step_runs WHERE run_id = ?", run["id"])
        if len(steps) < 4:
            return f"2 pipeline: {len(steps)} of 4 steps recorded"
        return "3 register: before the version was reserved"
    if version["servable"]:
        return "6 register: published, run not finished"
    if (work / "models" / str(version["model"]) / str(version["version"])).is_dir():
        return "5 register: folder in place, not published"
    return "4 register: reserved, folder not complete"


@dataclass
class Victim:
    mode: str  # "after run start" or "after reserve"
    delay: float
    process: subprocess.Popen[bytes]
    since: float | None = None  # when its run started, or reserved its version


def kill_at(
    plans: list[tuple[str, float]], url: str, db: Path, work: Path, log: Path, parallel: int
) -> Counter[str]:
    """Start `servo train` for each plan, `parallel` at a time on one work folder, and kill -9
    each at its point: `delay` seconds after its run started (a new seed: every step but
    ingest runs) or after it reserved its version (a new model name: the steps are cache
    hits and registering is most of the run); returns where the kills landed."""
    landed: Counter[str] = Counter()
    pending = list(enumerate(plans))
    active: list[Victim] = []
    try:
        while pending or active:
            while pending and len(active) < parallel:
                i, (mode, delay) = pending.pop(0)
                args = (
                    ["--seed", str(i)] if mode == "after run start" else ["--name", f"digits-{i}"]
                )
                active.append(Victim(mode, delay, train(url, work, *args, log=log)))
            for victim in list(active):
                exited = victim.process.poll()
                now = time.monotonic()
                if victim.since is None and exited is None:
                    run = run_of(db, victim.process.pid)
                    if run is not None and (
                        victim.mode == "after run start" or version_of(db, run["id"])
                    ):
                        victim.since = now
                if exited is None and (victim.since is None or now < victim.since + victim.delay):
                    continue
                kill(victim.process)
                landed[phase(db, work, victim.process.pid, exited)] += 1
                active.remove(victim)
            time.sleep(0.002)
    finally:  # a failed check must not leave processes behind
        for victim in active:
            kill(victim.process)
    return landed


def reached(db: Path, pid: int, moment: str) -> bool:
    try:
        run = run_of(db, pid)
    except sqlite3.OperationalError:  # no tables yet
        return False
    if run is None or moment == "started":
        return run is not None
    if moment == "reserved":
        return version_of(db, run["id"]) is not None
    return run["status"] == "succeeded"


def timed(processes: list[subprocess.Popen[bytes]], db: Path, start: str, end: str) -> float:
    """The longest time between two moments ("started": its run started; "reserved": it
    reserved its version; "finished") of `servo train` processes that are not killed."""
    moments = ("started", "reserved", "finished")
    marks: dict[tuple[int, str], float] = {}
    try:
        # no deadline here: a process that fails ends the loop below, and a hang is cut by
        # the test's pytest-timeout
        while len(marks) < len(processes) * len(moments):
            for process in processes:
                for moment in moments:
                    if (process.pid, moment) not in marks and reached(db, process.pid, moment):
                        marks[process.pid, moment] = time.monotonic()
            assert all(p.poll() in (None, 0) for p in processes)
            time.sleep(0.002)
        assert [process.wait(timeout=60) for process in processes] == [0] * len(processes)
    finally:
        for process in processes:
            kill(process)
    return max(marks[p.pid, end] - marks[p.pid, start] for p in processes)


# the loop's crash tests (`servo up` killed; tests/test_crash_loop.py)

#: the version status each role gives a routed version, and the statuses a version routed
#: in that role may have ("registered": deployed directly, e.g. the bootstrap's champion)
ROLE_STATUS = {"champion": "production", "canary": "canary", "shadow": "shadow"}
ROLE_MAY_HAVE = {"champion": ("production", "registered"), "canary": ("canary",),
                 "shadow": ("shadow",)}  # fmt: skip


def routes(db: Path) -> dict[str, list[tuple[int, str, float]]]:
    """The route table: per model, (version, role, percent) rows by version."""
    out: dict[str, list[tuple[int, str, float]]] = {}
    for row in query(db, "SELECT * FROM deployments ORDER BY model, version"):
        out.setdefault(row["model"], []).append((row["version"], row["role"], row["percent"]))
    return out


def check_routes(db: Path) -> dict[str, list[tuple[int, str, float]]]:
    """The route table is consistent: per model one champion (the alias's version), at most
    one canary, every routed version servable with its role's status, and no version holds
    a role's status without its row (a half-done swap); returns the table."""
    table = routes(db)
    versions = {(v["model"], v["version"]): v for v in query(db, "SELECT * FROM model_versions")}
    aliases = {a["model"]: a["version"]
               for a in query(db, "SELECT * FROM aliases WHERE alias = 'champion'")}  # fmt: skip
    for model, rows in table.items():
        roles = [role for _, role, _ in rows]
        assert roles.count("champion") == 1 and roles.count("canary") <= 1, rows
        champion = next(version for version, role, _ in rows if role == "champion")
        assert aliases.get(model) == champion, (model, aliases.get(model), rows)
        for version, role, _ in rows:
            row = versions[(model, version)]
            assert row["servable"], dict(row)
            assert row["status"] in ROLE_MAY_HAVE.get(role, (row["status"],)), (dict(row), role)
    for (model, version), row in versions.items():
        routed = {v: role for v, role, _ in table.get(model, [])}
        for role, status in ROLE_STATUS.items():
            if row["status"] == status:
                assert routed.get(version) == role, (dict(row), table.get(model))
    return table


def check_promotions(db: Path) -> None:
    """Nothing half-promoted: a promoted request's version became champion (and may have
    been archived since); any other request's version never held the alias after it was
    filed; a pending request's version is still in shadow."""
    history = query(db, "SELECT * FROM alias_history WHERE alias = 'champion'")
    rows = query(db, "SELECT * FROM model_versions")
    versions = {(v["model"], v["version"]): v["status"] for v in rows}
    for request in query(db, "SELECT * FROM promotion_requests"):
        key = (request["model"], request["version"])
        made = [h for h in history if (h["model"], h["new_version"]) == key]
        if request["status"] == "promoted":
            assert made and versions[key] in ("production", "archived"), dict(request)
        else:
            assert not made, (dict(request), [dict(h) for h in made])
            assert versions[key] != "production", dict(request)
        if request["status"] == "pending":
            assert versions[key] == "shadow", dict(request)


def payload_files(root: Path) -> dict[Path, list[str]]:
    """Every published data file of the payload log (both tables) with its ids, in order."""
    found = sorted(p for p in root.rglob("*.parquet") if p.name[0] not in "._")
    return {part: pq.read_table(part, columns=["id"])["id"].to_pylist() for part in found}


def check_nothing_lost(
    root: Path, files: dict[Path, list[str]], labels: list[str]
) -> dict[str, int]:
    """After a restart: every payload-log file on disk before the kill is still there with
    the same rows; the tables read whole (no torn file breaks a reader); every label the
    killed process answered `"stored": true` is in the feedback table, and none twice."""
    now = payload_files(root)
    for part, ids in files.items():
        assert now.get(part) == ids, f"{part}: {len(ids)} rows before the kill"
    predictions = read_window(root, table=PREDICTIONS, columns=["id"])["id"].to_pylist()
    feedback = read_window(root, table=FEEDBACK, columns=["id"])["id"].to_pylist()
    logged = {i for part, ids in files.items() if part.is_relative_to(root / PREDICTIONS)
              for i in ids}  # fmt: skip
    assert logged <= set(predictions), sorted(logged - set(predictions))[:5]
    assert len(feedback) == len(set(feedback)), "a label stored twice"
    assert set(labels) <= set(feedback), sorted(set(labels) - set(feedback))[:5]
    return {"files": len(files), "predictions": len(logged), "labels": len(labels)}


#: a rollout's status -> its request's status
ROLLOUT_REQUEST = {"running": "approved", "promoted": "promoted", "rolled_back": "rolled_back",
                   "failed": "failed"}  # fmt: skip


def check_rollouts(db: Path) -> list[dict[str, Any]]:
    """Every rollout agrees with its request, the route table and the champion alias: a
    running one has the champion it started from at 100 % and its candidate as the canary
    at one of its steps short of 100; a finished one left no canary row, and only a
    promoted one made its candidate champion. Its looks are numbered 1, 2, ... with steps
    that never go back, each at its step's percent. Returns the rollouts with their looks
    (steps, counts and verdicts decoded)."""
    table = routes(db)
    aliases = {a["model"]: a["version"]
               for a in query(db, "SELECT * FROM aliases WHERE alias = 'champion'")}  # fmt: skip
    requests = {r["id"]: r["status"] for r in query(db, "SELECT * FROM promotion_requests")}
    made = {(h["model"], h["new_version"])
            for h in query(db, "SELECT * FROM alias_history WHERE alias = 'champion'")}  # fmt: skip
    out = []
    for row in query(db, "SELECT * FROM rollouts ORDER BY id"):
        doc = {**dict(row), "steps": json.loads(row["steps"]), "config": json.loads(row["config"])}
        model, version, steps = doc["model"], doc["version"], doc["steps"]
        looks = [{**dict(look), "counts": json.loads(look["counts"]),
                  "verdict": json.loads(look["verdict"])}
                 for look in query(db, "SELECT * FROM rollout_looks WHERE rollout_id = ? "
                                       "ORDER BY seq", doc["id"])]  # fmt: skip
        assert [look["seq"] for look in looks] == list(range(1, len(looks) + 1)), doc["id"]
        at = [look["step"] for look in looks]
        assert at == sorted(at) and all(step <= doc["step"] for step in at), (doc["id"], at)
        assert all(look["percent"] == steps[look["step"]] for look in looks), doc["id"]
        assert requests[doc["request_id"]] == ROLLOUT_REQUEST[doc["status"]], doc
        routed = {v: (role, percent) for v, role, percent in table.get(model, [])}
        if doc["status"] == "running":
            assert doc["step"] < len(steps) - 1, doc
            assert routed.get(version) == ("canary", steps[doc["step"]]), (doc, routed)
            assert routed.get(doc["champion"]) == ("champion", 100.0), (doc, routed)
            assert aliases[model] == doc["champion"], (doc, aliases)
        else:
            assert routed.get(version, ("none",))[0] != "canary", (doc, routed)
            assert ((model, version) in made) == (doc["status"] == "promoted"), doc
        out.append({**doc, "looks": looks})
    running = [d["model"] for d in out if d["status"] == "running"]
    assert len(running) == len(set(running)), running
    return out


def last_audit(db: Path) -> int:
    return int(query(db, "SELECT COALESCE(MAX(id), 0) AS n FROM audit_log")[0]["n"])


def check_route_chain(db: Path, killed: dict[str, list[tuple[int, str, float]]], since: int) -> int:
    """The route table is the one the killed process last committed, or what later route
    changes made of it: each change after audit entry `since` started from the table the
    one before it left (the first from `killed`). Returns the number of those changes."""
    current = {model: sorted(rows) for model, rows in killed.items()}
    entries = query(db, "SELECT * FROM audit_log WHERE id > ? ORDER BY id", since)
    changes = [e for e in entries if e["action"] in ROUTE_ACTIONS]
    for entry in changes:
        model = entry["subject"]
        previous = sorted(tuple(r) for r in json.loads(entry["rollback"])["deployments"])
        assert previous == current.get(model, []), (dict(entry), current.get(model))
        current[model] = sorted(tuple(r) for r in json.loads(entry["detail"])["deployments"])
    assert routes(db) == {model: rows for model, rows in current.items() if rows}
    return len(changes)


def frozen(db: Path, to: Path) -> Path:
    """A consistent copy of a registry in use (sqlite3's backup), to check its tables
    against each other while a process changes them."""
    source, target = sqlite3.connect(db, timeout=30), sqlite3.connect(to)
    try:
        source.backup(target)
    finally:
        target.close()
        source.close()
    return to
