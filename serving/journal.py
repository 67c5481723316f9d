"""Durable labels: a journal first (group commit), the Parquet feedback table after.

`store(records)` completes its future once the records are appended to the journal
(`<root>/feedback/_journal/labels-<ns>.<instance>.jsonl`, one JSON object a line; the
instance is the writer's, `serving.instance`) and fsynced. One thread does the commits:
every `store()` waiting when it starts a commit shares one write and one fsync, so
durability costs one fsync per group, not per label. Journaled records go into the
feedback table's Parquet files (format: `monitors.payload_log`) every `flush_s` or
`batch_rows`, fsynced, and the journal is then deleted; so the table keeps files of many
labels, not one file per request.

A journal found at start, left by a writer no longer running (its instance's lock can be
taken: a live writer's journal is its own), is replayed into Parquet before the server
answers anything: its labels, less a torn last line and the rows the table already holds
(that writer's flush, or a replay cut short), become a file, and the journal is removed.
Writers starting together on a shared folder take turns (`serving.instance.ReplayLock`),
so each journal is replayed once. A running writer also replays, every `adopt_s`, the
journals of writers killed since (a pod killed for good, that no start follows). Readers
never see the journal (names starting with "_" are not data files).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import queue
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import IO, Any

import orjson
import pyarrow as pa

from monitors.payload_log import FEEDBACK, SCHEMAS, StagedPart, fsync_path, partition_dir
from serving.instance import Instance, ReplayLock, owner_of, writer_alive
from serving.log_index import LogIndex

log = logging.getLogger("servo.serving")

JOURNAL_DIR = "_journal"
Records = list[dict[str, Any]]
_Commit = tuple[Records, "Future[None]"]


def write_grouped(
    root: Path, table: str, records: Records, name: Callable[[], str], *, fsync: bool
) -> None:
    """Records into one file per partition, all published together or none."""
    groups: dict[tuple[str, str | None, dt.date], Records] = defaultdict(list)
    for record in records:
        groups[(record["model"], record["version"], record["time"].date())].append(record)
    staged: list[StagedPart] = []
    try:
        for (model, version, day), rows in groups.items():
            folder = partition_dir(root, table, model, version, day)
            rows_table = pa.Table.from_pylist(rows, schema=SCHEMAS[table])
            staged.append(StagedPart(folder, name(), rows_table, fsync=fsync))
        for part in staged:
            part.publish()
    finally:
        for part in staged:
            part.discard()


class FeedbackStore:
    def __init__(
        self,
        root: Path,
        *,
        flush_s: float,
        batch_rows: int,
        fsync: bool,
        group_commit: bool,
        name: Callable[[], str],
        instance: Instance,
        adopt_s: float = 0.0,
    ):
        self.root = Path(root)
        self.folder = self.root / FEEDBACK / JOURNAL_DIR
        self.flush_s, self.batch_rows = flush_s, batch_rows
        self.fsync, self.group_commit = fsync, group_commit
        self.adopt_s = adopt_s
        self._name = name
        self.instance = instance
        self._commits: queue.SimpleQueue[_Commit | None] = queue.SimpleQueue()
        self._buffer: Records = []
        #: ids journaled but not yet in Parquet, by model (read by lookups: `unflushed`)
        self._unflushed: dict[str, set[str]] = defaultdict(set)
        self._lock = threading.Lock()
        self._journal: IO[bytes] | None = None
        self._journal_path: Path | None = None
        self._closed = False
        # written by the commit thread only
        self.commits = 0
        self.stored = 0
        self.write_errors = 0
        self.last_error: str | None = None
        #: labels replayed from dead writers' journals: at start, and every `adopt_s`
        self.recovered = self._recover(wait=True)
        self._thread = threading.Thread(target=self._run, name="servo-feedback-log", daemon=True)
        self._thread.start()

    def store(self, table: str, records: Records) -> Future[None]:
        if table != FEEDBACK:
            raise ValueError(f"only {FEEDBACK} records are stored durably, not {table}")
        future: Future[None] = Future()
        if self._closed:
            future.set_exception(OSError("the payload log is closed"))
        else:
            self._commits.put((records, future))
        return future

    def unflushed(self, model: str, ids: list[str]) -> set[str]:
        """Which of `ids` are stored but not yet in the table's files. Ask this before
        the files: an id leaves this set only once its file is published."""
        with self._lock:
            waiting = self._unflushed.get(model)
            return {i for i in ids if i in waiting} if waiting else set()

    def close(self, timeout_s: float = 10.0) -> None:
        self._closed = True
        self._commits.put(None)
        self._thread.join(timeout_s)

    def running(self) -> bool:
        """Whether the commit thread still runs (close() timed out on a stalled disk)."""
        return self._thread.is_alive()

    # commit thread

    def _run(self) -> None:
        deadline: float | None = None  # when the buffered records go to Parquet
        adopt_at = time.monotonic() + self.adopt_s if self.adopt_s > 0 else None
        stopping = False
        while not stopping:
            wake = min((t for t in (deadline, adopt_at) if t is not None), default=None)
            batch, stopping = self._next(wake)
            if adopt_at is not None and time.monotonic() >= adopt_at and not stopping:
                # a writer killed that no start follows (its pod gone): its labels still
                # reach the table, through a writer that runs
                self.recovered += self._recover(wait=False)
                adopt_at = time.monotonic() + self.adopt_s
            if batch:
                self._commit(batch)
            if self._buffer and deadline is None:
                deadline = time.monotonic() + self.flush_s
            due = deadline is not None and time.monotonic() >= deadline
            if self._buffer and (stopping or due or len(self._buffer) >= self.batch_rows):
                deadline = None if self._flush() else time.monotonic() + min(self.flush_s, 1.0)
        self._reset_journal()

    def _next(self, deadline: float | None) -> tuple[list[_Commit], bool]:
        """The stores waiting now (at least one, unless the deadline passes first), and
        whether close() was called."""
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            item = self._commits.get(timeout=timeout)
        except queue.Empty:
            return [], False
        if item is None:
            return [], True
        batch = [item]
        while self.group_commit:
            try:
                item = self._commits.get_nowait()
            except queue.Empty:
                break
            if item is None:
                return batch, True
            batch.append(item)
        return batch, False

    def _commit(self, batch: list[_Commit]) -> None:
        records = [r for rows, _ in batch for r in rows]
        data = b"".join(orjson.dumps(r) + b"\n" for r in records)
        try:
            self.instance.hold()
            journal = self._open()
            journal.write(data)
            journal.flush()
            if self.fsync:
                os.fsync(journal.fileno())
        except OSError as exc:
            self._failed(f"{self.folder}: {exc}")
            self._reset_journal()  # a torn line stays behind; recovery skips it
            for _, future in batch:
                future.set_exception(exc)
            return
        self.commits += 1
        self.stored += len(records)
        self._buffer.extend(records)
        with self._lock:
            for record in records:
                self._unflushed[record["model"]].add(record["id"])
        for _, future in batch:
            future.set_result(None)

    def _open(self) -> IO[bytes]:
        if self._journal is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            path = self.folder / f"labels-{time.time_ns()}.{self.instance.id}.jsonl"
            self._journal = path.open("ab")
            self._journal_path = path
            if self.fsync:
                fsync_path(self.folder)
        return self._journal

    def _reset_journal(self) -> None:
        if self._journal is not None:
            with contextlib.suppress(OSError):
                self._journal.close()
        self._journal = None

    def _flush(self) -> bool:
        """Buffered records into Parquet (fsynced), then the journal they came from goes."""
        try:
            self.instance.hold()
            write_grouped(self.root, FEEDBACK, self._buffer, self._name, fsync=True)
        except (OSError, pa.ArrowException) as exc:
            self._failed(f"{self.root}: {exc}")
            return False
        with self._lock:
            for record in self._buffer:
                self._unflushed[record["model"]].discard(record["id"])
        self._buffer = []
        path = self._journal_path
        self._reset_journal()
        self._journal_path = None
        if path is not None:
            path.unlink(missing_ok=True)
        return True

    def _failed(self, error: str) -> None:
        self.write_errors += 1
        self.last_error = error
        log.error("feedback log write failed: %s", error)

    # start-up

    def _recover(self, *, wait: bool) -> int:
        """Replay journals left by writers that died before writing them to Parquet
        (without `wait`: not while another writer replays; again next time)."""
        if not self._dead_journals():
            return 0
        try:
            with ReplayLock(self.root, wait=wait):  # another writer may be replaying them
                journals = self._dead_journals()
                if not journals:
                    return 0
                self.instance.hold()
                return self._replay(journals)
        except BlockingIOError:
            return 0
        except (OSError, pa.ArrowException) as exc:
            # kept for the next start; until then these labels are not in the table
            self._failed(f"journal replay failed, kept in {self.folder}: {exc}")
            return 0

    def _dead_journals(self) -> list[Path]:
        """Journals whose writer no longer runs ("journal-<pid>-<ns>.jsonl": from before
        instances)."""
        try:
            names = sorted(e.name for e in os.scandir(self.folder) if e.name.endswith(".jsonl"))
        except OSError:
            return []
        dead = [n for n in names if writer_alive(self.root, n, self.instance) is False]
        return [self.folder / n for n in dead]

    def _replay(self, journals: list[Path]) -> int:
        """The dead writers' labels, less those already in the table."""
        by_owner: dict[str | None, dict[str, dict[str, Any]]] = defaultdict(dict)
        for path in journals:
            records = by_owner[owner_of(path.name)]  # another pod's label for an id: its own
            for line in path.read_bytes().splitlines():
                record = _record(line)
                if record is not None:
                    records.setdefault(record["id"], record)
        kept = self._not_in_table([r for records in by_owner.values() for r in records.values()])
        if kept:
            write_grouped(self.root, FEEDBACK, kept, self._name, fsync=True)
        for path in journals:
            path.unlink()
        fsync_path(self.folder)
        log.info("feedback journal replayed: %d label(s) recovered", len(kept))
        return len(kept)

    def _not_in_table(self, records: Records) -> Records:
        """`records` less the rows the table holds already, field for field (written by
        their writer before it died, or by a replay cut short); another label for the
        same id (another pod's) is another row."""
        table = LogIndex(self.root, FEEDBACK)
        by_model: dict[str, Records] = defaultdict(list)
        for record in records:
            by_model[record["model"]].append(record)
        kept: Records = []
        for model, rows in by_model.items():
            held = table.rows(model, [r["id"] for r in rows], list(_FIELDS)).to_pylist()
            present = {_row_key(r) for r in held}
            kept.extend(r for r in rows if _row_key(r) not in present)
        return kept


_FIELDS = ("id", "time", "model", "version", "label", "outcome")


def _row_key(record: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(record[name] for name in _FIELDS)


def _record(line: bytes) -> dict[str, Any] | None:
    """One journal line, or None for a torn or foreign one."""
    try:
        doc = orjson.loads(line)
        if not isinstance(doc, dict) or set(doc) != set(_FIELDS):
            return None
        doc["time"] = dt.datetime.fromisoformat(doc["time"])
    except (orjson.JSONDecodeError, TypeError, ValueError):
        return None
    if not isinstance(doc["id"], str) or not isinstance(doc["model"], str):
        return None
    return doc
