"""The payload log writer: a bounded, non-blocking queue drained by one thread into
Parquet files (format: `monitors.payload_log`).

`submit()` never blocks a request: when the queue is full the record is dropped and
counted. The writer flushes every `flush_s` seconds, when `batch_rows` records are
waiting, and on close. A write that fails (disk full, folder unwritable) keeps its records
in memory and retries at the next flush; only when that backlog exceeds the queue's
capacity are the oldest records dropped, and counted.

Labels take another path, `store()` (`serving.journal`): durable before it completes.

A file is written under a temporary name and renamed (`monitors.payload_log.StagedPart`):
a writer killed mid-write leaves only that temporary file, never half a data file; those
of writers no longer running are removed when a log opens on the folder.

Many writers may share the folder (gateway pods and the controller on one volume): each
is an instance (`serving.instance`) whose id every file name it writes carries, and which
holds a lock while it runs; a writer touches only its own files, and another's leftovers
only once that writer's lock shows it dead. Readers read every writer's files.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import logging
import os
import queue
import threading
import time
from collections import defaultdict
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from monitors.payload_log import PREDICTIONS, SCHEMAS, as_records, partition_dir, write_part
from serving.instance import Instance, writer_alive
from serving.journal import FeedbackStore

log = logging.getLogger("servo.serving")


@dataclass(frozen=True, slots=True)
class PayloadLogConfig:
    root: Path
    #: share of predictions logged (feedback is always logged)
    sample: float = 1.0
    capacity: int = 10_000
    flush_s: float = 2.0
    batch_rows: int = 1_000
    #: labels are fsynced before `store()` completes (off: only to measure its cost)
    fsync: bool = True
    #: one journal write and fsync for every `store()` waiting (off: one each, to measure)
    group_commit: bool = True
    #: how often a running writer replays the journals of writers killed since (0: only
    #: at start); a killed pod's labels then reach the table though no pod starts again
    adopt_s: float = 30.0


class PayloadLog:
    def __init__(self, config: PayloadLogConfig):
        self.config = config
        #: this writer on the folder: its id names its files; its lock says it runs
        self.instance = Instance(config.root)
        try:
            self.instance.hold()
        except OSError as exc:  # taken again before the first write, which fails till then
            log.error("payload log: lock not taken in %s: %s", config.root, exc)
        #: temporary files left by writers killed mid-write, removed before any write here
        self.swept = sweep_staged(config.root, self.instance)
        self._queue: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue(config.capacity)
        self._backlog: list[tuple[str, dict[str, Any]]] = []
        self._sequence = itertools.count()
        self._stop = threading.Event()
        self._flush_now = threading.Event()
        self.dropped_full = 0  # written by the event loop only
        self.dropped_error = 0  # written by the writer thread only
        self.written = 0
        self.write_errors = 0
        self.last_error: str | None = None
        self._thread = threading.Thread(target=self._run, name="servo-payload-log", daemon=True)
        self._thread.start()
        #: labels: journaled (fsync, group commit), then Parquet; recovers a journal left
        #: by a killed process before this returns
        self.labels = FeedbackStore(
            config.root,
            flush_s=config.flush_s,
            batch_rows=config.batch_rows,
            fsync=config.fsync,
            group_commit=config.group_commit,
            name=self._name,
            instance=self.instance,
            adopt_s=config.adopt_s,
        )
        self.instance.sweep_locks()  # after the replay: a dead writer's journal is gone

    def store(self, table: str, records: list[dict[str, Any]]) -> Future[None]:
        """Labels, durably: the future completes once they are on disk (fsynced), or
        fails with the reason (and none of them is kept). `table` must be FEEDBACK."""
        return self.labels.store(table, records)

    def submit(self, table: str, record: dict[str, Any]) -> bool:
        try:
            self._queue.put_nowait((table, record))
        except queue.Full:
            self.dropped_full += 1
            return False
        return True

    def flush(self, timeout_s: float = 10.0) -> None:
        """Ask the writer to write what is queued now, and wait until the queue is empty."""
        self._flush_now.set()
        deadline = time.monotonic() + timeout_s
        while (self._queue.qsize() or self._flush_now.is_set()) and time.monotonic() < deadline:
            time.sleep(0.01)

    def pending(self) -> bool:
        """Whether predictions are queued or waiting for a retry (not yet in files)."""
        return bool(self._queue.qsize() or self._backlog)

    def close(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        self._flush_now.set()
        self._thread.join(timeout_s)
        self.labels.close(timeout_s)
        if not (self._thread.is_alive() or self.labels.running()):
            self.instance.release()  # nothing of ours writes now; else held till exit

    # writer thread

    def _run(self) -> None:
        while True:
            stopping = self._stop.is_set()
            records = self._backlog + self._drain()
            self._backlog = []
            self._write(records)
            if self._queue.empty():
                self._flush_now.clear()
                if stopping:
                    self.dropped_error += len(self._backlog)  # the disk never came back
                    self._backlog = []
                    return

    def _drain(self) -> list[tuple[str, dict[str, Any]]]:
        """Queued records, until `batch_rows`, `flush_s`, or at once on flush/close."""
        deadline = time.monotonic() + self.config.flush_s
        out: list[tuple[str, dict[str, Any]]] = []
        while len(out) < self.config.batch_rows:
            if self._flush_now.is_set() or self._stop.is_set():
                try:
                    out.append(self._queue.get_nowait())
                except queue.Empty:
                    break
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                out.append(self._queue.get(timeout=min(remaining, 0.05)))
            except queue.Empty:
                continue
        return out

    def _write(self, records: list[tuple[str, dict[str, Any]]]) -> None:
        if not records:
            return
        groups: dict[tuple[str, str, str | None, dt.date], list[dict[str, Any]]] = defaultdict(list)
        for table, record in records:
            if table == PREDICTIONS and record["inputs"] and isinstance(record["inputs"][0], tuple):
                # arrays travel by reference; they become bytes here, off the event loop
                record["inputs"] = as_records(record["inputs"])
                record["outputs"] = as_records(record["outputs"])
            day = record["time"].date()
            groups[(table, record["model"], record["version"], day)].append(record)
        failed: list[tuple[str, dict[str, Any]]] = []
        for (table, model, version, day), rows in groups.items():
            folder = partition_dir(self.config.root, table, model, version, day)
            try:
                self.instance.hold()
                self._write_file(folder, table, rows)
                self.written += len(rows)
            except (OSError, pa.ArrowException) as exc:
                self.write_errors += 1
                self.last_error = f"{folder}: {exc}"
                log.error("payload log write failed (will retry): %s", self.last_error)
                failed.extend((table, row) for row in rows)
        overflow = len(failed) - self.config.capacity
        if overflow > 0:
            self.dropped_error += overflow
            failed = failed[overflow:]
        self._backlog = failed
        if failed:
            time.sleep(min(self.config.flush_s, 1.0))  # do not spin on a broken disk

    def _write_file(self, folder: Path, table: str, rows: list[dict[str, Any]]) -> None:
        write_part(folder, self._name(), pa.Table.from_pylist(rows, schema=SCHEMAS[table]))

    def _name(self) -> str:
        return f"part-{time.time_ns()}-{next(self._sequence)}.{self.instance.id}"


def sweep_staged(root: Path, me: Instance | None = None) -> int:
    """Remove the temporary files (".<name>.tmp", names carrying their writer) that
    writers no longer running left in the tables' date folders; a live writer sharing the
    folder keeps its own. Returns how many were removed."""
    removed = 0
    for table in SCHEMAS:
        for folder in Path(root, table).glob("model=*/version=*/date=*"):
            try:
                names = [e.name for e in os.scandir(folder) if e.name.endswith(".tmp")]
            except OSError:
                continue
            for name in names:  # ".part-<ns>-<n>.<instance>.parquet.tmp" and its index's
                if name[0] != "." or writer_alive(root, name, me) is not False:
                    continue  # running, or not one of ours
                with contextlib.suppress(FileNotFoundError):
                    (folder / name).unlink()
                    removed += 1
    if removed:
        log.info("payload log: %d temporary file(s) of stopped writers removed", removed)
    return removed
