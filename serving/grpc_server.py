"""OIP gRPC service `inference.GRPCInferenceService` over the shared data plane."""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

import grpc

from serving import grpc_codec
from serving.dataplane import DataPlane
from serving.errors import InvalidInput, ServingError
from serving.grpc_stubs import pb, pb_grpc

STATUS_CODES: dict[HTTPStatus, grpc.StatusCode] = {
    HTTPStatus.BAD_REQUEST: grpc.StatusCode.INVALID_ARGUMENT,
    HTTPStatus.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    HTTPStatus.METHOD_NOT_ALLOWED: grpc.StatusCode.UNIMPLEMENTED,
    HTTPStatus.REQUEST_ENTITY_TOO_LARGE: grpc.StatusCode.RESOURCE_EXHAUSTED,
    HTTPStatus.SERVICE_UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    HTTPStatus.INTERNAL_SERVER_ERROR: grpc.StatusCode.INTERNAL,
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
        try:
            if not request.model_name:
                raise InvalidInput("model_name is required")
            infer_request = grpc_codec.decode_request(request)
            response = await self.dataplane.infer(
                request.model_name, request.model_version or None, infer_request
            )
            return grpc_codec.encode_response(response, raw=bool(request.raw_input_contents))
        except ServingError as exc:
            await _abort(context, exc)


def build_server(dataplane: DataPlane, max_message_bytes: int) -> grpc.aio.Server:
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", -1),
            ("grpc.so_reuseport", 0),
        ]
    )
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(dataplane), server)
    return server
