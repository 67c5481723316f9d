"""Shadow copies: run after the champion answered, on their own threads, bounded.

A shadow never delays or fails the client's request: copies run on a dedicated thread
pool (never on the event loop), at most `max_pending` at a time (more are dropped and
counted), each with a timeout; errors and timeouts are counted, not raised.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import numpy.typing as npt

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


class ShadowRunner:
    def __init__(self, recorder: Recorder, max_pending: int = 64, timeout_s: float = 5.0,
                 threads: int = 2):  # fmt: skip
        self.recorder = recorder
        self.max_pending = max_pending
        self.timeout_s = timeout_s
        self.pending = 0
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="servo-shadow")
        self._tasks: set[asyncio.Task[None]] = set()

    def submit(self, model_name: str, shadow: OnnxModel, feeds: Arrays, champion: Arrays,
               label_output: str | None) -> None:  # fmt: skip
        if self.pending >= self.max_pending:
            self.recorder.count(self.recorder.shadow_dropped, (model_name,))
            return
        self.pending += 1
        shadow.inflight += 1
        loop = asyncio.get_running_loop()
        future = self._executor.submit(shadow.run_blocking, feeds)

        def release(_: object) -> None:  # runs on the worker thread
            loop.call_soon_threadsafe(self._release, shadow)

        future.add_done_callback(release)
        task = loop.create_task(self._compare(model_name, shadow, future, champion, label_output))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _release(self, shadow: OnnxModel) -> None:
        self.pending -= 1
        shadow.inflight -= 1

    async def _compare(self, model_name: str, shadow: OnnxModel, future: Any, champion: Arrays,
                       label_output: str | None) -> None:  # fmt: skip
        labels = (model_name, shadow.version)
        try:
            outputs = await asyncio.wait_for(asyncio.wrap_future(future), self.timeout_s)
        except TimeoutError:
            self.recorder.count(self.recorder.shadow_errors, (*labels, "timeout"))
            return
        except Exception as exc:
            log.debug("shadow %s failed: %s", shadow, exc)
            self.recorder.count(self.recorder.shadow_errors, (*labels, "error"))
            return
        same = agree(champion, outputs, label_output)
        self.recorder.count(self.recorder.shadow_agreement, (*labels, "true" if same else "false"))

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)
