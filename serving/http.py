"""A minimal ASGI layer: explicit route table, bounded body reading, OIP error bodies.

Kept lean on purpose: the infer route is the hot path, so no per-request framework objects
beyond one small Request, and bodies go straight from the socket to orjson and numpy.
"""

from __future__ import annotations

import logging
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
    #: the raw query string (after '?', not decoded)
    query: bytes = b""

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


@dataclass(frozen=True, slots=True)
class _Segment:
    text: str  # the literal, or the parameter's name
    param: bool = False
    suffix: str = ""  # `{model}:predict` matches a segment ending in ":predict"


@dataclass(frozen=True, slots=True)
class _Pattern:
    """A route pattern as path segments: literals, and `{name}` parameters that match one
    non-empty segment without ':' (so names are never path fragments)."""

    segments: tuple[_Segment, ...]
    methods: dict[str, Handler]

    @classmethod
    def parse(cls, pattern: str, methods: dict[str, Handler]) -> _Pattern:
        segments: list[_Segment] = []
        for part in pattern.strip("/").split("/"):
            if part.startswith("{"):
                name, _, suffix = part[1:].partition("}")
                segments.append(_Segment(name, param=True, suffix=suffix))
            else:
                segments.append(_Segment(part))
        return cls(tuple(segments), methods)

    def match(self, parts: list[str]) -> dict[str, str] | None:
        if len(parts) != len(self.segments):
            return None
        params: dict[str, str] = {}
        for part, segment in zip(parts, self.segments, strict=True):
            if not segment.param:
                if part != segment.text:
                    return None
                continue
            value = part
            if segment.suffix:
                if not part.endswith(segment.suffix):
                    return None
                value = part[: -len(segment.suffix)]
            if not value or ":" in value:
                return None
            params[segment.text] = value
        return params


#: told of an answer given before any handler ran (a 413 before the body is read), with the
#: request's method and path, so that it is counted like every other answer
Refused = Callable[[str, str, ServingError], None]


class AsgiApp:
    def __init__(self, routes: list[Route], max_body_bytes: int):
        self.max_body_bytes = max_body_bytes
        self.on_refused: Refused | None = None
        self._exact: dict[str, dict[str, Handler]] = {}
        by_pattern: dict[str, dict[str, Handler]] = {}
        for route in routes:
            table = by_pattern if "{" in route.pattern else self._exact
            table.setdefault(route.pattern, {})[route.method] = route.handler
        self._patterns = [_Pattern.parse(p, methods) for p, methods in by_pattern.items()]

    def _match(self, path: str) -> tuple[dict[str, Handler], dict[str, str]]:
        methods = self._exact.get(path)
        if methods is not None:
            return methods, {}
        parts = path.strip("/").split("/")
        for pattern in self._patterns:
            params = pattern.match(parts)
            if params is not None:
                return pattern.methods, params
        raise RouteNotFound(f"no route for {path}")

    def match(self, method: str, path: str) -> tuple[Handler | None, dict[str, str]]:
        """The handler of a route and its parameters (None: no such route or method)."""
        try:
            methods, params = self._match(path)
        except RouteNotFound:
            return None, {}
        return methods.get(method), params

    def refuse(self, method: str, path: str, error: ServingError) -> Response:
        """The answer to a request refused before its handler ran (HTTP servers call it)."""
        if self.on_refused is not None:
            self.on_refused(method, path, error)
        return error_response(error.status, error.message)

    async def dispatch(self, request: Request) -> Response:
        """Route one request (its body already read) to its handler; errors become OIP
        `{"error": ...}` responses. Shared by the native server and the ASGI entry."""
        try:
            methods, request.params = self._match(request.path)
            handler = methods.get(request.method)
            if handler is None:
                allowed = ", ".join(sorted(methods))
                raise MethodNotAllowed(f"{request.method} not allowed here (allowed: {allowed})")
            return await handler(request)
        except ServingError as exc:
            return error_response(exc.status, exc.message)
        except Exception:
            log.exception("unhandled error on %s %s", request.method, request.path)
            return error_response(500, "internal server error")

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """The ASGI entry (for uvicorn or any ASGI server)."""
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                await _lifespan(receive, send)
            return
        request = Request(
            scope["method"],
            scope["path"],
            {},
            scope["headers"],
            query=scope.get("query_string", b""),
        )
        try:
            if scope["method"] == "POST":
                request.body = await self._read_body(request, receive)
            response = await self.dispatch(request)
        except ServingError as exc:
            response = self.refuse(request.method, request.path, exc)
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
        # never int() of 4,300 digits or more (Python refuses): 19 digits exceed any limit
        too_large = declared is not None and declared.isdigit() and len(declared) > 19
        if declared is not None and declared.isdigit() and (too_large or int(declared) > limit):
            shown = declared.decode() if len(declared) <= 19 else "more than 10**19"
            raise PayloadTooLarge(f"request body of {shown} bytes exceeds {limit} bytes")
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
