"""What `PayloadLog.submit()` costs the request path (a script, not a timed test;
tests/test_payload_log.py shows that submits never wait for a writer held on an event).

Side by side, per call, medians of `--repeat` rounds of `--calls` submits:

  queue.put_nowait  a bare bounded queue, the limit
  submit, writing   the real log, its writer thread draining into Parquet files
  submit, held      the writer held inside its file write (a stalled disk): the queue
                    fills, then every submit is a counted drop

    python benchmarks/payload_log_submit.py [--calls 2000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import datetime as dt
import queue
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from monitors.payload_log import PREDICTIONS
from serving.payload_log import PayloadLog, PayloadLogConfig


class HeldWriter(PayloadLog):
    def __init__(self, config: PayloadLogConfig) -> None:
        self.release = threading.Event()
        super().__init__(config)

    def _write_file(self, folder: Path, table: str, rows: list[dict[str, Any]]) -> None:
        self.release.wait()
        super()._write_file(folder, table, rows)


def record(i: int) -> dict[str, Any]:
    return {
        "id": f"r{i}",
        "time": dt.datetime.now(dt.UTC),
        "model": "m",
        "version": "1",
        "variant": "champion",
        "inputs": [("input", "FP32", np.zeros((1, 64), np.float32))],
        "outputs": [("label", "INT64", np.array([i]))],
    }


def per_call_us(submit: Any, records: list[dict[str, Any]]) -> float:
    started = time.perf_counter()
    for r in records:
        submit(PREDICTIONS, r)
    return (time.perf_counter() - started) / len(records) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    records = [record(i) for i in range(args.calls)]
    results: dict[str, list[float]] = {"queue.put_nowait": [], "submit, writing": [],
                                       "submit, held": []}  # fmt: skip
    dropped = 0
    with tempfile.TemporaryDirectory(prefix="servo-payload-bench-") as tmp:
        for round_ in range(args.repeat):
            bare: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue(10_000)
            put = bare.put_nowait
            results["queue.put_nowait"].append(
                per_call_us(lambda t, r, put=put: put((t, r)), records)
            )
            log = PayloadLog(PayloadLogConfig(Path(tmp) / f"w{round_}", flush_s=0.05))
            results["submit, writing"].append(per_call_us(log.submit, records))
            log.close()
            held = HeldWriter(
                PayloadLogConfig(Path(tmp) / f"h{round_}", capacity=100, flush_s=0.05)
            )
            results["submit, held"].append(per_call_us(held.submit, records))
            dropped = held.dropped_full
            held.release.set()
            held.close()
    limit = statistics.median(results["queue.put_nowait"])
    print("| path | us per call | x queue.put_nowait |")
    print("|---|---:|---:|")
    for name, values in results.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.2f} | {median / limit:.1f}x |")
    print(f"\nheld writer: {dropped} of {args.calls} submits dropped and counted (capacity 100)")


if __name__ == "__main__":
    main()
