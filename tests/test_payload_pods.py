"""Payload logs of many pods on one shared folder (issue 12): every writer's files carry
its instance, a writer touches only its own, another's leftovers only once its lock
shows it dead (never by pid: pods' servers are all pid 1), and readers read them all."""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pytest

from monitors.payload_log import (
    FEEDBACK,
    FEEDBACK_SCHEMA,
    PREDICTIONS,
    SCHEMAS,
    StagedPart,
    partition_dir,
    read_window,
    write_part,
)
from retrain.labelled import read_labelled
from serving.instance import WRITERS_DIR, Instance, alive, lock_path, new_instance_id, owner_of
from serving.payload_log import PayloadLog, PayloadLogConfig
from servo.demo import digits_holdout
from tests.crash import wait_for
from tests.servers import RunningServer, start_server
from tests.test_feedback_integrity import feedback, predict

ROOT = Path(__file__).resolve().parents[1]
T0 = dt.datetime(2026, 12, 1, 12, tzinfo=dt.UTC)


def prediction(ident: str) -> dict[str, Any]:
    return {"id": ident, "time": T0, "model": "m", "version": "1", "variant": "champion",
            "inputs": [("input", "FP32", np.full((1, 4), 0.5, dtype=np.float32))],
            "outputs": [("label", "INT64", np.array([3]))], "latency_s": 0.001}  # fmt: skip


def label(ident: str) -> dict[str, Any]:
    return {"id": ident, "time": T0, "model": "m", "version": "1", "label": "3",
            "outcome": "correct"}  # fmt: skip


class StalledWriter(PayloadLog):
    """The real writer, stopped between staging a file (its temporary files on disk)
    and publishing it, as a writer is while a slow disk writes."""

    def __init__(self, config: PayloadLogConfig) -> None:
        self.staged = threading.Event()
        self.release = threading.Event()
        super().__init__(config)

    def _write_file(self, folder: Path, table: str, rows: list[dict[str, Any]]) -> None:
        rows_table = pa.Table.from_pylist(rows, schema=SCHEMAS[table])
        part = StagedPart(folder, self._name(), rows_table)
        self.staged.set()
        self.release.wait()
        part.publish()


def files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file() and WRITERS_DIR not in p.parts}


def test_two_writers_with_one_pid_keep_to_their_own_files(tmp_path: Path) -> None:
    # two writers in one process: the same host and pid, as two pods' servers (pid 1)
    first = StalledWriter(PayloadLogConfig(tmp_path, flush_s=0.05))
    first.labels.flush_s = 3600.0  # its labels stay in its journal until it closes
    try:
        first.store(FEEDBACK, [label(f"a{i}") for i in range(3)]).result()
        first.submit(PREDICTIONS, prediction("a-p"))
        assert first.staged.wait(30)
        own = files(tmp_path)
        in_flight = {p for p in own if p.name.endswith(".tmp")}
        journals = {p for p in own if p.suffix == ".jsonl"}
        assert len(in_flight) == 2 and len(journals) == 1  # a data file, its index; labels
        assert {owner_of(p.name) for p in own} == {first.instance.id}

        second = PayloadLog(PayloadLogConfig(tmp_path, flush_s=0.05))
        assert second.instance.id != first.instance.id
        assert (second.swept, second.labels.recovered) == (0, 0)  # the first one runs
        second.submit(PREDICTIONS, prediction("b-p"))
        second.store(FEEDBACK, [label(f"b{i}") for i in range(2)]).result()
        second.flush()
        second.close()
        assert own <= files(tmp_path)  # nothing of the first was touched
        ours = {p for p in files(tmp_path) - own}
        assert ours and {owner_of(p.name) for p in ours} == {second.instance.id}
    finally:
        first.release.set()
        first.close()
    ids = Counter(read_window(tmp_path, table=FEEDBACK)["id"].to_pylist())
    assert ids == Counter(["a0", "a1", "a2", "b0", "b1"])  # each once: no replay of a live one
    assert sorted(read_window(tmp_path)["id"].to_pylist()) == ["a-p", "b-p"]
    assert not [p for p in files(tmp_path) if p.suffix in (".tmp", ".jsonl")]
    assert not list((tmp_path / WRITERS_DIR).glob("*.*.*.lock"))  # both let theirs go


WRITER = """
import sys, datetime as dt
from pathlib import Path
from serving.payload_log import PayloadLog, PayloadLogConfig
log = PayloadLog(PayloadLogConfig(Path(sys.argv[1]), flush_s=3600))
at = dt.datetime(2026, 12, 1, 12, tzinfo=dt.UTC)
log.store("feedback", [{"id": f"k{i}", "time": at, "model": "m", "version": "1",
                        "label": "3", "outcome": "correct"} for i in range(5)]).result()
print(log.instance.id, flush=True)
sys.stdin.read()
"""


@contextlib.contextmanager
def writer_process(root: Path) -> Iterator[tuple[str, Path]]:
    """A writer in another process, its labels only in its journal: (its instance, the
    journal) while it runs; killed with SIGKILL at the end."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(root)], env=env,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert writer.stdout is not None
        owner = writer.stdout.readline().strip()
        assert owner and alive(root, owner)
        (journal,) = (root / FEEDBACK / "_journal").iterdir()
        assert owner_of(journal.name) == owner
        yield owner, journal
    finally:
        writer.kill()
        writer.wait(timeout=20)
        for stream in (writer.stdin, writer.stdout):
            if stream is not None:
                stream.close()
    assert not alive(root, owner) and lock_path(root, owner).exists()


@pytest.mark.timeout(120)
def test_a_killed_writers_journal_is_replayed_once_and_a_live_ones_never(
    tmp_path: Path,
) -> None:
    with writer_process(tmp_path) as (owner, journal):
        live = PayloadLog(PayloadLogConfig(tmp_path))  # another process's journal: its own
        live.close()
        assert live.labels.recovered == 0 and journal.exists()
        assert read_window(tmp_path, table=FEEDBACK).num_rows == 0

    # three writers start on the folder at once (pods rolling): one replays it, once
    opened: list[PayloadLog] = []
    start = threading.Barrier(3)

    def open_log() -> None:
        start.wait()
        opened.append(PayloadLog(PayloadLogConfig(tmp_path)))

    threads = [threading.Thread(target=open_log) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(opened) == 3
    for log in opened:
        log.close()
    assert sorted(log.labels.recovered for log in opened) == [0, 0, 5]
    stored = read_window(tmp_path, table=FEEDBACK)["id"].to_pylist()
    assert sorted(stored) == [f"k{i}" for i in range(5)]  # each once
    assert not journal.exists() and not lock_path(tmp_path, owner).exists()


@pytest.mark.timeout(120)
def test_a_running_writer_replays_the_journal_of_one_killed_since(tmp_path: Path) -> None:
    running = PayloadLog(PayloadLogConfig(tmp_path, adopt_s=0.05))
    try:
        with writer_process(tmp_path) as (_, journal):
            time.sleep(0.5)  # some ten rounds of looking: a live writer's journal stays
            assert running.labels.recovered == 0 and journal.exists()
        # killed, and no writer starts after it: the running one replays its journal
        wait_for(lambda: not journal.exists(), 30, 0.01)
    finally:
        running.close()
    assert running.labels.recovered == 5
    stored = read_window(tmp_path, table=FEEDBACK)["id"].to_pylist()
    assert sorted(stored) == [f"k{i}" for i in range(5)]


def test_an_instance_names_its_host_pid_and_start() -> None:
    ids = {new_instance_id("servo-gateway-7d9f.ns.svc") for _ in range(2)}
    assert len(ids) == 2  # the same host and pid, two starts: two instances
    for ident in ids:
        host, pid, token = ident.split(".")
        assert (host, pid, len(token)) == ("servo-gateway-7d9f-ns-svc", str(os.getpid()), 16)
        assert owner_of(f"part-1-0.{ident}.parquet") == ident
        assert owner_of(f"._part-1-0.{ident}.ids.tmp") == ident
        assert owner_of(f"labels-1.{ident}.jsonl") == ident
    assert owner_of("part-1-7-0.parquet") is None and owner_of("journal-7-1.jsonl") is None


def test_a_lock_file_removed_before_it_was_locked_is_made_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sweeper removes a lock file it can lock: one removed between the writer's
    create and lock is created again, so a running writer's lock file always exists."""
    writer, sweeper = Instance(tmp_path), Instance(tmp_path)
    path, removed = lock_path(tmp_path, writer.id), []
    real_flock = fcntl.flock

    def flock(fd: int, operation: int) -> None:
        if operation == fcntl.LOCK_EX and not removed:  # the writer, created, not locked
            removed.append(sweeper.sweep_locks())
        real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", flock)
    writer.hold()
    try:
        assert removed == [1]  # the sweeper took it for a dead writer's file
        assert path.exists() and sweeper.sweep_locks() == 0 and path.exists()
        assert alive(tmp_path, writer.id) and not alive(tmp_path, sweeper.id)
    finally:
        writer.release()
    assert not path.exists() and not alive(tmp_path, writer.id)


def test_a_replay_adds_only_the_labels_missing_from_the_table(tmp_path: Path) -> None:
    dead = "pod-a.1.0123456789abcdef"  # a pod's pid 1, killed: no lock file holds it
    folder = partition_dir(tmp_path, FEEDBACK, "m", "1", T0.date())
    folder.mkdir(parents=True)
    rows = [label(f"k{i}") for i in range(4)]
    # k0: it wrote it to the table, then died before its journal went; k1: a replay of
    # its journal was cut short after its file; k2: another pod's own label for that id
    for name, row in (
        (f"part-1-0.{dead}", rows[0]),
        ("part-2-0.pod-b.1.fedcba9876543210", rows[1]),
        ("part-3-0.pod-c.1.00000000000000ff", {**rows[2], "label": "5"}),
    ):
        write_part(folder, name, pa.Table.from_pylist([row], schema=FEEDBACK_SCHEMA))
    journal = tmp_path / FEEDBACK / "_journal" / f"labels-1.{dead}.jsonl"
    journal.parent.mkdir(parents=True)
    lines = [orjson.dumps({**row, "time": T0.isoformat()}) for row in rows]
    journal.write_bytes(b"\n".join(lines) + b"\n")
    log = PayloadLog(PayloadLogConfig(tmp_path))
    log.close()
    assert log.labels.recovered == 2 and not journal.exists()
    stored = read_window(tmp_path, table=FEEDBACK).to_pylist()
    assert sorted((r["id"], r["label"]) for r in stored) == [
        ("k0", "3"), ("k1", "3"), ("k2", "3"), ("k2", "5"), ("k3", "3")
    ]  # fmt: skip


def test_files_named_before_instances_are_judged_by_their_pid_on_this_host(
    tmp_path: Path,
) -> None:
    folder = partition_dir(tmp_path, PREDICTIONS, "m", "1", T0.date())
    folder.mkdir(parents=True)
    gone = folder / ".part-1-999999999-0.parquet.tmp"  # no such pid
    running = folder / f"._part-1-{os.getppid()}-0.ids.tmp"  # our parent: it runs
    foreign = folder / ".notes.tmp"
    for path in (gone, running, foreign):
        path.write_bytes(b"half")
    log = PayloadLog(PayloadLogConfig(tmp_path))
    log.close()
    assert log.swept == 1 and not gone.exists() and running.exists() and foreign.exists()


def start_pods(folder: Path, tmp_path: Path, env: dict[str, str]) -> list[RunningServer]:
    """Two gateway processes on one payload-log folder, started together."""
    with ThreadPoolExecutor(2) as pool:
        starts = [
            pool.submit(start_server, [folder], tmp_path / f"{pod}.log", ["digits"], env)
            for pod in "ab"
        ]
    errors = [f.exception() for f in starts if f.exception() is not None]
    pods = [f.result() for f in starts if f.exception() is None]
    if errors:
        for pod in pods:
            pod.stop()
        raise AssertionError(f"a pod did not start: {errors}")
    return pods


def test_a_label_sent_to_another_pod_joins_the_prediction_it_logged(
    model_root: Path, tmp_path: Path
) -> None:
    env = {"SERVO_PAYLOAD_LOG_DIR": str(tmp_path / "log"), "SERVO_PAYLOAD_LOG_FLUSH_S": "0.1"}
    pod_a, pod_b = start_pods(model_root / "digits" / "1", tmp_path, env)
    try:
        x, y = digits_holdout()
        answer = predict(pod_a, x[:1])
        ident, predicted = answer["id"], answer["outputs"][0]["data"][0]
        wait_for(lambda: ident in read_window(tmp_path / "log")["id"].to_pylist(), 30, 0.05)
        reply = feedback(pod_b, {"id": ident, "label": int(y[0])}).json()
        assert (reply["accepted"], reply["unmatched"], reply["stored"]) == (1, 0, True)
    finally:
        codes = (pod_b.stop(), pod_a.stop())
    assert codes == (0, 0), pod_a.log() + pod_b.log()
    (row,) = read_window(tmp_path / "log", table=FEEDBACK).to_pylist()
    assert (row["id"], row["version"]) == (ident, "1")  # joined: the version that answered
    assert row["outcome"] == ("correct" if int(predicted) == int(y[0]) else "incorrect")
    owners = {owner_of(p.name) for p in (tmp_path / "log").rglob("part-*.parquet")}
    assert len(owners) == 2  # the prediction in pod A's file, the label in pod B's
    labelled = read_labelled(tmp_path / "log", "digits", "input", classes=10)
    assert labelled.ids.tolist() == [ident] and labelled.y.tolist() == [int(y[0])]
    assert np.array_equal(labelled.x, x[:1].astype(np.float32))
