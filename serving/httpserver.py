"""A lean HTTP/1.1 server for the REST route table: httptools parsing on the asyncio (uvloop)
transport, one write per response, no ASGI messages in between.

Keep-alive and pipelining (answers in request order, reading paused while 32 requests
wait), `Expect: 100-continue`, chunked request bodies, a body limit answered with 413
before the body is read when Content-Length declares it, 400 and close on malformed HTTP,
and idle or stalled connections closed after a timeout.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote

import httptools

from serving.http import AsgiApp, Request, Response, error_response

log = logging.getLogger("servo.serving")

MAX_PIPELINED = 32
_STATUS_LINES = {s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode() for s in HTTPStatus}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def _head(response: Response, keep_alive: bool) -> bytes:
    parts = [
        _STATUS_LINES.get(response.status) or f"HTTP/1.1 {response.status} \r\n".encode(),
        b"content-type: ", response.content_type, b"\r\ncontent-length: ",
        str(len(response.body)).encode(), b"\r\n",
    ]  # fmt: skip
    for name, value in response.headers:
        parts += [name, b": ", value, b"\r\n"]
    if not keep_alive:
        parts.append(b"connection: close\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


class HttpProtocol(asyncio.Protocol):
    def __init__(self, server: NativeHttpServer):
        self.server = server
        self.app = server.app
        self.limit = server.max_body_bytes
        self.loop = asyncio.get_running_loop()
        self.transport: Any = None
        self.parser = httptools.HttpRequestParser(self)
        self.pending: deque[tuple[Request | Response, bool]] = deque()
        self.busy = False
        self.paused = False
        self.last_active = self.loop.time()
        self.in_message = False
        self.discarding = False
        self._reset()

    def _reset(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: list[bytes] = []
        self.size = 0
        self.too_large: str | None = None

    # transport events

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self.pending.clear()

    def data_received(self, data: bytes) -> None:
        self.last_active = self.loop.time()
        if self.discarding:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError:
            return  # a callback answered already (413) and the connection is closing
        except httptools.HttpParserUpgrade:
            self._fail(400, "protocol upgrades are not supported")
        except httptools.HttpParserError as exc:
            self._fail(400, f"malformed HTTP request ({exc})")

    # parser callbacks

    def on_message_begin(self) -> None:
        self.in_message = True
        self._reset()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        expect_continue = False
        for name, value in self.headers:
            if name == b"content-length" and value.isdigit() and int(value) > self.limit:
                # answer now, without reading the body, and close the connection
                message = f"request body of {int(value)} bytes exceeds {self.limit} bytes"
                self.discarding = True
                self.pending.append((error_response(413, message), False))
                if not self.busy:
                    self._next()
                raise httptools.HttpParserCallbackError("body too large")
            if name == b"expect" and value.lower() == b"100-continue":
                expect_continue = True
        if expect_continue:
            self.transport.write(_CONTINUE)

    def on_body(self, body: bytes) -> None:
        if self.too_large is not None:
            return
        self.size += len(body)
        if self.size > self.limit:
            self.too_large = f"request body exceeds {self.limit} bytes"
            self.chunks = []
            return
        self.chunks.append(body)

    def on_message_complete(self) -> None:
        self.in_message = False
        keep_alive = bool(self.parser.should_keep_alive())
        item: Request | Response
        if self.too_large is not None:
            item, keep_alive = error_response(413, self.too_large), False
        else:
            raw_path = httptools.parse_url(self.url).path or b"/"
            path = raw_path.decode("latin-1")
            if "%" in path:
                path = unquote(path)
            item = Request(
                self.parser.get_method().decode("latin-1"), path, {}, self.headers,
                b"".join(self.chunks) if len(self.chunks) != 1 else self.chunks[0],
            )  # fmt: skip
        self.pending.append((item, keep_alive))
        if len(self.pending) > MAX_PIPELINED and not self.paused:
            self.paused = True
            self.transport.pause_reading()
        if not self.busy:
            self._next()

    # answering, in order

    def _next(self) -> None:
        while self.pending:
            item, keep_alive = self.pending.popleft()
            if isinstance(item, Response):
                self._write(item, keep_alive)
                continue
            self.busy = True
            self.loop.create_task(self._handle(item, keep_alive))
            return
        self.busy = False
        if self.paused:
            self.paused = False
            self.transport.resume_reading()

    async def _handle(self, request: Request, keep_alive: bool) -> None:
        response = await self.app.dispatch(request)
        self._write(response, keep_alive)
        self._next()

    def _write(self, response: Response, keep_alive: bool) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        head = _head(response, keep_alive)
        if len(response.body) < 65536:
            transport.write(head + response.body)
        else:
            transport.writelines([head, response.body])
        self.last_active = self.loop.time()
        if not keep_alive:
            transport.close()
            self.pending.clear()

    def _fail(self, status: int, message: str) -> None:
        self.pending.clear()
        self._write(error_response(status, message), keep_alive=False)

    def idle_for(self, now: float) -> float:
        return 0.0 if self.busy else now - self.last_active


class NativeHttpServer:
    def __init__(self, app: AsgiApp, max_body_bytes: int, keepalive_s: float = 65.0,
                 stalled_s: float = 30.0):  # fmt: skip
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.keepalive_s = keepalive_s
        self.stalled_s = stalled_s
        self.connections: set[HttpProtocol] = set()
        self._server: asyncio.base_events.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self, sock: Any) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: HttpProtocol(self), sock=sock, backlog=2048)
        self._sweeper = loop.create_task(self._sweep())

    async def _sweep(self) -> None:
        """Close connections idle past keep-alive, or stuck mid-request (slow clients)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(min(self.keepalive_s, self.stalled_s) / 4)
            now = loop.time()
            for connection in list(self.connections):
                limit = self.stalled_s if connection.in_message else self.keepalive_s
                if connection.idle_for(now) > limit and connection.transport is not None:
                    connection.transport.close()

    async def stop(self, grace_s: float = 5.0) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._server is not None:
            self._server.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        while any(c.busy for c in self.connections) and loop.time() < deadline:
            await asyncio.sleep(0.01)
        for connection in list(self.connections):
            if connection.transport is not None:
                connection.transport.close()
        if self._server is not None:
            await self._server.wait_closed()
