"""Adaptive, row-based batching for one model version.

Concurrent requests are merged along the batch dimension (dimension 0 of every input and
output) up to `max_rows`, then split back. A batch forms from whatever is queued when the
previous ONNX Runtime call returns, plus what arrives within `max_delay_us` of the oldest
queued request (timers are millisecond-grained; below 1000 µs the batcher only yields
once to the event loop to collect requests that are already arriving). A request larger
than `max_rows` runs alone. If a merged call fails, its requests run one by one, so only
the request that caused the failure gets the error.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from serving.errors import InferenceFailed, ServingError

log = logging.getLogger("servo.serving")

Arrays = Mapping[str, npt.NDArray[Any]]
RunFn = Callable[[Arrays, Sequence[str]], list[npt.NDArray[Any]]]


@dataclass(frozen=True, slots=True)
class BatchingConfig:
    #: None: automatic (on for models that run off the event loop); True/False: forced
    enabled: bool | None = None
    max_rows: int = 32
    max_delay_us: float = 500.0


class CallObserver(Protocol):
    def call(self, rows: int, seconds: float) -> None: ...

    def queued(self, seconds: float) -> None: ...


@dataclass(slots=True)
class Queued:
    feeds: Arrays
    rows: int
    key: tuple[Any, ...]
    outputs: Sequence[str]
    future: asyncio.Future[list[npt.NDArray[Any]]]
    enqueued: float


class Batcher:
    def __init__(self, run: RunFn, executor: Executor, config: BatchingConfig,
                 observer: CallObserver | None = None):  # fmt: skip
        self.run = run
        self.executor = executor
        self.config = config
        self.observer = observer
        self._queue: deque[Queued] = deque()
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None

    async def submit(self, feeds: Arrays, outputs: Sequence[str]) -> list[npt.NDArray[Any]]:
        loop = asyncio.get_running_loop()
        first = next(iter(feeds.values()))
        key = (tuple(outputs), *((n, a.shape[1:], a.dtype.str) for n, a in feeds.items()))
        item = Queued(feeds, int(first.shape[0]), key, outputs, loop.create_future(), loop.time())
        self._queue.append(item)
        if self._wakeup is None:
            self._wakeup = asyncio.Event()
        self._wakeup.set()
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._serve())
        return await item.future

    def _queued_rows(self, key: tuple[Any, ...]) -> int:
        return sum(i.rows for i in self._queue if i.key == key and not i.future.done())

    def _take(self, key: tuple[Any, ...]) -> list[Queued]:
        batch: list[Queued] = []
        rows = 0
        rest: deque[Queued] = deque()
        while self._queue:
            item = self._queue.popleft()
            if item.future.done():  # the client went away
                continue
            if item.key == key and (not batch or rows + item.rows <= self.config.max_rows):
                batch.append(item)
                rows += item.rows
            else:
                rest.append(item)
        self._queue = rest
        return batch

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._wakeup is not None
        while self._queue:
            await asyncio.sleep(0)  # let requests that are arriving right now join
            first = next((i for i in self._queue if not i.future.done()), None)
            if first is None:
                self._queue.clear()
                break
            delay = self.config.max_delay_us / 1e6
            if delay >= 0.001:
                deadline = first.enqueued + delay
                while self._queued_rows(first.key) < self.config.max_rows:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    self._wakeup.clear()
                    try:
                        await asyncio.wait_for(self._wakeup.wait(), remaining)
                    except TimeoutError:
                        break
            batch = self._take(first.key)
            if batch:
                await self._dispatch(batch)

    async def _run(self, batch: list[Queued]) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self.observer is not None:
            for item in batch:
                self.observer.queued(now - item.enqueued)
        outputs = batch[0].outputs
        if len(batch) == 1:
            inputs: Arrays = batch[0].feeds
        else:
            inputs = {n: np.concatenate([i.feeds[n] for i in batch]) for n in batch[0].feeds}
        rows = sum(i.rows for i in batch)
        started = time.perf_counter()
        try:
            results = await self._call(inputs, outputs)
        except ServingError as exc:
            if len(batch) == 1 or not self._retry_alone(exc):
                for item in batch:
                    _fail(item, exc)
                return
            log.info("a batch of %d requests failed (%s); running them one by one", len(batch), exc)
            for item in batch:
                await self._run([item])
            return
        if self.observer is not None:
            self.observer.call(rows, time.perf_counter() - started)
        if len(batch) == 1:
            _succeed(batch[0], results)
            return
        if any(r.ndim == 0 or r.shape[0] != rows for r in results):
            error = InferenceFailed(
                "model outputs are not aligned with the batch; turn batching off"
            )
            for item in batch:
                _fail(item, error)
            return
        offsets = np.cumsum([i.rows for i in batch])[:-1]
        parts = [np.split(result, offsets) for result in results]
        for index, item in enumerate(batch):
            _succeed(item, [part[index] for part in parts])

    async def _dispatch(self, batch: list[Queued]) -> None:
        """Run a batch; the next one forms when this returns (a subclass may return
        before the batch has run, to keep several in flight)."""
        await self._run(batch)

    async def _call(self, inputs: Arrays, outputs: Sequence[str]) -> list[npt.NDArray[Any]]:
        """One merged call: `run` on the executor (a subclass may call out instead)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, self.run, inputs, outputs)

    def _retry_alone(self, error: ServingError) -> bool:
        """Whether a failed merged call's requests run again one by one (an error one
        request may have caused), or all get the error (one the batch as a whole met)."""
        return True

    def close(self) -> None:
        if self._task is not None and not self._queue:
            self._task.cancel()


def _succeed(item: Queued, results: list[npt.NDArray[Any]]) -> None:
    if not item.future.done():
        item.future.set_result(results)


def _fail(item: Queued, error: Exception) -> None:
    if not item.future.done():
        item.future.set_exception(error)
