"""The fast path of a fully cached `servo train` re-run (servo.train.train_cached on
registry.lite): taken without importing SQLAlchemy, it writes exactly the rows the normal
path writes, it falls back (writing nothing) whenever a condition does not hold, and its
checks and writes are one BEGIN IMMEDIATE transaction no other writer interleaves with.

One real training (module fixture); every test works on its own copy of that registry
(the sqlite3 backup API), with the same work folder (so artifact paths agree)."""

from __future__ import annotations

import re
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from registry.lease import current
from registry.lite import LiteRegistry, sqlite_file
from registry.store import RegistryStore
from retrain.pipeline import Runner
from servo.train import Trained, train, train_cached
from tests.test_cli_imports import probe
from tests.test_pipeline import diamond

TABLES = ("models", "model_versions", "aliases", "alias_history", "deployments",
          "pipeline_runs", "step_runs", "artifacts", "promotion_requests", "decisions",
          "audit_log", "alembic_version")  # fmt: skip
#: columns that hold a time (compared by format) or a duration (compared by type)
TIMES = ("started_at", "finished_at", "heartbeat_at")


@dataclass(frozen=True)
class TrainedOnce:
    work: Path
    db: Path


@pytest.fixture(scope="module")
def first(tmp_path_factory: pytest.TempPathFactory) -> TrainedOnce:
    base = tmp_path_factory.mktemp("fast-cache")
    db = base / "registry.db"
    store = RegistryStore(f"sqlite:///{db}")
    store.create_schema()
    try:
        trained = train(store, work=base / "w")
    finally:
        store.close()
    assert trained.version == 1 and not trained.reused
    return TrainedOnce(base / "w", db)


def copy_registry(first: TrainedOnce, into: Path) -> str:
    """A copy of the trained registry (WAL included: the backup API); its URL."""
    into.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(first.db) as src, sqlite3.connect(into) as dst:
        src.backup(dst)
    src.close()
    dst.close()
    return f"sqlite:///{into}"


def execute(url: str, sql: str, args: tuple[Any, ...] = ()) -> None:
    path = sqlite_file(url)
    assert path is not None
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute(sql, args)
    finally:
        db.close()


def dump(url: str, new_run: int | None = None) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table, as stored (the encodings: JSON text, datetime text); in
    the rows of run `new_run`, times are reduced to their format and durations to their
    type (they differ from run to run)."""
    path = sqlite_file(url)
    assert path is not None
    db = sqlite3.connect(path)
    try:
        tables: dict[str, list[tuple[Any, ...]]] = {}
        for table in TABLES:
            cursor = db.execute(f"SELECT * FROM {table} ORDER BY rowid")
            names = [d[0] for d in cursor.description]
            rows = []
            for row in cursor:
                doc = dict(zip(names, row, strict=True))
                mine = new_run is not None and (
                    doc.get("run_id") == new_run
                    if table in ("step_runs", "artifacts")
                    else table == "pipeline_runs" and doc["id"] == new_run
                )
                if mine:
                    for column in TIMES:
                        if column in doc and doc[column] is not None:
                            doc[column] = re.sub(r"\d", "d", doc[column])
                    if "duration_s" in doc:
                        doc["duration_s"] = type(doc["duration_s"]).__name__
                rows.append(tuple(doc.items()))
            tables[table] = rows
        return tables
    finally:
        db.close()


def runs(url: str) -> list[tuple[int, str]]:
    path = sqlite_file(url)
    assert path is not None
    db = sqlite3.connect(path)
    try:
        rows = db.execute("SELECT id, status FROM pipeline_runs ORDER BY id")
        return [(int(r[0]), str(r[1])) for r in rows]
    finally:
        db.close()


def summary(trained: Trained) -> tuple[Any, ...]:
    steps = {name: (r.status, r.cache_key, r.outputs, r.hashes) for name, r in
             trained.run.steps.items()}  # fmt: skip
    return (trained.version, trained.folder, trained.metrics, trained.reused, trained.run.run_id,
            trained.run.status, steps)  # fmt: skip


def test_the_fast_path_writes_the_rows_the_normal_path_writes(
    first: TrainedOnce, tmp_path: Path
) -> None:
    normal_url = copy_registry(first, tmp_path / "normal" / "registry.db")
    fast_url = copy_registry(first, tmp_path / "fast" / "registry.db")
    assert dump(normal_url) == dump(fast_url)  # two copies of one registry
    store = RegistryStore(normal_url)
    try:
        normal = train(store, work=first.work)
    finally:
        store.close()
    fast = train_cached(fast_url, work=first.work)
    assert fast is not None, "the fast path applies to a fully cached re-run"
    assert normal.reused and set(s.status for s in normal.run.steps.values()) == {"cached"}
    assert summary(fast) == summary(normal)  # what `servo train` prints comes from these
    run_id = fast.run.run_id
    assert runs(fast_url)[-1] == (run_id, "succeeded")
    normal_rows, fast_rows = dump(normal_url, run_id), dump(fast_url, run_id)
    for table in TABLES:
        assert fast_rows[table] == normal_rows[table], table
    assert len([r for r in fast_rows["step_runs"] if dict(r)["run_id"] == run_id]) == 4
    # the datetimes are the ones SQLAlchemy writes (its format and value type), and a
    # run's first heartbeat is its start
    path = sqlite_file(fast_url)
    assert path is not None
    db = sqlite3.connect(path)
    try:
        started, finished, beat = db.execute(
            "SELECT started_at, finished_at, heartbeat_at FROM pipeline_runs WHERE id = ?",
            (run_id,),
        ).fetchone()
    finally:
        db.close()
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6}", started)
    assert beat == started <= finished
    # and the store reads the fast path's run like any other
    store = RegistryStore(fast_url)
    try:
        doc = store.run(run_id)
        assert doc["status"] == "succeeded" and doc["finished_at"] >= doc["started_at"]
        assert [s["status"] for s in doc["steps"]] == ["cached"] * 4
    finally:
        store.close()


@pytest.mark.slow
def test_a_cached_cli_rerun_takes_the_fast_path_without_sqlalchemy(
    first: TrainedOnce, tmp_path: Path
) -> None:
    url = copy_registry(first, tmp_path / "registry.db")
    args = ["train", "--work-dir", str(first.work), "--registry", url]
    modules, output, codes = probe(args, cwd=tmp_path)
    assert codes == [0], output
    assert "sqlalchemy" not in modules and "alembic" not in modules, output
    run_id = runs(url)[-1][0]
    assert output.strip() == (
        f"unchanged: already registered as digits version 1 (run {run_id}: ingest=cached, "
        f"split=cached, train=cached, evaluate=cached); holdout accuracy "
        f"{first_accuracy(first):.3f} -> {first.work.resolve() / 'models' / 'digits' / '1'}"
    )
    # a run left running by a process that died: the normal path (SQLAlchemy) recovers it
    dead = RegistryStore(url)
    try:
        stale = dead.start_run("digits", "manual", {})
    finally:
        dead.close()
    execute(url, "UPDATE pipeline_runs SET lease_pid = 999999999 WHERE id = ?", (stale,))
    modules, output, codes = probe(args, cwd=tmp_path)
    assert codes == [0], output
    assert "sqlalchemy" in modules and "unchanged: already registered" in output
    assert (stale, "failed") in runs(url)


def first_accuracy(first: TrainedOnce) -> float:
    store = RegistryStore(f"sqlite:///{first.db}")
    try:
        return float(store.version("digits", 1).metrics["accuracy"])
    finally:
        store.close()


def _running_run(url: str, work: Path) -> dict[str, Any]:
    store = RegistryStore(url)
    try:
        store.start_run("digits", "manual", {})  # leased to this (live) process
    finally:
        store.close()
    return {}


def _not_at_head(url: str, work: Path) -> dict[str, Any]:
    execute(url, "UPDATE alembic_version SET version_num = '0001'")
    return {}


def _step_not_cached(url: str, work: Path) -> dict[str, Any]:
    return {"params": {"seed": 1}}  # another split: split, train and evaluate would run


def _no_identical_version(url: str, work: Path) -> dict[str, Any]:
    execute(url, "UPDATE artifacts SET content_hash = 'sha256:00' WHERE step = 'train' AND "
                 "name = 'model.onnx' AND direction = 'output'")  # fmt: skip
    return {}


def _another_model(url: str, work: Path) -> dict[str, Any]:
    return {"name": "digits2"}  # cached steps, but no version of that model


def _postgres_url(url: str, work: Path) -> dict[str, Any]:
    return {"url": "postgresql://servo@127.0.0.1:1/registry"}


def _missing_file(url: str, work: Path) -> dict[str, Any]:
    return {"url": f"{url}.missing"}


def _unpublished_version(url: str, work: Path) -> dict[str, Any]:
    # reserved by run 1, which ended without publishing it: recovery marks it failed
    store = RegistryStore(url)
    try:
        store.register_version("digits", artifact_uri="", run_id=1, servable=False)
    finally:
        store.close()
    return {}


def _ended_run_with_scratch(url: str, work: Path) -> dict[str, Any]:
    execute(url, "UPDATE pipeline_runs SET scratch = ? WHERE id = 1", ('["/x/run-1.tmp"]',))
    return {}


def _legacy_tmp_folder(url: str, work: Path) -> dict[str, Any]:
    (work / "models" / "digits" / ".7.tmp").mkdir()
    return {}


def _champion_set(url: str, work: Path) -> dict[str, Any]:
    # a champion changes the evaluate step's inputs (it is evaluated beside the candidate)
    store = RegistryStore(url)
    try:
        store.set_alias("digits", "champion", 1, actor="test")
    finally:
        store.close()
    return {}


@pytest.mark.parametrize(
    "condition",
    [
        _running_run,
        _not_at_head,
        _step_not_cached,
        _no_identical_version,
        _another_model,
        _postgres_url,
        _missing_file,
        _unpublished_version,
        _ended_run_with_scratch,
        _legacy_tmp_folder,
        _champion_set,
    ],
    ids=lambda f: f.__name__.strip("_"),
)
def test_each_unmet_condition_falls_back_writing_nothing(
    first: TrainedOnce, tmp_path: Path, condition: Any
) -> None:
    url = copy_registry(first, tmp_path / "registry.db")
    # the condition holds first: the fast path would be taken (the check can fail)
    control = copy_registry(first, tmp_path / "control.db")
    assert train_cached(control, work=first.work) is not None
    try:
        change = condition(url, first.work)
        before = dump(url)
        args = {"work": first.work, **{k: v for k, v in change.items() if k != "url"}}
        assert train_cached(change.get("url", url), **args) is None
        assert dump(url) == before  # nothing written
        assert not (tmp_path / "registry.db.missing").exists()  # nor created
    finally:
        for tmp in (first.work / "models" / "digits").glob(".*.tmp"):
            tmp.rmdir()


def test_a_concurrent_writer_cannot_interleave(first: TrainedOnce, tmp_path: Path) -> None:
    """The fast path's last checks and its writes are one BEGIN IMMEDIATE transaction: a
    writer holding the lock while the fast path waits for it makes a run `running`; once
    it commits, the fast path sees that run under the lock and falls back."""
    for commit_running_run in (True, False):
        url = copy_registry(first, tmp_path / f"registry-{commit_running_run}.db")
        path = sqlite_file(url)
        assert path is not None
        writer = sqlite3.connect(path, isolation_level=None, timeout=30)
        waiting = threading.Event()
        outcome: list[Trained | None] = []

        def trace(sql: str, waiting: threading.Event = waiting) -> None:
            if sql.strip().upper() == "BEGIN IMMEDIATE":
                waiting.set()

        def fast(url: str = url, waiting: threading.Event = waiting,
                 outcome: list[Trained | None] = outcome) -> None:  # fmt: skip
            try:
                outcome.append(train_cached(url, work=first.work, trace=trace))
            finally:
                waiting.set()

        before = runs(url)
        writer.execute("BEGIN IMMEDIATE")
        thread = threading.Thread(target=fast)
        thread.start()
        try:
            assert waiting.wait(120)  # the fast path asks for the write lock
            assert thread.is_alive() and outcome == []  # and waits for it
            assert runs(url) == before
            if commit_running_run:  # a run leased to this live process, as start_run writes it
                me = current()
                writer.execute(
                    'INSERT INTO pipeline_runs (pipeline, "trigger", status, parameters, '
                    "started_at, lease_host, lease_pid, lease_process, heartbeat_at) VALUES "
                    "('digits', 'manual', 'running', '{}', '2026-01-01 00:00:00.000000', ?, ?, "
                    "?, '2026-01-01 00:00:00.000000')",
                    (me.host, me.pid, me.process),
                )
            writer.execute("COMMIT")
        finally:
            thread.join()
            writer.close()
        after = runs(url)
        if commit_running_run:
            assert outcome == [None]  # saw the running run under the lock: no record
            assert after == [*before, (before[-1][0] + 1, "running")]
        else:
            assert outcome[0] is not None  # the lock was free again: recorded
            assert after == [*before, (outcome[0].run.run_id, "succeeded")]


def test_open_refuses_what_it_does_not_recognise(first: TrainedOnce, tmp_path: Path) -> None:
    url = copy_registry(first, tmp_path / "registry.db")
    lite = LiteRegistry.open(url)
    assert lite is not None
    lite.close()
    for other in ("postgresql://u@h/db", "sqlite://", "sqlite:///:memory:",
                  f"{url}?timeout=5", f"sqlite+pysqlite:///{tmp_path / 'registry.db'}",
                  f"sqlite:///{tmp_path / 'none.db'}"):  # fmt: skip
        assert LiteRegistry.open(other) is None, other
    assert not (tmp_path / "none.db").exists()
    (tmp_path / "junk.db").write_bytes(b"not a database" * 100)
    assert LiteRegistry.open(f"sqlite:///{tmp_path / 'junk.db'}") is None
    empty = tmp_path / "empty.db"
    sqlite3.connect(empty).close()
    assert LiteRegistry.open(f"sqlite:///{empty}") is None  # no schema: not at the head


@pytest.fixture
def diamond_runner(tmp_path: Path) -> Iterator[Runner]:
    store = RegistryStore(f"sqlite:///{tmp_path / 'r.db'}")
    store.create_schema()
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "c.txt").write_text("gamma")
    yield Runner(tmp_path / "store", store)
    store.close()


def tree(root: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(root)), p.stat().st_mtime_ns) for p in root.rglob("*"))


def test_plan_is_a_dry_run_with_the_records_of_a_cached_run(
    diamond_runner: Runner, tmp_path: Path
) -> None:
    runner = diamond_runner
    store = runner.sink
    assert isinstance(store, RegistryStore)
    assert runner.plan(diamond(tmp_path)) is None  # nothing cached yet
    runner.run(diamond(tmp_path))
    files, recorded = tree(tmp_path / "store"), store.runs(limit=100)
    plan = runner.plan(diamond(tmp_path))
    assert plan is not None
    assert tree(tmp_path / "store") == files and store.runs(limit=100) == recorded  # dry
    assert runner.plan(diamond(tmp_path), cache=False) is None
    cached = runner.run(diamond(tmp_path))
    doc = store.run(cached.run_id)
    assert {k: (r.status, r.cache_key, r.outputs, r.hashes) for k, r in plan.results.items()} == {
        k: (r.status, r.cache_key, r.outputs, r.hashes) for k, r in cached.steps.items()
    }
    steps = [{k: v for k, v in r.fields.items() if k != "duration_s"} | {"step": r.step}
             for r in plan.records]  # fmt: skip
    assert steps == [
        {k: v for k, v in s.items() if k not in ("duration_s", "error")} for s in doc["steps"]
    ]
    assert [{"step": r.step, **a} for r in plan.records for a in r.artifacts] == doc["artifacts"]
    (tmp_path / "c.txt").write_text("gammb")  # one source byte: c, d and e would run
    assert runner.plan(diamond(tmp_path)) is None
    (tmp_path / "c.txt").unlink()  # a missing source: the run would fail, the plan says no
    assert runner.plan(diamond(tmp_path)) is None
