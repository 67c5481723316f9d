"""OIP gRPC service `inference.GRPCInferenceService` over the shared data plane."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from concurrent import futures
from http import HTTPStatus
from typing import Any

import grpc

from serving import grpc_codec
from serving.dataplane import DataPlane
from serving.errors import InvalidInput, ServingError
from serving.grpc_stubs import pb, pb_grpc

ROUTING_KEY = "servo-routing-key"

STATUS_CODES: dict[HTTPStatus, grpc.StatusCode] = {
    HTTPStatus.BAD_REQUEST: grpc.StatusCode.INVALID_ARGUMENT,
    HTTPStatus.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    HTTPStatus.METHOD_NOT_ALLOWED: grpc.StatusCode.UNIMPLEMENTED,
    HTTPStatus.REQUEST_ENTITY_TOO_LARGE: grpc.StatusCode.RESOURCE_EXHAUSTED,
    HTTPStatus.SERVICE_UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    HTTPStatus.INTERNAL_SERVER_ERROR: grpc.StatusCode.INTERNAL,
    HTTPStatus.BAD_GATEWAY: grpc.StatusCode.UNAVAILABLE,  # a remote version's backend
    HTTPStatus.GATEWAY_TIMEOUT: grpc.StatusCode.DEADLINE_EXCEEDED,
    HTTPStatus.CONFLICT: grpc.StatusCode.ABORTED,
    HTTPStatus.UNPROCESSABLE_ENTITY: grpc.StatusCode.INVALID_ARGUMENT,
}


async def _abort(context: Any, error: ServingError) -> None:
    await context.abort(STATUS_CODES.get(error.status, grpc.StatusCode.UNKNOWN), error.message)


_Servicer: Any = pb_grpc.GRPCInferenceServiceServicer


class InferenceServicer(_Servicer):  # type: ignore[misc]
    def __init__(self, dataplane: DataPlane):
        self.dataplane = dataplane

    async def ServerLive(self, request: Any, context: Any) -> Any:
        return pb.ServerLiveResponse(live=self.dataplane.live())

    async def ServerReady(self, request: Any, context: Any) -> Any:
        return pb.ServerReadyResponse(ready=self.dataplane.ready())

    async def ModelReady(self, request: Any, context: Any) -> Any:
        try:
            ready = self.dataplane.model_ready(request.name, request.version or None)
        except ServingError as exc:
            await _abort(context, exc)
        return pb.ModelReadyResponse(ready=ready)

    async def ServerMetadata(self, request: Any, context: Any) -> Any:
        return pb.ServerMetadataResponse(**self.dataplane.server_metadata())

    async def ModelMetadata(self, request: Any, context: Any) -> Any:
        try:
            doc = self.dataplane.model_metadata(request.name, request.version or None)
        except ServingError as exc:
            await _abort(context, exc)
        tensors = {
            key: [pb.ModelMetadataResponse.TensorMetadata(**spec) for spec in doc[key]]
            for key in ("inputs", "outputs")
        }
        return pb.ModelMetadataResponse(
            name=doc["name"], versions=doc["versions"], platform=doc["platform"], **tensors
        )

    async def ModelInfer(self, request: Any, context: Any) -> Any:
        started = time.perf_counter()
        name, version = request.model_name, request.model_version or None
        try:
            if not name:
                raise InvalidInput("model_name is required")
            offloop = self.dataplane.offloop
            if grpc_codec.payload_bytes(request) > offloop.threshold:
                # serialized again here (fast), parsed and decoded (slow) in the worker
                infer_request = await offloop.run(
                    grpc_codec.decode_serialized, request.SerializeToString()
                )
            else:
                infer_request = grpc_codec.decode_request(request)
            key = None
            for item in context.invocation_metadata() or ():
                if item.key == ROUTING_KEY:
                    key = item.value if isinstance(item.value, str) else None
            response = await self.dataplane.infer(name, version, infer_request, key)
            reply = grpc_codec.encode_response(response, raw=bool(request.raw_input_contents))
        except Exception as exc:
            await _abort(context, self.dataplane.failed(name, version, "grpc", exc, started))
        self.dataplane.record_success(response, "grpc", started)
        return reply


def _options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", -1),
        ("grpc.so_reuseport", 0),
    ]


def build_server(dataplane: DataPlane, max_message_bytes: int) -> grpc.aio.Server:
    """grpcio's asyncio server on the serving event loop."""
    server = grpc.aio.server(options=_options(max_message_bytes))
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(dataplane), server)
    return server


class _Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self.code = code
        self.details = details


class _LoopContext:
    """What InferenceServicer needs of a context, for a call whose handler runs on a grpcio
    worker thread while the servicer runs on the event loop: abort travels back as _Aborted."""

    __slots__ = ("_context",)

    def __init__(self, context: Any):
        self._context = context

    def invocation_metadata(self) -> Any:
        return self._context.invocation_metadata()

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise _Aborted(code, details)


Handler = Callable[[Any, Any], Coroutine[Any, Any, Any]]


def _bridge(handler: Handler, loop: asyncio.AbstractEventLoop) -> Callable[[Any, Any], Any]:
    def call(request: Any, context: Any) -> Any:
        done = asyncio.run_coroutine_threadsafe(handler(request, _LoopContext(context)), loop)
        try:
            return done.result()
        except _Aborted as exc:
            context.abort(exc.code, exc.details)

    return call


class _ThreadedServicer(_Servicer):  # type: ignore[misc]
    def __init__(self, servicer: InferenceServicer, loop: asyncio.AbstractEventLoop):
        self.ServerLive = _bridge(servicer.ServerLive, loop)
        self.ServerReady = _bridge(servicer.ServerReady, loop)
        self.ModelReady = _bridge(servicer.ModelReady, loop)
        self.ServerMetadata = _bridge(servicer.ServerMetadata, loop)
        self.ModelMetadata = _bridge(servicer.ModelMetadata, loop)
        self.ModelInfer = _bridge(servicer.ModelInfer, loop)


def build_threaded_server(
    dataplane: DataPlane,
    max_message_bytes: int,
    *,
    loop: asyncio.AbstractEventLoop,
    workers: int,
) -> tuple[grpc.Server, futures.ThreadPoolExecutor]:
    """grpcio's threaded server: its per-call work runs on `workers` threads (measured about
    1.6x the calls per second of grpc.aio on one core, see README), each call handed to the
    serving event loop, so the data plane (batching, routing, recorder) stays on one thread.
    `workers` bounds the calls in flight, so it must be at least the concurrency batching
    should merge."""
    pool = futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="servo-grpc")
    server = grpc.server(pool, options=_options(max_message_bytes), maximum_concurrent_rpcs=None)
    servicer = _ThreadedServicer(InferenceServicer(dataplane), loop)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    return server, pool
