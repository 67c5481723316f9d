"""One connection of the native HTTP/1.1 server (`serving.httpserver`): httptools parsing,
answers in request order, and the limits and timeouts of `serving.httplimits.HttpLimits`
enforced as bytes arrive."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from http import HTTPStatus
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import httptools

from serving.errors import PayloadTooLarge
from serving.http import Request, Response, error_response

log = logging.getLogger("servo.serving")

if TYPE_CHECKING:
    from serving.httpserver import NativeHttpServer

MAX_PIPELINED = 32
#: connections past the cap that may be lingering over their 503 at once (others: reset)
MAX_REFUSED_LINGERING = 64
_STATUS_LINES = {s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode() for s in HTTPStatus}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_PIPELINE, _WRITE = 1, 2  # why reading is paused


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
        self.limits = server.limits
        self.limit = server.max_body_bytes
        self.loop = asyncio.get_running_loop()
        self.transport: Any = None
        self.parser = httptools.HttpRequestParser(self)
        self.pending: deque[tuple[Request | Response, bool]] = deque()
        self.busy = False
        self.read_paused = 0  # a bit set of _PIPELINE and _WRITE
        now = self.loop.time()
        self.idle_since = now
        #: when the current request's headers must be complete (None: not waiting for any)
        self.head_deadline: float | None = now + self.limits.header_timeout_s
        self.in_message = False
        self.in_head = True  # what arrives next is a request head
        self.head_bytes = 0
        self.closing = False  # answered with a close: further input is dropped
        self.linger_after = False  # close the connection with a lingering close
        self.linger_until: float | None = None
        self.linger_left = self.limits.linger_bytes
        self.write_paused_since: float | None = None
        self.eof = False
        self._reset()

    def _reset(self) -> None:
        self.method = "GET"
        self.url = b""
        self.path = "/"
        self.query = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: list[bytes] = []
        self.size = 0
        self.mark_time = 0.0  # the body-rate window: since when, and the size then
        self.mark_size = 0

    # transport events

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        server = self.server
        if len(server.connections) >= server.cap and not server.evict_one():
            server.stats.refused_connections += 1
            if len(server.refused) >= MAX_REFUSED_LINGERING:
                transport.abort()
                return
            server.refused.add(self)
            self.closing = True
            message = f"too many connections (at most {server.cap}); retry later"
            busy = error_response(503, message)
            busy.headers.append((b"retry-after", b"1"))
            transport.write(_head(busy, False) + busy.body)
            self._linger(min(self.limits.linger_s, 1.0))
            return
        server.connections.add(self)
        server.waiting[self] = None
        server.stats.connections = len(server.connections)
        transport.set_write_buffer_limits(high=self.limits.write_high_water)

    def connection_lost(self, exc: Exception | None) -> None:
        server = self.server
        server.connections.discard(self)
        server.refused.discard(self)
        server.waiting.pop(self, None)
        server.stats.connections = len(server.connections)
        self.pending.clear()
        # the parser refers back to this protocol: a cycle only the cyclic GC frees, late;
        # a half-received body must not wait for it
        self._reset()

    def eof_received(self) -> bool:
        if self.busy or self.pending:
            self.eof = True  # answer what was asked, then close
            return True
        return False

    def pause_writing(self) -> None:
        self.write_paused_since = self.loop.time()
        self.server.stats.backpressure_pauses += 1
        self._pause(_WRITE)

    def resume_writing(self) -> None:
        self.write_paused_since = None
        self._resume(_WRITE)
        self._next()

    def data_received(self, data: bytes) -> None:
        if self.closing:
            self.linger_left -= len(data)
            if self.linger_left <= 0:
                self.transport.close()
            return
        if self.in_head:
            if self.head_bytes + len(data) > self.limits.max_header_bytes:
                self._feed_bounded(data)
                return
            self.head_bytes += len(data)
        self._feed(data)

    def _feed_bounded(self, data: bytes) -> None:
        """Feed a head in pieces that fit what is left of the header limit, so the parser
        never holds more than the limit of one head."""
        view = memoryview(data)
        while view and not self.closing:
            if not self.in_head:
                self._feed(view)
                return
            room = self.limits.max_header_bytes - self.head_bytes
            if room <= 0:
                self._refuse(431, f"request headers exceed {self.limits.max_header_bytes} bytes")
                return
            piece, view = view[:room], view[room:]
            self.head_bytes += len(piece)
            self._feed(piece)

    def _feed(self, data: bytes | memoryview) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError:
            if not self.closing:  # a callback failed without answering
                log.warning("HTTP parser callback failed", exc_info=True)
                self._refuse(400, "malformed HTTP request")
        except httptools.HttpParserUpgrade:
            if not self.closing:
                self._refuse(400, "protocol upgrades are not supported")
        except httptools.HttpParserError as exc:
            if not self.closing:
                self._refuse(400, f"malformed HTTP request ({exc})")

    # parser callbacks

    def on_message_begin(self) -> None:
        self.in_message = True
        self._reset()
        if self.head_deadline is None:
            self.head_deadline = self.loop.time() + self.limits.header_timeout_s
            self.server.waiting[self] = None

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > self.limits.max_line_bytes:
            self._refuse(414, f"request target longer than {self.limits.max_line_bytes} bytes")
            raise httptools.HttpParserCallbackError("request target too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(name) + len(value) > self.limits.max_line_bytes:
            shown = name[:64].decode("latin-1")
            self._refuse(431, f"header {shown} longer than {self.limits.max_line_bytes} bytes")
            raise httptools.HttpParserCallbackError("header line too long")
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self.in_head = False
        self.head_deadline = None
        self.server.waiting.pop(self, None)
        self.mark_time = self.loop.time()
        method = self.parser.get_method()
        if method == b"CONNECT":
            self._refuse(405, "CONNECT is not supported", ((b"allow", b"GET, POST"),))
            raise httptools.HttpParserCallbackError("CONNECT")
        if self.parser.should_upgrade():
            self._refuse(400, "protocol upgrades are not supported")
            raise httptools.HttpParserCallbackError("upgrade")
        self.method = method.decode("latin-1")
        try:
            url = httptools.parse_url(self.url)
            raw_path = url.path or b"/"
        except httptools.HttpParserInvalidURLError:
            self._refuse(400, f"invalid request target {self.url[:200].decode('latin-1')!r}")
            raise httptools.HttpParserCallbackError("invalid target") from None
        path = raw_path.decode("latin-1")
        self.path = unquote(path) if "%" in path else path
        self.query = url.query or b""
        expect_continue = False
        for name, value in self.headers:
            if name == b"content-length" and value.isdigit():
                if len(value) > 18 or int(value) > self.limit:
                    # answer now, without reading the body, and close the connection
                    declared = f"of {int(value)} bytes " if len(value) <= 18 else ""
                    self._too_large(f"request body {declared}exceeds {self.limit} bytes")
                    raise httptools.HttpParserCallbackError("body too large")
            elif name == b"transfer-encoding":
                if value.strip().lower() != b"chunked":
                    coding = value[:100].decode("latin-1")
                    self._refuse(501, f"Transfer-Encoding {coding!r} is not supported "
                                      "(only chunked)")  # fmt: skip
                    raise httptools.HttpParserCallbackError("transfer coding")
            elif name == b"expect" and value.lower() == b"100-continue":
                expect_continue = True
        if expect_continue:
            self.transport.write(_CONTINUE)

    def on_body(self, body: bytes) -> None:
        self.size += len(body)
        if self.size > self.limit:
            self.chunks = []
            self._too_large(f"request body exceeds {self.limit} bytes")
            raise httptools.HttpParserCallbackError("body too large")
        self.chunks.append(body)

    def on_message_complete(self) -> None:
        self.in_message = False
        self.in_head = True
        self.head_bytes = 0
        keep_alive = bool(self.parser.should_keep_alive())
        chunks = self.chunks
        item = Request(
            self.method, self.path, {}, self.headers,
            b"".join(chunks) if len(chunks) != 1 else chunks[0], self.query,
        )  # fmt: skip
        self.chunks = []
        self.pending.append((item, keep_alive))
        if len(self.pending) > MAX_PIPELINED:
            self._pause(_PIPELINE)
        if not self.busy:
            self._next()

    # answering, in order

    def _next(self) -> None:
        if self.busy:
            return
        while self.pending:
            if self.write_paused_since is not None:
                return  # resume_writing() comes back here
            item, keep_alive = self.pending.popleft()
            if isinstance(item, Response):
                self._write(item, keep_alive)
                continue
            self.busy = True
            self.loop.create_task(self._handle(item, keep_alive))
            return
        self._resume(_PIPELINE)
        if self.eof and self.transport is not None:
            self.transport.close()

    async def _handle(self, request: Request, keep_alive: bool) -> None:
        response = await self.app.dispatch(request)
        self.busy = False
        large = 0 < self.limits.trim_after_bytes <= len(request.body)
        del request  # let the body go before the heap is trimmed
        self._write(response, keep_alive)
        self._next()
        if large:
            self.server.trimmer.request()

    def _write(self, response: Response, keep_alive: bool) -> None:
        transport = self.transport
        if transport is None or transport.is_closing() or self.linger_until is not None:
            return
        head = _head(response, keep_alive)
        if len(response.body) < 65536:
            transport.write(head + response.body)
        else:
            transport.writelines([head, response.body])
        self.idle_since = self.loop.time()
        if not keep_alive:
            self.pending.clear()
            if self.linger_after:
                self._linger(self.limits.linger_s)
            else:
                transport.close()

    def _too_large(self, message: str) -> None:
        """413 before the endpoint ran, counted like the endpoint's answers (an infer
        route's servo_requests_total) through the app's refusal hook."""
        response = self.app.refuse(self.method, self.path, PayloadTooLarge(message))
        self._refuse(413, message, response=response)

    def _refuse(
        self,
        status: int,
        message: str,
        headers: tuple[tuple[bytes, bytes], ...] = (),
        response: Response | None = None,
    ) -> None:
        """Answer `status` after what was asked before, then close with a lingering close;
        the rest of the input is dropped."""
        self.server.stats.reject(status)
        self.closing = self.linger_after = True
        if response is None:
            response = error_response(status, message)
        response.headers.extend(headers)
        self.pending.append((response, False))
        self._next()

    def _linger(self, seconds: float) -> None:
        """Half-close (our FIN after the answer) and read and drop what the client still
        sends, for `seconds` and `linger_bytes` at most; the client's EOF ends it."""
        transport = self.transport
        self.closing = True
        if self.eof or not transport.can_write_eof():
            transport.close()
            return
        self.linger_until = self.loop.time() + seconds
        transport.write_eof()
        if self.read_paused:
            self.read_paused = 0
            transport.resume_reading()

    def _pause(self, reason: int) -> None:
        if self.linger_until is not None:
            return  # a lingering connection keeps draining
        if not self.read_paused:
            self.transport.pause_reading()
        self.read_paused |= reason

    def _resume(self, reason: int) -> None:
        if not self.read_paused & reason:
            return
        self.read_paused &= ~reason
        transport = self.transport
        if self.read_paused or transport is None or transport.is_closing():
            return
        transport.resume_reading()
        # the client could not send while we were not reading: its windows start again
        now = self.loop.time()
        if self.head_deadline is not None:
            self.head_deadline = max(self.head_deadline, now + self.limits.header_timeout_s)
        self.mark_time, self.mark_size = now, self.size

    # timeouts (the server's sweeper calls check() a few times a second)

    def check(self, now: float) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        limits = self.limits
        if self.linger_until is not None:
            if now > self.linger_until:
                transport.close()
            return
        if self.write_paused_since is not None:
            if now - self.write_paused_since > limits.stall_timeout_s:
                self.timeout("write", None)
            return
        if self.busy or self.pending or self.read_paused or self.closing:
            return
        if self.head_deadline is not None:
            if now > self.head_deadline:
                message = f"request headers not complete within {limits.header_timeout_s:g} s"
                self.timeout("header", message if self.in_message else None)
        elif self.in_message:
            elapsed = now - self.mark_time
            rate = limits.min_body_rate
            if elapsed >= (limits.body_rate_window_s if rate > 0 else limits.stall_timeout_s):
                if self.size - self.mark_size < max(1.0, rate * elapsed):
                    self.timeout("body", f"request body slower than {rate:g} bytes/s")
                else:
                    self.mark_time, self.mark_size = now, self.size
        elif now - self.idle_since > limits.keepalive_s:
            self.server.stats.timeouts["idle"] += 1
            transport.close()

    def evictable(self) -> bool | None:
        """Whether this connection, waiting for a request head, may be closed to let a new
        one in: None if it is not waiting (any more), False while it cannot send."""
        if self.head_deadline is None or self.closing or self.transport is None:
            return None
        return not (self.busy or self.pending or self.read_paused)

    def timeout(self, reason: str, message: str | None) -> None:
        """Close a connection whose client is too slow (408 when it had begun a request)."""
        self.server.stats.timeouts[reason] += 1
        self.closing = True
        self.pending.clear()
        transport = self.transport
        if message is None:
            if reason == "write":
                transport.abort()  # its unread answers would never drain
            else:
                transport.close()
            return
        answer = error_response(408, message)
        transport.write(_head(answer, False) + answer.body)
        transport.close()
