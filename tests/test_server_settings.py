"""README claims about settings, each on a running server: `SERVO_BATCHING` (on, off,
auto), `SERVO_PAYLOAD_LOG_SAMPLE`, and duplicate labels refused across a restart."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import orjson
import pytest
from scipy.stats import binom

from monitors.payload_log import FEEDBACK, PREDICTIONS, read_window
from servo.demo import digits_holdout
from tests.servers import RunningServer, start_server
from tests.test_feedback import feedback, predict
from tests.test_routing import metric

REQUESTS = 64


async def concurrent_requests(server: RunningServer, n: int) -> None:
    rows, _ = digits_holdout()
    limits = httpx.Limits(max_connections=32, max_keepalive_connections=32)
    async with httpx.AsyncClient(base_url=server.url, timeout=30, limits=limits) as client:

        async def one(i: int) -> None:
            doc = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64],
                               "data": rows[i].tolist()}]}  # fmt: skip
            reply = await client.post("/v2/models/digits/infer", content=orjson.dumps(doc))
            assert reply.status_code == 200, reply.text

        await asyncio.gather(*(one(i) for i in range(n)))


@pytest.mark.parametrize(
    ("env", "batched"),
    [
        ({"SERVO_BATCHING": "on"}, True),
        ({"SERVO_BATCHING": "off"}, False),
        # auto: batched when the model runs off the event loop (forced here: every warm-up
        # call is slower than 0 us; the inline side is tests/test_batching.py's)
        ({"SERVO_BATCHING": "auto", "SERVO_INLINE_MAX_US": "0"}, True),
    ],
    ids=["on", "off", "auto-worker-thread"],
)
def test_servo_batching_on_a_running_server(
    model_root: Path, tmp_path: Path, env: dict[str, str], batched: bool
) -> None:
    server = start_server(
        [model_root / "digits" / "1"],
        tmp_path / "server.log",
        wait_for=["digits"],
        env={**env, "SERVO_BATCH_MAX_DELAY_US": "50000", "SERVO_BATCH_MAX_ROWS": "32"},
    )
    try:
        asyncio.run(concurrent_requests(server, REQUESTS))
        labels = {"model": "digits", "version": "1"}
        queued = metric(server, "servo_queue_duration_seconds_count", **labels)
        calls = metric(server, "servo_batch_rows_count", **labels)
        assert metric(server, "servo_batch_rows_sum", **labels) == REQUESTS
        assert metric(server, "servo_requests_total", model="digits", code="200") == REQUESTS
        if batched:  # every request queued in the batcher, merged into fewer calls
            assert queued == REQUESTS and calls < REQUESTS, (queued, calls)
        else:  # none queued, one ONNX Runtime call per request
            assert (queued, calls) == (0, REQUESTS)
    finally:
        assert server.stop() == 0, server.log()


@pytest.mark.parametrize("share", [0.5, 0.0])
def test_payload_log_sample(model_root: Path, tmp_path: Path, share: float) -> None:
    n = 200
    server = start_server(
        [model_root / "digits" / "1"],
        tmp_path / "server.log",
        wait_for=["digits"],
        env={"SERVO_PAYLOAD_LOG_DIR": str(tmp_path / "log"),
             "SERVO_PAYLOAD_LOG_SAMPLE": str(share)},
    )  # fmt: skip
    try:
        rows, labels = digits_holdout()
        with httpx.Client(base_url=server.url, timeout=30) as client:
            for i in range(n):
                tensor = {"name": "input", "datatype": "FP32", "shape": [1, 64],
                          "data": rows[i].tolist()}  # fmt: skip
                doc = {"id": f"s-{i}", "inputs": [tensor]}
                assert client.post("/v2/models/digits/infer", json=doc).status_code == 200
        # labels are logged whatever the share
        reply = feedback(server, [{"id": f"s-{i}", "label": int(labels[i])} for i in range(10)])
        assert reply.status_code == 200 and reply.json()["accepted"] == 10, reply.text
    finally:
        assert server.stop() == 0, server.log()  # a clean stop writes what is queued
    logged = read_window(tmp_path / "log", table=PREDICTIONS).num_rows
    if share == 0:
        assert logged == 0
    else:  # Binomial(200, 0.5): outside this interval once in a million runs
        low, high = binom.interval(1 - 1e-6, n, share)
        assert low <= logged <= high and logged < n, logged
    assert read_window(tmp_path / "log", table=FEEDBACK).num_rows == 10


def test_duplicate_labels_are_refused_across_a_restart(model_root: Path, tmp_path: Path) -> None:
    env = {"SERVO_PAYLOAD_LOG_DIR": str(tmp_path / "log")}
    rows, labels = digits_holdout()
    body = [{"id": f"r-{i}", "label": int(labels[i])} for i in range(5)]
    first = start_server([model_root / "digits" / "1"], tmp_path / "first.log", ["digits"], env)
    try:
        for i in range(5):
            predict(first, rows[i : i + 1], f"r-{i}")
        reply = feedback(first, body).json()
        assert (reply["accepted"], reply["duplicates"]) == (5, 0), reply
    finally:
        assert first.stop() == 0, first.log()  # a clean stop
    assert read_window(tmp_path / "log", table=FEEDBACK).num_rows == 5
    second = start_server([model_root / "digits" / "1"], tmp_path / "second.log", ["digits"], env)
    try:
        again = feedback(second, body).json()
        assert (again["accepted"], again["duplicates"]) == (0, 5), again
        # a second, different label for the same ids is refused too
        other = [{"id": f"r-{i}", "label": (int(labels[i]) + 1) % 10} for i in range(5)]
        conflicting = feedback(second, other).json()
        assert (conflicting["accepted"], conflicting["duplicates"]) == (0, 5), conflicting
        assert metric(second, "servo_feedback_total", model="digits") == 0
        # and a new prediction is labelled as usual
        predict(second, rows[9:10], "r-new")
        fresh = feedback(second, {"id": "r-new", "label": int(labels[9])}).json()
        assert (fresh["accepted"], fresh["duplicates"]) == (1, 0), fresh
    finally:
        assert second.stop() == 0, second.log()
    stored = read_window(tmp_path / "log", table=FEEDBACK).to_pylist()
    assert sorted(r["id"] for r in stored) == sorted([*(f"r-{i}" for i in range(5)), "r-new"])
