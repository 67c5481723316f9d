"""Big request bodies decoded in a worker process, so that a large request costs its sender,
not every client of the event loop.

A thread would not do: orjson and numpy hold the GIL for the whole of one parse (measured:
0.74 s without a single switch for a 74 MB JSON body), so the event loop would wait just
the same. A worker process costs a copy of the body there and of the arrays back, paid by
the big request; small bodies never come here (the caller compares sizes first).

The worker is started on the first big body (not at start-up), exits when the server
stops, and also on its own when the server process is gone (it watches its parent).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing.context
import os
import signal
import sys
import threading
import time
import types
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

from serving.errors import ServingError

log = logging.getLogger("servo.serving")

T = TypeVar("T")


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)


def _worker_init(parent: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server handles Ctrl-C, then stops us
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()


class _LeanProcess(multiprocessing.context.SpawnProcess):
    """A spawned worker that does not import the server's `__main__` (servo.cli, and with
    it the whole serving stack: 260 MB and seconds measured); unpickling its tasks imports
    just the codecs. Started only from the event loop thread, inside `submit()`."""

    def start(self) -> None:
        main = sys.modules["__main__"]
        sys.modules["__main__"] = types.ModuleType("__main__")  # no spec, no file: not run
        try:
            super().start()
        finally:
            sys.modules["__main__"] = main


class _LeanContext(multiprocessing.context.SpawnContext):
    Process = _LeanProcess


class OffloopDecoder:
    """Runs decode functions (module-level, picklable, raising ServingError on bad input)
    on `workers` worker processes for bodies larger than `threshold_bytes` (0: never)."""

    def __init__(self, threshold_bytes: int, workers: int = 1):
        #: bodies larger than this are decoded in a worker (no body is when 0)
        self.threshold = threshold_bytes if threshold_bytes > 0 else float("inf")
        self.workers = workers
        self._pool: ProcessPoolExecutor | None = None

    def _start(self) -> ProcessPoolExecutor:
        self._pool = ProcessPoolExecutor(
            self.workers,
            mp_context=_LeanContext(),  # spawned: never fork a threaded server
            initializer=_worker_init,
            initargs=(os.getpid(),),
        )
        return self._pool

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        pool = self._pool or self._start()
        try:
            return await asyncio.wrap_future(pool.submit(fn, *args))
        except BrokenProcessPool:
            if self._pool is pool:
                self._pool = None  # the next big body starts a fresh worker
                pool.shutdown(wait=False, cancel_futures=True)
            log.error("the decoding worker died (killed, or out of memory); restarting it")
            raise ServingError(
                "decoding the request body failed: the worker process decoding it died"
            ) from None

    def close(self) -> None:
        """Stop the worker (blocks until it exits: call it off the event loop)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
