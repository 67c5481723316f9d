"""The registry with the standard library only, for the one command that must start fast:
a fully cached `servo train` re-run records its run with `sqlite3`, without importing
SQLAlchemy (about 0.2 s of that command). SQLite only.

It reads what the fast path decides on (schema revision, runs that recovery would touch,
aliases, versions, lineage) and writes one finished run (pipeline_runs, step_runs and
artifacts rows, exactly as `registry.store.RegistryStore` writes them: the same columns,
defaults, JSON and datetime encodings) in one `BEGIN IMMEDIATE` transaction, the write
lock the store's engine takes too, so no other writer interleaves with its last checks.
Whatever it does not recognise (another URL, a missing file, an older or newer schema)
makes `LiteRegistry.open` answer None: the caller then takes the normal path.

Also home of `migration_heads`, which `registry.base` uses to skip Alembic when the
schema is current.
"""

from __future__ import annotations

import ast
import datetime as dt
import json
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from registry.lease import current

MIGRATION_VERSIONS = Path(__file__).parent / "migrations" / "versions"


def migration_heads(folder: Path = MIGRATION_VERSIONS) -> set[str] | None:
    """The newest revision(s) of the migrations, read from their files without importing
    Alembic (a CLI command that finds the schema current skips Alembic altogether); None
    when a file does not read as expected (then Alembic decides)."""
    revisions: set[str] = set()
    parents: set[str] = set()
    for path in folder.glob("*.py"):
        found: dict[str, Any] = {}
        for line in path.read_text().splitlines():
            key, sep, value = line.partition("=")
            key = key.split(":", 1)[0].strip()  # `revision: str = "0002"` too
            if sep and key in ("revision", "down_revision") and line[0] != " ":
                try:
                    found[key] = ast.literal_eval(value.strip())
                except (ValueError, SyntaxError):
                    return None
        revision, down = found.get("revision"), found.get("down_revision")
        if not isinstance(revision, str):
            return None
        revisions.add(revision)
        parents.update([down] if isinstance(down, str) else (down or ()))
    heads = revisions - parents
    return heads or None


def sqlite_file(url: str) -> Path | None:
    """The database file of a plain `sqlite:///PATH` URL (relative to the working folder,
    as SQLAlchemy reads it), or None for any other URL (a driver, query options, memory)."""
    prefix = "sqlite:///"
    if not url.startswith(prefix) or "?" in url:
        return None
    path = url.removeprefix(prefix)
    if not path or path == ":memory:" or path.startswith("file:"):
        return None
    return Path(path)


def timestamp(at: dt.datetime) -> str:
    """A datetime as SQLAlchemy's SQLite DATETIME stores it (the UTC fields, always with
    microseconds)."""
    return (
        f"{at.year:04d}-{at.month:02d}-{at.day:02d} "
        f"{at.hour:02d}:{at.minute:02d}:{at.second:02d}.{at.microsecond:06d}"
    )


def _json(value: Any) -> str:
    return json.dumps(value)  # SQLAlchemy's JSON type: json.dumps with its defaults


@dataclass(frozen=True)
class LiteVersion:
    model: str
    version: int
    status: str
    artifact_uri: str
    run_id: int | None
    servable: bool


@dataclass(frozen=True)
class FinishedRun:
    """The pipeline_runs row of a run recorded once it is over."""

    pipeline: str
    trigger: str
    parameters: dict[str, Any]
    started_at: dt.datetime
    status: str = "succeeded"
    #: the model it retrains and who triggered it by hand (registry.runs.start_run)
    model: str | None = None
    triggered_by: str | None = None


class StepLineage(Protocol):
    """One step's records (retrain.pipeline.StepRecord)."""

    @property
    def step(self) -> str: ...
    @property
    def fields(self) -> dict[str, Any]: ...
    @property
    def artifacts(self) -> list[dict[str, Any]]: ...


#: step_runs columns with the defaults the ORM fills in; the JSON ones
_STEP_DEFAULTS: dict[str, Any] = {"cache_key": None, "attempts": 1, "parameters": {},
                                  "metrics": {}, "duration_s": 0.0, "log_uri": None,
                                  "error": None}  # fmt: skip
_STEP_JSON = frozenset({"parameters", "metrics"})
_ARTIFACT_COLUMNS = ("name", "direction", "uri", "content_hash", "size")


class LiteRegistry:
    """One sqlite3 connection to an existing registry database at the migration head."""

    def __init__(self, connection: sqlite3.Connection):
        self._db = connection

    @classmethod
    def open(cls, url: str, *, trace: Callable[[str], None] | None = None) -> LiteRegistry | None:
        """The registry at `url` if it is a SQLite file that exists and is at the
        migration head, else None. `trace` is called with each SQL statement."""
        path = sqlite_file(url)
        if path is None or not path.is_file():
            return None
        try:
            db = sqlite3.connect(
                f"{path.absolute().as_uri()}?mode=rw", uri=True, timeout=30,
                isolation_level=None,
            )  # fmt: skip
        except sqlite3.Error:
            return None
        lite = cls(db)
        try:
            if trace is not None:
                db.set_trace_callback(trace)
            for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "foreign_keys=ON",
                           "busy_timeout=30000"):  # fmt: skip
                db.execute(f"PRAGMA {pragma}")  # as the store's engine sets them
            if lite.at_head():
                return lite
        except sqlite3.Error:
            pass
        lite.close()
        return None

    def close(self) -> None:
        self._db.close()

    def at_head(self) -> bool:
        heads = migration_heads()
        try:
            rows = self._db.execute("SELECT version_num FROM alembic_version").fetchall()
        except sqlite3.OperationalError:
            return False
        return heads is not None and {str(row[0]) for row in rows} == heads

    def recovery_needed(self) -> str | None:
        """Why the recovery check (registry.runs.recover_runs) could have work to do, or
        None when it has nothing to change: no run running (a dead one is marked failed),
        no unpublished version left (failed), no ended run's scratch folders to remove."""
        checks = (
            ("a pipeline run is running", "SELECT 1 FROM pipeline_runs WHERE status = 'running'"),
            ("a version is not published",
             "SELECT 1 FROM model_versions WHERE servable = 0 AND status != 'failed'"),
            ("an ended run left scratch folders",
             "SELECT 1 FROM pipeline_runs WHERE status != 'running' AND scratch IS NOT NULL"),
        )  # fmt: skip
        for why, query in checks:
            if self._db.execute(query + " LIMIT 1").fetchone() is not None:
                return why
        return None

    def alias(self, model: str, alias: str) -> int | None:
        row = self._db.execute(
            "SELECT version FROM aliases WHERE model = ? AND alias = ?", (model, alias)
        ).fetchone()
        return None if row is None else int(row[0])

    _VERSION = "SELECT model, version, status, artifact_uri, run_id, servable FROM model_versions"

    def version(self, model: str, version: int) -> LiteVersion:
        row = self._db.execute(
            f"{self._VERSION} WHERE model = ? AND version = ?", (model, version)
        ).fetchone()
        if row is None:
            raise KeyError(f"model '{model}' has no version {version}")
        return _version(row)

    def versions(self, model: str) -> list[LiteVersion]:
        rows = self._db.execute(f"{self._VERSION} WHERE model = ? ORDER BY version", (model,))
        return [_version(row) for row in rows]

    def run(self, run_id: int, recover: bool = False) -> dict[str, Any]:
        """A run's artifacts, as in `RegistryStore.run(run_id, recover=False)`."""
        if recover:
            raise ValueError("the lite registry does not recover runs")
        rows = self._db.execute(
            "SELECT step, name, direction, uri, content_hash, size FROM artifacts "
            "WHERE run_id = ? ORDER BY id",
            (run_id,),
        )
        names = ("step", *_ARTIFACT_COLUMNS)
        return {"id": run_id, "artifacts": [dict(zip(names, row, strict=True)) for row in rows]}

    def record_finished_run(
        self, run: FinishedRun, steps: Sequence[StepLineage], verify: Callable[[], bool]
    ) -> int | None:
        """Record a run that is over with its steps and artifacts in one BEGIN IMMEDIATE
        transaction; first, under that lock, the schema must still be at the head, the
        recovery check must have nothing to do and `verify()` (the caller's own checks,
        on this connection) must hold, else nothing is written and the answer is None."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            if not self.at_head() or self.recovery_needed() is not None or not verify():
                db.execute("ROLLBACK")
                return None
            run_id = self._insert_run(run)
            for record in steps:
                self._insert_step(run_id, record)
            db.execute(
                "UPDATE pipeline_runs SET finished_at = ? WHERE id = ?",
                (timestamp(dt.datetime.now(dt.UTC)), run_id),
            )
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return run_id

    def _insert_run(self, run: FinishedRun) -> int:
        lease = current()
        started = timestamp(run.started_at.astimezone(dt.UTC))
        row: dict[str, Any] = {
            "pipeline": run.pipeline, "trigger": run.trigger, "status": run.status,
            "parameters": _json(run.parameters), "error": None, "started_at": started,
            "lease_host": lease.host, "lease_pid": lease.pid, "lease_process": lease.process,
            "heartbeat_at": started, "scratch": None, "model": run.model,
            "triggered_by": run.triggered_by,
        }  # fmt: skip
        return self._insert("pipeline_runs", row)

    def _insert_step(self, run_id: int, record: StepLineage) -> None:
        unknown = set(record.fields) - {"status", *_STEP_DEFAULTS}
        if unknown or "status" not in record.fields:
            raise ValueError(f"step fields not recorded here: {sorted(unknown) or 'status'}")
        row = {"run_id": run_id, "step": record.step, "status": record.fields["status"]}
        for column, default in _STEP_DEFAULTS.items():
            value = record.fields.get(column, default)
            row[column] = _json(value) if column in _STEP_JSON else value
        self._insert("step_runs", row)
        for artifact in record.artifacts:
            if set(artifact) != set(_ARTIFACT_COLUMNS):
                raise ValueError(f"artifact fields not recorded here: {sorted(artifact)}")
            self._insert("artifacts", {"run_id": run_id, "step": record.step, **artifact})

    def _insert(self, table: str, row: dict[str, Any]) -> int:
        columns = ", ".join(f'"{name}"' for name in row)
        marks = ", ".join("?" for _ in row)
        cursor = self._db.execute(
            f"INSERT INTO {table} ({columns}) VALUES ({marks})", tuple(row.values())
        )
        if cursor.lastrowid is None:
            raise sqlite3.DatabaseError(f"no row id for the new {table} row")
        return cursor.lastrowid


def _version(row: tuple[Any, ...]) -> LiteVersion:
    model, version, status, uri, run_id, servable = row
    return LiteVersion(str(model), int(version), str(status), str(uri or ""), run_id,
                       bool(servable))  # fmt: skip
