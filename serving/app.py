"""The REST route table (OIP v2 and V1) and its endpoints.

Endpoints do the HTTP things (status codes, headers, bodies) and hand the work to the
data plane, which gRPC shares.
"""

from __future__ import annotations

import asyncio
import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from serving import rest_codec, v1
from serving.dataplane import DataPlane
from serving.errors import ServingError
from serving.feedback import (
    ANONYMOUS,
    Authenticate,
    Caller,
    Unauthenticated,
    labelers_only,
    parse_feedback,
)
from serving.http import (
    AsgiApp,
    Handler,
    Request,
    Response,
    Route,
    error_response,
    json_response,
)

HEADER_LENGTH = b"inference-header-content-length"
OCTET_STREAM = b"application/octet-stream"
#: a sticky routing key: requests with the same key go to the same variant
ROUTING_KEY = b"servo-routing-key"
AUTHORIZATION = b"authorization"
#: what a 401 answer asks for (RFC 6750)
BEARER_CHALLENGE = (b"www-authenticate", b'Bearer realm="servo"')


class Endpoints:
    def __init__(
        self,
        dataplane: DataPlane,
        registry: CollectorRegistry,
        authenticate: Authenticate | None = None,
    ):
        self.dataplane = dataplane
        self.registry = registry
        self.authenticate = authenticate

    async def live(self, request: Request) -> Response:
        return json_response(200, {"live": self.dataplane.live()})

    async def ready(self, request: Request) -> Response:
        ready = self.dataplane.ready()
        return json_response(200 if ready else 503, {"ready": ready})

    async def server_metadata(self, request: Request) -> Response:
        return json_response(200, self.dataplane.server_metadata())

    async def model_metadata(self, request: Request) -> Response:
        params = request.params
        doc = self.dataplane.model_metadata(params["model"], params.get("version"))
        return json_response(200, doc)

    async def model_ready(self, request: Request) -> Response:
        params = request.params
        ready, reason = self.dataplane.model_readiness(params["model"], params.get("version"))
        doc: dict[str, object] = {"name": params["model"], "ready": ready}
        if reason is not None:
            doc["reason"] = reason
        return json_response(200 if ready else 503, doc)

    async def infer(self, request: Request) -> Response:
        started = time.perf_counter()
        params = request.params
        name, version = params["model"], params.get("version")
        try:
            body = request.body
            header_length = rest_codec.parse_header_length(request.header(HEADER_LENGTH), len(body))
            offloop = self.dataplane.offloop
            if len(body) > offloop.threshold:  # a big body costs its sender, not everyone
                infer_request = await offloop.run(
                    rest_codec.parse_infer_request, body, header_length
                )
            else:
                infer_request = rest_codec.parse_infer_request(body, header_length)
            key = request.header(ROUTING_KEY)
            response = await self.dataplane.infer(
                name, version, infer_request, key.decode("latin-1") if key else None
            )
            body, json_length = rest_codec.encode_infer_response(response, infer_request)
        except Exception as exc:
            raise self.dataplane.failed(name, version, "rest", exc, started) from None
        self.dataplane.record_success(response, "rest", started)
        if json_length is None:
            return Response(200, body)
        return Response(200, body, OCTET_STREAM, [(HEADER_LENGTH, str(json_length).encode())])

    async def feedback(self, request: Request) -> Response:
        try:
            caller = await self._caller(request)
        except Unauthenticated as exc:
            response = error_response(exc.status, exc.message)
            response.headers.append(BEARER_CHALLENGE)
            return response
        labels = parse_feedback(rest_codec.loads(request.body))
        result = await self.dataplane.feedback(request.params["model"], labels, caller)
        return json_response(200, result)

    async def _caller(self, request: Request) -> Caller:
        """Who sends this request: anonymous without a hook, else the hook's answer (off
        the event loop: it may ask the registry); Unauthenticated if it knows nobody."""
        authenticate = self.authenticate
        if authenticate is None:
            return ANONYMOUS
        header = request.header(AUTHORIZATION)
        text = header.decode("latin-1") if header is not None else None
        caller = await asyncio.get_running_loop().run_in_executor(None, authenticate, text)
        if caller is None:
            what = "a missing" if header is None else "an unknown, revoked or malformed"
            raise Unauthenticated(
                f"feedback needs a bearer token of role labeler (Authorization: Bearer "
                f"<token>); this request has {what} one"
            )
        return caller

    async def metrics(self, request: Request) -> Response:
        return Response(200, generate_latest(self.registry), CONTENT_TYPE_LATEST.encode())

    # V1

    async def v1_list(self, request: Request) -> Response:
        return json_response(200, {"models": self.dataplane.repository.names()})

    async def v1_model(self, request: Request) -> Response:
        name = request.params["model"]
        return json_response(200, {"name": name, "ready": self.dataplane.model_ready(name)})

    async def v1_predict(self, request: Request) -> Response:
        started = time.perf_counter()
        name = request.params["model"]
        try:
            # V1 rows are decoded with the champion's signature, and answered by it
            version = self.dataplane.router.champion_version(name)
            model = self.dataplane.repository.model(name, version)
            body, offloop = request.body, self.dataplane.offloop
            if len(body) > offloop.threshold:
                infer_request = await offloop.run(v1.parse_predict_body, body, model.signature)
            else:
                infer_request = v1.parse_predict_body(body, model.signature)
            response = await self.dataplane.infer(name, version, infer_request)
            doc = v1.encode_predict(response)
        except Exception as exc:
            raise self.dataplane.failed(name, None, "rest-v1", exc, started) from None
        self.dataplane.record_success(response, "rest-v1", started)
        return json_response(200, doc)


def route_table(endpoints: Endpoints) -> list[Route]:
    """Every REST route; patterns are tried in this order, so the hot ones come first."""
    e = endpoints
    return [
        Route("POST", "/v2/models/{model}/infer", e.infer),
        Route("POST", "/v2/models/{model}/versions/{version}/infer", e.infer),
        Route("POST", "/v2/models/{model}/feedback", e.feedback),
        Route("GET", "/metrics", e.metrics),
        Route("GET", "/v2/health/live", e.live),
        Route("GET", "/v2/health/ready", e.ready),
        Route("GET", "/v2", e.server_metadata),
        Route("GET", "/v2/models/{model}", e.model_metadata),
        Route("GET", "/v2/models/{model}/versions/{version}", e.model_metadata),
        Route("GET", "/v2/models/{model}/ready", e.model_ready),
        Route("GET", "/v2/models/{model}/versions/{version}/ready", e.model_ready),
        Route("GET", "/v1/models", e.v1_list),
        Route("GET", "/v1/models/{model}", e.v1_model),
        Route("POST", "/v1/models/{model}:predict", e.v1_predict),
    ]


def build_app(
    dataplane: DataPlane,
    registry: CollectorRegistry,
    max_body_bytes: int,
    authenticate: Authenticate | None = None,
) -> AsgiApp:
    """The REST app. With `authenticate`, feedback needs a caller it knows (401) holding
    the labeler role (403); without, feedback is open."""
    endpoints = Endpoints(dataplane, registry, authenticate)
    if authenticate is not None:
        dataplane.feedbacks.check = labelers_only
    app = AsgiApp(route_table(endpoints), max_body_bytes)
    protocols: dict[Handler, str] = {endpoints.infer: "rest", endpoints.v1_predict: "rest-v1"}

    def refused(method: str, path: str, error: ServingError) -> None:
        """An infer request refused before its endpoint ran is counted like the others."""
        handler, params = app.match(method, path)
        protocol = protocols.get(handler) if handler is not None else None
        if protocol is not None:
            version = params.get("version")
            dataplane.failed(params["model"], version, protocol, error, time.perf_counter())

    app.on_refused = refused
    return app


__all__ = ["build_app", "error_response"]
