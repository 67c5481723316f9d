"""Shadow copies: run after the champion answered, on their own threads, bounded.

A shadow never delays or fails the client's request: copies run on a dedicated thread
pool (never on the event loop), at most `max_pending` at a time (more are dropped and
counted), each with a timeout; errors and timeouts are counted, not raised.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from monitors.payload_log import PREDICTIONS
from serving.payload_log import PayloadLog
from serving.recorder import Recorder
from serving.runtime import OnnxModel

log = logging.getLogger("servo.serving")

Arrays = dict[str, npt.NDArray[Any]]


def agree(champion: Arrays, shadow: Arrays, label_output: str | None) -> bool:
    """Same label when the model has a label output; else every common output equal
    (floats within rtol 1e-4)."""
    if label_output is not None and label_output in champion and label_output in shadow:
        return bool(np.array_equal(champion[label_output], shadow[label_output]))
    common = [name for name in champion if name in shadow]
    for name in common:
        a, b = champion[name], shadow[name]
        if a.shape != b.shape:
            return False
        if a.dtype.kind == "f":
            if not np.allclose(a, b, rtol=1e-4, atol=1e-6, equal_nan=True):
                return False
        elif not np.array_equal(a, b):
            return False
    return bool(common)


def _timed_run(shadow: OnnxModel, feeds: Arrays) -> tuple[Arrays, float]:
    """The shadow's outputs and the seconds its run took (on the shadow thread, so the
    wait for a free thread is not counted: the shadow's own latency)."""
    started = time.perf_counter()
    outputs = shadow.run_blocking(feeds)
    return outputs, time.perf_counter() - started


@dataclass(frozen=True, slots=True)
class ShadowCopy:
    model_name: str
    shadow: OnnxModel
    feeds: Arrays
    champion: Arrays
    label_output: str | None
    request_id: str


class ShadowRunner:
    def __init__(self, recorder: Recorder, max_pending: int = 64, timeout_s: float = 5.0,
                 threads: int = 2):  # fmt: skip
        self.recorder = recorder
        self.max_pending = max_pending
        self.timeout_s = timeout_s
        self.pending = 0
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="servo-shadow")
        self._tasks: set[asyncio.Task[None]] = set()
        #: where shadow answers are logged as evidence (variant "shadow"), if anywhere
        self.payload_log: PayloadLog | None = None

    def submit(self, copy: ShadowCopy) -> None:
        model_name, shadow, feeds = copy.model_name, copy.shadow, copy.feeds
        if self.pending >= self.max_pending:
            self.recorder.count(self.recorder.shadow_dropped, (model_name,))
            return
        self.pending += 1
        shadow.inflight += 1
        loop = asyncio.get_running_loop()
        future = self._executor.submit(_timed_run, shadow, feeds)

        def release(_: object) -> None:  # runs on the worker thread
            loop.call_soon_threadsafe(self._release, shadow)

        future.add_done_callback(release)
        task = loop.create_task(self._compare(copy, future))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _release(self, shadow: OnnxModel) -> None:
        self.pending -= 1
        shadow.inflight -= 1

    async def _compare(self, copy: ShadowCopy, future: Any) -> None:
        model_name, shadow = copy.model_name, copy.shadow
        labels = (model_name, shadow.version)
        try:
            outputs, seconds = await asyncio.wait_for(asyncio.wrap_future(future), self.timeout_s)
        except TimeoutError:
            self.recorder.count(self.recorder.shadow_errors, (*labels, "timeout"))
            return
        except Exception as exc:
            log.debug("shadow %s failed: %s", shadow, exc)
            self.recorder.count(self.recorder.shadow_errors, (*labels, "error"))
            return
        same = agree(copy.champion, outputs, copy.label_output)
        self.recorder.count(self.recorder.shadow_agreement, (*labels, "true" if same else "false"))
        if self.payload_log is not None:
            specs = shadow.plan
            self.payload_log.submit(
                PREDICTIONS,
                {
                    "id": copy.request_id,
                    "time": dt.datetime.now(dt.UTC),
                    "model": model_name,
                    "version": shadow.version,
                    "variant": "shadow",
                    "inputs": [(n, specs.inputs[n][0].datatype, a) for n, a in copy.feeds.items()],
                    "outputs": [(n, specs.outputs[n].datatype, a) for n, a in outputs.items()],
                    "latency_s": seconds,
                },
            )

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)
