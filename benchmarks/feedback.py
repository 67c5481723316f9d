"""Feedback costs (issue 9, points 15-17): a script, not a timed test.

Builds a payload log of `--rows` predictions (default 1,000,000) and half as many labels
in the real format (`monitors.payload_log.write_part`: Parquet files of `--per-file` rows,
the gateway's default batch, each with its id index), generated in bulk with Arrow, then
measures, side by side:

  late label    what a label older than the memory index costs: the duplicate check in
                the feedback table and the prediction join (`serving.feedback`), through
                the id index; first call (reads every id index once) and the median after.
                Floor: a plain read of one data file. Goal: under 50 ms.
  full scan     (--full-scan) the join as it was: read the whole table, filter by id
  duplicates    the in-request duplicate check for 10,000 labels (O(n)), and a whole
                10,000-label request through `FeedbackService.submit` (no log), vs the
                old pairwise check
  durability    labels/s from `--clients` concurrent writers, one label per request:
                journal + fsync with group commit (the default), fsync per request without
                grouping, and no fsync (the floor)
  ids           the cost of one server-issued id (keyed BLAKE2b) vs the old prefix-counter

    python benchmarks/feedback.py [--rows 1000000] [--repeat 50] [--seconds 2] [--json F]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import itertools
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from monitors.payload_log import (
    FEEDBACK,
    FEEDBACK_SCHEMA,
    PREDICTION_SCHEMA,
    PREDICTIONS,
    TENSOR,
    model_parts,
    partition_dir,
    read_window,
    write_part,
)
from serving.feedback import FeedbackService, lookup_logged
from serving.ids import RequestIds
from serving.labels import Label
from serving.log_index import LogIndex
from serving.payload_log import PayloadLog, PayloadLogConfig
from serving.recorder import Recorder
from serving.repository import ModelRepository
from serving.router import Router
from servo.demo import digits_holdout, export_digits

MODEL = "digits"
DAY = dt.datetime(2026, 11, 29, tzinfo=dt.UTC)
GOAL_MS = 50.0


def _tensors(name: str, datatype: str, shape: list[int], data: bytes, n: int) -> pa.Array:
    """n one-tensor lists (every row the same shape) from one buffer of n equal parts."""
    size = len(data) // n
    binary = pa.Array.from_buffers(
        pa.binary(), n, [None, pa.py_buffer(np.arange(n + 1, dtype=np.int32) * size),
                         pa.py_buffer(data)],
    )  # fmt: skip
    shapes = pa.ListArray.from_arrays(
        pa.array(np.arange(n + 1, dtype=np.int32) * len(shape)),
        pa.array(np.tile(np.asarray(shape, dtype=np.int64), n)),
    )
    struct = pa.StructArray.from_arrays(
        [pa.array([name] * n), pa.array([datatype] * n), shapes, binary], fields=list(TENSOR)
    )
    return pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32)), struct)


def build_log(root: Path, rows: int, per_file: int) -> list[str]:
    """`rows` predictions over one day and a label for every other one; the ids."""
    x, _ = digits_holdout()
    make = RequestIds()
    ids = [make.next() for _ in range(rows)]
    rng = np.random.default_rng(0)
    seconds = np.sort(rng.uniform(0, 86_400, rows))
    times = pa.array(((DAY.timestamp() + seconds) * 1e6).astype(np.int64)).cast(
        pa.timestamp("us", tz="UTC")
    )
    predictions = partition_dir(root, PREDICTIONS, MODEL, "1", DAY.date())
    for n_file, start in enumerate(range(0, rows, per_file)):
        n = min(per_file, rows - start)
        picked = x[np.arange(start, start + n) % len(x)].astype("<f4")
        classes = (np.arange(start, start + n) % 10).astype("<i8")
        table = pa.Table.from_arrays(
            [pa.array(ids[start : start + n]), times[start : start + n],
             pa.array([MODEL] * n), pa.array(["1"] * n), pa.array(["champion"] * n),
             _tensors("input", "FP32", [1, 64], picked.tobytes(), n),
             _tensors("label", "INT64", [1], classes.tobytes(), n)],
            schema=PREDICTION_SCHEMA,
        )  # fmt: skip
        write_part(predictions, f"part-{n_file:07d}-0-0", table)
    labels = partition_dir(root, FEEDBACK, MODEL, "1", DAY.date())
    labelled = ids[::2]
    for n_file, start in enumerate(range(0, len(labelled), per_file)):
        chunk = labelled[start : start + per_file]
        n = len(chunk)
        table = pa.Table.from_arrays(
            [pa.array(chunk), times[: 2 * n : 2], pa.array([MODEL] * n), pa.array(["1"] * n),
             pa.array([str(i % 10) for i in range(n)]), pa.array(["correct"] * n)],
            schema=FEEDBACK_SCHEMA,
        )  # fmt: skip
        write_part(labels, f"part-{n_file:07d}-0-0", table)
    return ids


def median_ms(fn: Callable[[], Any], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def late_label(root: Path, ids: list[str], repeat: int, full_scan: bool) -> dict[str, float]:
    predictions, labels = LogIndex(root, PREDICTIONS), LogIndex(root, FEEDBACK)
    outputs: dict[str, str | None] = {"1": "label"}
    rng = random.Random(1)

    def one(ident: str) -> None:
        # an unlabelled id: the duplicate check finds nothing, the join finds its row
        assert not labels.has(MODEL, [ident])
        found = lookup_logged(predictions, MODEL, [ident], outputs)
        assert found[ident].version == "1"

    odd = ids[1::2]
    started = time.perf_counter()
    one(rng.choice(odd))
    first = (time.perf_counter() - started) * 1000
    warm = median_ms(lambda: one(rng.choice(odd)), repeat)
    part = next(model_parts(root, PREDICTIONS, MODEL))
    floor = median_ms(lambda: pq.read_table(part), repeat)
    out = {"late_label_first_ms": first, "late_label_ms": warm, "one_file_read_ms": floor,
           "files_read": float(predictions.files_read + labels.files_read)}  # fmt: skip
    if full_scan:
        ident = rng.choice(odd)

        def scan() -> None:
            table = read_window(root, table=PREDICTIONS, model=MODEL)
            assert ident in set(table["id"].to_pylist())

        out["full_scan_ms"] = median_ms(scan, 1)
    return out


def duplicates(folder: Path, repeat: int) -> dict[str, float]:
    repository = ModelRepository()
    try:
        export_digits(folder / MODEL / "1")
        entry = repository.load_folder(folder / MODEL / "1")
        assert entry.model is not None, entry.error
        service = FeedbackService(repository=repository, router=Router(), recorder=Recorder(),
                                  payload_log=None)  # fmt: skip
        batch = [Label(f"d-{i}", [i % 10], i) for i in range(10_000)]
        result: dict[str, Any] = {}
        check = median_ms(lambda: service._fresh(batch, {"duplicates": 0}), repeat)

        def request() -> None:
            service.index = type(service.index)(service.index.capacity)
            result.update(asyncio.run(service.submit(MODEL, list(batch))))

        whole = median_ms(request, max(3, repeat // 10))
        assert result["unmatched"] == 10_000

        def pairwise() -> None:  # the check as it was: each label against those kept
            kept: list[Label] = []
            for label in batch:
                if not any(label.id == k.id for k in kept):
                    kept.append(label)

        old = median_ms(pairwise, 1)
    finally:
        repository.close()
    return {"duplicate_check_10k_ms": check, "request_10k_ms": whole,
            "old_pairwise_check_10k_ms": old}  # fmt: skip


def _load(log: PayloadLog, seconds: float, clients: int) -> tuple[list[int], float]:
    """`clients` threads storing one label a request for `seconds`."""
    counter = itertools.count()
    stop = time.monotonic() + seconds
    done = [0] * clients

    def client(k: int) -> None:
        while time.monotonic() < stop:
            record = {"id": f"l-{next(counter)}", "time": dt.datetime.now(dt.UTC),
                      "model": MODEL, "version": "1", "label": "3",
                      "outcome": "correct"}  # fmt: skip
            log.store(FEEDBACK, [record]).result()
            done[k] += 1

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return done, time.perf_counter() - started


def durability(folder: Path, seconds: float, clients: int) -> dict[str, float]:
    out: dict[str, float] = {}
    for mode, fsync, group in (("group_fsync", True, True), ("fsync_each", True, False),
                               ("no_fsync", False, True)):  # fmt: skip
        root = folder / mode
        log = PayloadLog(PayloadLogConfig(root, flush_s=0.5, fsync=fsync, group_commit=group))
        done, elapsed = _load(log, seconds, clients)
        log.close()
        total = sum(done)
        out[f"{mode}_labels_per_s"] = total / elapsed
        out[f"{mode}_labels_per_commit"] = total / max(1, log.labels.commits)
        assert read_window(root, table=FEEDBACK).num_rows == total
    return out


def ids() -> dict[str, float]:
    new = RequestIds()
    prefix, counter = os.urandom(6).hex(), itertools.count(1)

    def old() -> str:
        return f"{prefix}-{next(counter):x}"

    n = 200_000
    return {"id_ns": min(timeit.repeat(new.next, number=n, repeat=3)) / n * 1e9,
            "old_id_ns": min(timeit.repeat(old, number=n, repeat=3)) / n * 1e9}  # fmt: skip


def report(r: dict[str, float], args: argparse.Namespace) -> None:
    print(f"payload log: {args.rows:,} predictions + {args.rows // 2:,} labels, "
          f"{args.per_file:,} rows a file, built in {r['build_s']:.1f} s")  # fmt: skip
    verdict = "met" if r["late_label_ms"] < GOAL_MS else "MISSED"
    print(
        f"late label      {r['late_label_ms']:8.2f} ms median, goal < {GOAL_MS:.0f} ms: "
        f"{verdict} (first {r['late_label_first_ms']:.0f} ms: reads every id index)"
    )
    print(f"  floor         {r['one_file_read_ms']:8.2f} ms a plain read of one data file")
    if "full_scan_ms" in r:
        print(f"  full scan     {r['full_scan_ms']:8.0f} ms the join as it was")
    print(f"duplicates 10k  {r['duplicate_check_10k_ms']:8.2f} ms the check; "
          f"{r['request_10k_ms']:.0f} ms the whole request (validation included)")  # fmt: skip
    print(f"  as it was     {r['old_pairwise_check_10k_ms']:8.0f} ms the pairwise check")
    for mode in ("group_fsync", "fsync_each", "no_fsync"):
        rate, per = r[f"{mode}_labels_per_s"], r[f"{mode}_labels_per_commit"]
        print(f"{mode:<15} {rate:8.0f} labels/s ({per:.1f} a commit, {args.clients} clients)")
    print(f"ids             {r['id_ns']:8.0f} ns an id (prefix-counter: {r['old_id_ns']:.0f} ns)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--per-file", type=int, default=1_000)
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--full-scan", action="store_true", help="also time the old full scan")
    parser.add_argument("--dir", type=Path, help="work folder (default: a temporary one)")
    parser.add_argument("--json", type=Path, help="write the results here too")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="servo-feedback-", dir=args.dir))
    try:
        started = time.perf_counter()
        logged = build_log(work / "log", args.rows, args.per_file)
        built_s = time.perf_counter() - started
        results: dict[str, float] = {"rows": float(args.rows), "build_s": built_s}
        results.update(late_label(work / "log", logged, args.repeat, args.full_scan))
        results.update(duplicates(work / "models", args.repeat))
        results.update(durability(work / "durable", args.seconds, args.clients))
        results.update(ids())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(results, args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
