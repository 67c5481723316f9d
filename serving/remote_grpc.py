"""The OIP gRPC transport of a remote version (`grpc://host:port` route urls): one
`grpc.aio` channel per version for requests on the event loop, a sync channel (opened at
the first shadow copy) for those on worker threads; inputs and outputs as raw contents.

gRPC status codes map to the gateway's errors once, here: UNAVAILABLE -> 503 and
DEADLINE_EXCEEDED -> 504 (backend failures), the client's errors (INVALID_ARGUMENT,
NOT_FOUND, RESOURCE_EXHAUSTED, ...) -> their 4xx with the backend's message, anything
else (INTERNAL, UNKNOWN, ...) -> 502.
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Sequence
from http import HTTPStatus
from typing import Any

import grpc
import numpy as np

from serving.codecs import encode_binary
from serving.errors import ModelLoadError, ServingError
from serving.grpc_codec import decode_response
from serving.grpc_stubs import pb, pb_grpc
from serving.remote import (
    BackendRefused,
    BackendTimeout,
    BackendUnavailable,
    BadGateway,
    MetadataPending,
    Outputs,
    RemoteError,
    Signed,
    checked_outputs,
    malformed,
)
from serving.runtime import Arrays, RemoteOptions

#: gRPC codes that are the client's error -> the HTTP status passed on
REFUSED: dict[grpc.StatusCode, HTTPStatus] = {
    grpc.StatusCode.INVALID_ARGUMENT: HTTPStatus.BAD_REQUEST,
    grpc.StatusCode.FAILED_PRECONDITION: HTTPStatus.BAD_REQUEST,
    grpc.StatusCode.OUT_OF_RANGE: HTTPStatus.BAD_REQUEST,
    grpc.StatusCode.NOT_FOUND: HTTPStatus.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS: HTTPStatus.CONFLICT,
    grpc.StatusCode.ABORTED: HTTPStatus.CONFLICT,
    grpc.StatusCode.RESOURCE_EXHAUSTED: HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
    grpc.StatusCode.UNIMPLEMENTED: HTTPStatus.METHOD_NOT_ALLOWED,
    grpc.StatusCode.PERMISSION_DENIED: HTTPStatus.FORBIDDEN,
    grpc.StatusCode.UNAUTHENTICATED: HTTPStatus.UNAUTHORIZED,
}
#: codes worth another metadata read at load (the backend is starting)
PENDING = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)

_OPTIONS = [
    ("grpc.max_receive_message_length", -1),
    ("grpc.max_send_message_length", -1),
    # a backend that is starting (or restarting) is reached within a second of it being up,
    # not after grpcio's default reconnect backoff (1 s growing to 120 s)
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


def _code(exc: grpc.RpcError) -> tuple[grpc.StatusCode, str]:
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return code, str(details or "")


class GrpcTransport(Signed):
    def __init__(self, target: str, name: str, version: str, remote: RemoteOptions, where: str):
        super().__init__(remote, where)
        self.target, self.name, self.version = target, name, version
        self._channel = grpc.aio.insecure_channel(target, options=_OPTIONS)
        self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)
        self._sync_channel: grpc.Channel | None = None
        self._sync_stub: Any = None
        self._lock = threading.Lock()

    async def metadata(self, timeout_s: float) -> dict[str, Any]:
        request = pb.ModelMetadataRequest(name=self.name, version=self.version)
        try:
            reply = await self._stub.ModelMetadata(request, timeout=timeout_s)
        except grpc.RpcError as exc:
            code, details = _code(exc)
            if code in PENDING:
                raise MetadataPending(f"{code.name}: {details}") from None
            raise ModelLoadError(
                f"{self.where}: metadata answered {code.name}: {details}"
            ) from None

        def tensors(items: Any) -> list[dict[str, Any]]:
            return [
                {"name": t.name, "datatype": t.datatype, "shape": [int(d) for d in t.shape]}
                for t in items
            ]

        return {
            "name": reply.name,
            "versions": list(reply.versions),
            "platform": reply.platform,
            "inputs": tensors(reply.inputs),
            "outputs": tensors(reply.outputs),
        }

    def _request(self, inputs: Arrays, outputs: Sequence[str]) -> Any:
        message = pb.ModelInferRequest(model_name=self.name, model_version=self.version)
        for name, array in inputs.items():
            item = message.inputs.add()
            item.name, item.datatype = name, self._in_types[name]
            item.shape.extend(array.shape)
            message.raw_input_contents.append(encode_binary(item.datatype, array))
        for name in outputs:
            message.outputs.add().name = name
        return message

    def _answer(self, reply: Any, outputs: Sequence[str]) -> Outputs:
        try:
            response = decode_response(reply)
            found = {t.name: (t.datatype, np.array(t.data)) for t in response.outputs}
            return checked_outputs(found, self._out_types, outputs)
        except (KeyError, TypeError, ValueError, ServingError) as exc:
            raise malformed(self.where, exc) from None

    def _error(self, exc: grpc.RpcError) -> RemoteError:
        code, details = _code(exc)
        if code in REFUSED:  # an answer: the backend is up
            return BackendRefused(REFUSED[code], f"{self.where}: {details}")
        if code is grpc.StatusCode.DEADLINE_EXCEEDED:
            message = f"no answer in {self.remote.timeout_s} s"
            return BackendTimeout(f"{self.where}: {message}", message)
        if code is grpc.StatusCode.UNAVAILABLE:
            return BackendUnavailable(f"{self.where}: unavailable ({details})", code.name)
        return BadGateway(f"{self.where}: {details} ({code.name})", code.name)

    async def infer(self, inputs: Arrays, outputs: Sequence[str]) -> Outputs:
        request = self._request(inputs, outputs)
        try:
            reply = await self._stub.ModelInfer(request, timeout=self.remote.timeout_s)
        except grpc.RpcError as exc:
            raise self._error(exc) from None
        return self._answer(reply, outputs)

    def infer_blocking(self, inputs: Arrays, outputs: Sequence[str]) -> Outputs:
        with self._lock:
            if self._sync_channel is None:
                self._sync_channel = grpc.insecure_channel(self.target, options=_OPTIONS)
                self._sync_stub = pb_grpc.GRPCInferenceServiceStub(self._sync_channel)
            stub = self._sync_stub
        request = self._request(inputs, outputs)
        try:
            reply = stub.ModelInfer(request, timeout=self.remote.timeout_s)
        except grpc.RpcError as exc:
            raise self._error(exc) from None
        return self._answer(reply, outputs)

    def close(self) -> Awaitable[None]:
        with self._lock:
            if self._sync_channel is not None:
                self._sync_channel.close()
                self._sync_channel = None
        closing: Awaitable[None] = self._channel.close()
        return closing
