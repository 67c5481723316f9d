"""The payload log writer and reader: every datatype round-trips, a full queue drops and
counts without blocking, an unwritable folder loses nothing once it comes back."""

from __future__ import annotations

import datetime as dt
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from monitors.payload_log import FEEDBACK, PREDICTIONS, read_window, tensor_array
from serving.payload_log import PayloadLog, PayloadLogConfig
from tests.models import ONNX_TYPES
from tests.test_protocol import sample

T0 = dt.datetime(2026, 11, 29, 12, 0, tzinfo=dt.UTC)


def record(i: int, arrays: dict[str, tuple[str, np.ndarray]] | None = None,
           when: dt.datetime | None = None, version: str = "1") -> dict[str, Any]:  # fmt: skip
    arrays = arrays or {"x": ("FP32", np.full((1, 3), i, dtype=np.float32))}
    return {
        "id": f"r{i}",
        "time": when or T0 + dt.timedelta(seconds=i),
        "model": "m",
        "version": version,
        "variant": "champion",
        "inputs": [(n, d, a) for n, (d, a) in arrays.items()],
        "outputs": [("y", "INT64", np.array([i]))],
    }


def test_every_datatype_round_trips(tmp_path: Path) -> None:
    log = PayloadLog(PayloadLogConfig(tmp_path, flush_s=0.05))
    arrays = {f"x_{d.lower()}": (d, sample(d, 2)) for d in ONNX_TYPES}
    assert log.submit(PREDICTIONS, record(1, arrays))
    log.close()
    table = read_window(tmp_path)
    assert table.num_rows == 1
    row = table.to_pylist()[0]
    assert (row["id"], row["model"], row["version"], row["variant"]) == ("r1", "m", "1", "champion")
    for tensor in row["inputs"]:
        datatype, want = arrays[tensor["name"]]
        assert tensor["datatype"] == datatype and tensor["shape"] == [2, 3]
        np.testing.assert_array_equal(tensor_array(tensor), want)
    files = list(tmp_path.rglob("*.parquet"))
    assert len(files) == 1
    assert files[0].parent.relative_to(tmp_path).as_posix() == (
        "predictions/model=m/version=1/date=2026-11-29"
    )


def test_time_window_and_filters(tmp_path: Path) -> None:
    log = PayloadLog(PayloadLogConfig(tmp_path, flush_s=0.05))
    for i in range(10):
        log.submit(PREDICTIONS, record(i, version="1" if i % 2 else "2"))
    log.close()
    window = read_window(
        tmp_path, start=T0 + dt.timedelta(seconds=3), end=T0 + dt.timedelta(seconds=7)
    )
    assert sorted(window["id"].to_pylist()) == ["r3", "r4", "r5", "r6"]
    assert sorted(read_window(tmp_path, version="2")["id"].to_pylist()) == [
        "r0",
        "r2",
        "r4",
        "r6",
        "r8",
    ]
    assert read_window(tmp_path, table=FEEDBACK).num_rows == 0
    (
        tmp_path / "predictions" / "model=m" / "version=1" / "date=2026-11-29" / ".part-x.tmp"
    ).write_bytes(b"half")
    assert read_window(tmp_path).num_rows == 10  # a half-written temp file is never read


class HeldWriter(PayloadLog):
    """The real writer, held on an event inside its file write (as a stalled disk holds it)."""

    def __init__(self, config: PayloadLogConfig) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        super().__init__(config)

    def _write_file(self, folder: Path, table: str, rows: list[dict[str, Any]]) -> None:
        self.entered.set()
        self.release.wait()
        super()._write_file(folder, table, rows)


def test_the_request_path_never_waits_for_a_blocked_writer(tmp_path: Path) -> None:
    log = HeldWriter(PayloadLogConfig(tmp_path, capacity=5, flush_s=0.05, batch_rows=5))
    try:
        assert log.submit(PREDICTIONS, record(0))
        assert log.entered.wait(10)  # the writer took record 0 and is stuck writing it
        results: list[bool] = []
        submitter = threading.Thread(
            target=lambda: results.extend(log.submit(PREDICTIONS, record(i)) for i in range(1, 201))
        )
        submitter.start()
        submitter.join(30)  # a hang guard, not a timer: with a waiting submit this never ends
        # all 200 submits returned while the writer is still held: the queue took 5, the
        # other 195 were dropped and counted, none waited
        assert not submitter.is_alive() and not log.release.is_set()
        assert results == [True] * 5 + [False] * 195
        assert log.dropped_full == 195 and log.written == 0
    finally:
        log.release.set()
        log.close()
    assert sorted(read_window(tmp_path)["id"].to_pylist()) == sorted(f"r{i}" for i in range(6))
    assert log.written == 6 and log.dropped_error == 0


def test_full_queue_drops_and_counts_when_the_folder_is_unwritable(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the log folder should be")
    log = PayloadLog(PayloadLogConfig(blocker / "log", capacity=5, flush_s=0.05, batch_rows=5))
    results = [log.submit(PREDICTIONS, record(i)) for i in range(200)]
    assert results.count(False) == log.dropped_full > 0
    assert results.count(True) == 200 - log.dropped_full
    log.close(timeout_s=5)
    assert log.write_errors > 0 and "not-a-dir" in (log.last_error or "")


def test_an_unwritable_folder_loses_nothing_once_it_is_back(tmp_path: Path) -> None:
    root = tmp_path / "log"
    log = PayloadLog(PayloadLogConfig(root, flush_s=0.05))
    log.submit(PREDICTIONS, record(0))
    log.flush()
    assert read_window(root).num_rows == 1
    moved = tmp_path / "moved"
    root.rename(moved)
    root.write_text("the folder is gone; a file is in its way")
    for i in range(1, 6):
        log.submit(PREDICTIONS, record(i))
    deadline = time.monotonic() + 10
    while log.write_errors == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert log.write_errors > 0
    root.unlink()
    moved.rename(root)
    log.close()
    assert sorted(read_window(root)["id"].to_pylist()) == [f"r{i}" for i in range(6)]
    assert log.dropped_error == 0 and log.dropped_full == 0


@pytest.mark.parametrize("flush_s", [60.0])
def test_close_flushes(tmp_path: Path, flush_s: float) -> None:
    log = PayloadLog(PayloadLogConfig(tmp_path, flush_s=flush_s))
    for i in range(3):
        log.submit(PREDICTIONS, record(i))
    log.close()
    assert read_window(tmp_path).num_rows == 3
