"""What the native HTTP server holds against hostile or broken clients: its limits and
timeouts, the counters that show them at work (on /metrics), and the glibc heap trim after
large requests.

Kept apart from `serving.httpserver` so the protocol stays readable.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import resource
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

log = logging.getLogger("servo.serving")

MiB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class HttpLimits:
    #: complete request headers must arrive within this many seconds of the request's first
    #: byte (of the connection's opening, for its first request), however they trickle in
    header_timeout_s: float = 10.0
    #: a request body slower than this many bytes/s over any `body_rate_window_s` is cut
    #: (0: no minimum rate)
    min_body_rate: float = 1024.0
    body_rate_window_s: float = 5.0
    #: open connections at most (0: half the open-file limit, RLIMIT_NOFILE). At the cap a
    #: new connection closes the one that has waited longest for a request head; if none
    #: is waiting for one, it gets 503 and is closed. Open ones keep being served.
    max_connections: int = 0
    #: the request line (its target) and any one header line, in bytes: 414 / 431
    max_line_bytes: int = 16 * 1024
    #: the request line and all its headers together, in bytes: 431
    max_header_bytes: int = 64 * 1024
    #: an idle keep-alive connection is closed after this many seconds
    keepalive_s: float = 65.0
    #: a request body, or a response the client does not read, that makes no progress for
    #: this many seconds closes the connection
    stall_timeout_s: float = 30.0
    #: after an error answered with a close (413, 431, ...), the client's further bytes are
    #: read and dropped for up to this long and this many bytes, so it reads the answer
    #: instead of a connection reset (lingering close)
    linger_s: float = 5.0
    linger_bytes: int = 128 * MiB
    #: reading from a connection pauses while this much of its answers wait to be sent
    write_high_water: int = 1 * MiB
    #: after a request body at least this large, give freed heap back to the OS
    #: (glibc malloc_trim, at most once a second; 0: never)
    trim_after_bytes: int = 4 * MiB

    def connection_cap(self) -> int:
        if self.max_connections > 0:
            return self.max_connections
        return default_connection_cap()


def default_connection_cap() -> int:
    """Half the soft open-file limit (512 under the usual `ulimit -n 1024`), leaving the
    other half to gRPC, model files and logs; at least 16."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft <= 0:
        return 4096
    return max(16, int(soft) // 2)


class HttpStats:
    """Counters of the native server, exposed on the gateway's registry as `servo_http_*`."""

    def __init__(self) -> None:
        self.connections = 0
        self.refused_connections = 0
        self.backpressure_pauses = 0
        self.timeouts: dict[str, int] = {
            "header": 0,
            "body": 0,
            "write": 0,
            "idle": 0,
            "evicted": 0,
        }
        self.rejected: dict[int, int] = {}  # status -> count, answered by the server itself
        self.trims = 0

    def reject(self, status: int) -> None:
        self.rejected[status] = self.rejected.get(status, 0) + 1

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "servo_http_connections", "Open REST connections.", value=self.connections
        )
        yield CounterMetricFamily(
            "servo_http_connections_refused",
            "Connections answered 503 and closed because the connection cap was reached.",
            value=self.refused_connections,
        )
        yield CounterMetricFamily(
            "servo_http_backpressure_pauses",
            "Times reading from a connection paused because its answers were not being read.",
            value=self.backpressure_pauses,
        )
        timeouts = CounterMetricFamily(
            "servo_http_timeouts",
            "Connections closed by a timeout (header deadline, body rate, stalled write, "
            "idle keep-alive), or evicted at the cap while waiting for a request head.",
            labels=["reason"],
        )
        for reason, count in self.timeouts.items():
            timeouts.add_metric([reason], count)
        yield timeouts
        rejected = CounterMetricFamily(
            "servo_http_rejected",
            "Requests the HTTP server refused before routing (malformed, too large, ...).",
            labels=["code"],
        )
        for status, count in sorted(self.rejected.items()):
            rejected.add_metric([str(status)], count)
        yield rejected
        yield CounterMetricFamily(
            "servo_http_memory_trims", "Heap trims after large requests.", value=self.trims
        )

    def describe(self) -> list[Metric]:
        return []


def _libc() -> Any:
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") else None


class MemoryTrimmer:
    """Gives the heap that large requests leave behind back to the OS.

    glibc keeps freed memory in its arenas (a 20 MB body and its decoded tensors leave
    ~20 MB resident per request, for good); `malloc_trim(0)` releases it. It runs on a
    worker thread, at most once per `cooldown_s`: a trim asked for during the cooldown
    runs at its end. A no-op where the C library is not glibc.
    """

    def __init__(self, stats: HttpStats, cooldown_s: float = 1.0):
        self.stats = stats
        self.cooldown_s = cooldown_s
        self._libc = _libc()
        self._last = -cooldown_s
        self._scheduled = False

    @property
    def available(self) -> bool:
        return self._libc is not None

    def request(self) -> None:
        """Ask for a trim (event loop only); cheap to call, never blocks."""
        if self._libc is None or self._scheduled:
            return
        loop = asyncio.get_running_loop()
        self._scheduled = True
        delay = max(0.0, self._last + self.cooldown_s - loop.time())
        loop.call_later(delay, self._start)

    def _start(self) -> None:
        loop = asyncio.get_running_loop()
        self._last = loop.time()
        self._scheduled = False  # a large request from now on asks for the next trim
        try:
            future = loop.run_in_executor(None, self._libc.malloc_trim, 0)
        except RuntimeError:  # the executor is shut down: the process is stopping
            return
        future.add_done_callback(self._done)

    def _done(self, future: asyncio.Future[Any]) -> None:
        if future.cancelled() or future.exception() is not None:
            return
        self.stats.trims += 1
