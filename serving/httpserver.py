"""A lean HTTP/1.1 server for the REST route table: httptools parsing on the asyncio (uvloop)
transport, one write per response, no ASGI messages in between.

Keep-alive and pipelining (answers in request order, reading paused while 32 requests
wait), `Expect: 100-continue` and chunked request bodies. Against hostile or broken
clients (limits in `serving.httplimits.HttpLimits`):

- a deadline for complete headers (however they trickle in), a minimum body rate, an idle
  keep-alive timeout, and a cap on open connections (503 and close past it);
- the request line, each header line and the head in all are bounded as bytes arrive
  (414 / 431), so no more than the limit is ever held;
- malformed requests, invalid targets, CONNECT and unknown transfer codings get 400 / 405 /
  501 and a close; a body over the limit gets 413 as soon as it is known;
- reading pauses while a connection's answers are not being read (write backpressure);
- an answer followed by a close is a lingering close: the client's further bytes are read
  and dropped (bounded), so it reads the answer rather than a connection reset;
- the heap is trimmed after large requests (glibc keeps it otherwise).
"""

from __future__ import annotations

import asyncio
from typing import Any

from serving.http import AsgiApp
from serving.httplimits import HttpLimits, HttpStats, MemoryTrimmer
from serving.httpprotocol import HttpProtocol

__all__ = ["HttpProtocol", "NativeHttpServer"]


class NativeHttpServer:
    def __init__(
        self,
        app: AsgiApp,
        max_body_bytes: int,
        limits: HttpLimits | None = None,
        stats: HttpStats | None = None,
    ):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.limits = limits if limits is not None else HttpLimits()
        self.cap = self.limits.connection_cap()
        self.stats = stats if stats is not None else HttpStats()
        self.trimmer = MemoryTrimmer(self.stats)
        self.connections: set[HttpProtocol] = set()
        self.refused: set[HttpProtocol] = set()  # past the cap, lingering over their 503
        #: connections waiting for a request head, oldest first (a dict as an ordered set)
        self.waiting: dict[HttpProtocol, None] = {}
        self._server: asyncio.base_events.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None

    def evict_one(self) -> bool:
        """At the cap: close the connection that has waited longest for a request head
        (slowloris first), so a new one can come in. A new connection is the youngest, so
        it is the last to go: flooding to evict it takes a cap's worth of connections
        within the time its head takes to arrive."""
        gone: list[HttpProtocol] = []
        victim: HttpProtocol | None = None
        for connection in self.waiting:
            state = connection.evictable()
            if state is None:
                gone.append(connection)
            elif state:
                victim = connection
                break
        for connection in gone:
            del self.waiting[connection]
        if victim is None:
            return False
        del self.waiting[victim]
        self.connections.discard(victim)
        message = "request headers not complete; closed to make room for a new connection"
        victim.timeout("evicted", message if victim.in_message else None)
        return True

    async def start(self, sock: Any) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: HttpProtocol(self), sock=sock, backlog=2048)
        self._sweeper = loop.create_task(self._sweep())

    async def _sweep(self) -> None:
        """Enforce the timeouts: a pass over the connections a few times per shortest one."""
        limits = self.limits
        timeouts = (
            limits.header_timeout_s, limits.body_rate_window_s, limits.keepalive_s,
            limits.stall_timeout_s, limits.linger_s,
        )  # fmt: skip
        tick = min(1.0, max(0.05, min(t for t in timeouts if t > 0) / 4))
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(tick)
            now = loop.time()
            for connection in [*self.connections, *self.refused]:
                connection.check(now)

    async def stop(self, grace_s: float = 5.0) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._server is not None:
            self._server.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        while any(c.busy for c in self.connections) and loop.time() < deadline:
            await asyncio.sleep(0.01)
        for connection in [*self.connections, *self.refused]:
            if connection.transport is not None:
                connection.transport.close()
        if self._server is not None:
            await self._server.wait_closed()
