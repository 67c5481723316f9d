"""A minimal ASGI layer: explicit route table, bounded body reading, OIP error bodies.

Kept lean on purpose: the infer route is the hot path, so no per-request framework objects
beyond one small Request, and bodies go straight from the socket to orjson and numpy.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from serving.errors import MethodNotAllowed, PayloadTooLarge, RouteNotFound, ServingError

log = logging.getLogger("servo.serving")

JSON = b"application/json"


@dataclass(slots=True)
class Request:
    method: str
    path: str
    params: dict[str, str]
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None


@dataclass(slots=True)
class Response:
    status: int
    body: bytes
    content_type: bytes = JSON
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)


Handler = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    pattern: str
    handler: Handler


def json_response(status: int, doc: Any) -> Response:
    return Response(status, orjson.dumps(doc))


def error_response(status: int, message: str) -> Response:
    return Response(status, orjson.dumps({"error": message}))


_PARAM = re.compile(r"\{(\w+)\}")


def _compile(pattern: str) -> re.Pattern[str]:
    regex = ""
    last = 0
    for match in _PARAM.finditer(pattern):
        regex += re.escape(pattern[last : match.start()]) + f"(?P<{match.group(1)}>[^/:]+)"
        last = match.end()
    return re.compile("^" + regex + re.escape(pattern[last:]) + "$")


class AsgiApp:
    def __init__(self, routes: list[Route], max_body_bytes: int):
        self.max_body_bytes = max_body_bytes
        self._exact: dict[str, dict[str, Handler]] = {}
        self._patterns: list[tuple[re.Pattern[str], dict[str, Handler]]] = []
        compiled: dict[str, dict[str, Handler]] = {}
        for route in routes:
            if "{" in route.pattern:
                compiled.setdefault(route.pattern, {})[route.method] = route.handler
            else:
                self._exact.setdefault(route.pattern, {})[route.method] = route.handler
        self._patterns = [(_compile(p), methods) for p, methods in compiled.items()]

    def _match(self, path: str) -> tuple[dict[str, Handler], dict[str, str]]:
        methods = self._exact.get(path)
        if methods is not None:
            return methods, {}
        for regex, methods in self._patterns:
            found = regex.match(path)
            if found is not None:
                return methods, found.groupdict()
        raise RouteNotFound(f"no route for {path}")

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                await _lifespan(receive, send)
            return
        try:
            methods, params = self._match(scope["path"])
            handler = methods.get(scope["method"])
            if handler is None:
                allowed = ", ".join(sorted(methods))
                raise MethodNotAllowed(f"{scope['method']} not allowed here (allowed: {allowed})")
            request = Request(scope["method"], scope["path"], params, scope["headers"])
            if scope["method"] == "POST":
                request.body = await self._read_body(request, receive)
            response = await handler(request)
        except ServingError as exc:
            response = error_response(exc.status, exc.message)
        except Exception:
            log.exception("unhandled error on %s %s", scope["method"], scope["path"])
            response = error_response(500, "internal server error")
        headers = [
            (b"content-type", response.content_type),
            (b"content-length", str(len(response.body)).encode()),
            *response.headers,
        ]
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        await send({"type": "http.response.body", "body": response.body})

    async def _read_body(self, request: Request, receive: Any) -> bytes:
        limit = self.max_body_bytes
        declared = request.header(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise PayloadTooLarge(f"request body of {int(declared)} bytes exceeds {limit} bytes")
        message = await receive()
        body: bytes = message.get("body", b"")
        if not message.get("more_body", False):
            if len(body) > limit:
                raise PayloadTooLarge(f"request body exceeds {limit} bytes")
            return body
        chunks = [body]
        size = len(body)
        while message.get("more_body", False):
            message = await receive()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"request body exceeds {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)


async def _lifespan(receive: Any, send: Any) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
