"""Our own OIP clients for the conformance suite: REST (JSON, binary) and gRPC (typed, raw).

Errors come back as `OipError(status, message)` with an HTTP status on every protocol
(gRPC codes mapped back), so one test checks all four.
"""

from __future__ import annotations

from typing import Any

import grpc
import httpx
import orjson

from serving import grpc_codec
from serving.codecs import decode_binary, decode_json, encode_binary
from serving.grpc_stubs import pb, pb_grpc
from serving.types import InferRequest, InferResponse, RequestedOutput, Tensor

GRPC_TO_HTTP = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 413,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.INTERNAL: 500,
}


class OipError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


def _path(name: str, version: str | None) -> str:
    return f"/v2/models/{name}" + (f"/versions/{version}" if version else "")


class RestClient:
    def __init__(self, url: str, binary: bool):
        self.protocol = "rest-binary" if binary else "rest-json"
        self.binary = binary
        self.http = httpx.Client(base_url=url, timeout=30)

    def close(self) -> None:
        self.http.close()

    def _get(self, path: str) -> httpx.Response:
        return self.http.get(path)

    def live(self) -> bool:
        return self._get("/v2/health/live").status_code == 200

    def ready(self) -> bool:
        return self._get("/v2/health/ready").status_code == 200

    def model_ready(self, name: str, version: str | None = None) -> bool:
        reply = self._get(_path(name, version) + "/ready")
        if reply.status_code == 404:
            raise OipError(404, reply.json()["error"])
        return reply.status_code == 200

    def metadata(self, name: str, version: str | None = None) -> dict[str, Any]:
        reply = self._get(_path(name, version))
        if reply.status_code != 200:
            raise OipError(reply.status_code, reply.json()["error"])
        doc: dict[str, Any] = reply.json()
        return doc

    def infer(self, name: str, request: InferRequest, version: str | None = None) -> InferResponse:
        inputs: list[dict[str, Any]] = []
        blobs: list[bytes] = []
        for tensor in request.inputs:
            entry: dict[str, Any] = {
                "name": tensor.name,
                "datatype": tensor.datatype,
                "shape": tensor.shape,
            }
            if self.binary:
                blob = encode_binary(tensor.datatype, tensor.data)
                entry["parameters"] = {"binary_data_size": len(blob)}
                blobs.append(blob)
            elif tensor.datatype == "BYTES":
                entry["data"] = [b.decode() for b in tensor.data.reshape(-1)]
            else:
                entry["data"] = tensor.data.reshape(-1).tolist()
            inputs.append(entry)
        doc: dict[str, Any] = {"inputs": inputs}
        if request.id is not None:
            doc["id"] = request.id
        if request.outputs:
            doc["outputs"] = [{"name": o.name} for o in request.outputs]
        if self.binary:
            doc["parameters"] = {"binary_data_output": True}
        head = orjson.dumps(doc)
        headers = {"Content-Type": "application/json"}
        if self.binary:
            headers = {
                "Content-Type": "application/octet-stream",
                "Inference-Header-Content-Length": str(len(head)),
            }
        reply = self.http.post(
            _path(name, version) + "/infer", content=head + b"".join(blobs), headers=headers
        )
        return parse_rest_reply(reply)


def parse_rest_reply(reply: httpx.Response) -> InferResponse:
    if reply.status_code != 200:
        raise OipError(reply.status_code, reply.json()["error"])
    length = reply.headers.get("inference-header-content-length")
    body = reply.content
    head = body if length is None else body[: int(length)]
    doc = orjson.loads(head)
    offset = 0 if length is None else int(length)
    outputs = []
    for item in doc["outputs"]:
        size = (item.get("parameters") or {}).get("binary_data_size")
        if size is None:
            data = decode_json(item["name"], item["datatype"], item["shape"], item["data"])
        else:
            data = decode_binary(
                item["name"], item["datatype"], item["shape"], body[offset : offset + size]
            )
            offset += size
        outputs.append(Tensor(item["name"], item["datatype"], item["shape"], data))
    return InferResponse(doc["model_name"], doc["model_version"], doc["id"], outputs)


class GrpcClient:
    def __init__(self, target: str, raw: bool):
        self.protocol = "grpc-raw" if raw else "grpc-typed"
        self.raw = raw
        self.channel = grpc.insecure_channel(target)
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def _call(self, method: str, message: Any) -> Any:
        try:
            return getattr(self.stub, method)(message, timeout=30)
        except grpc.RpcError as exc:
            raise OipError(GRPC_TO_HTTP.get(exc.code(), 599), exc.details() or "") from None

    def live(self) -> bool:
        return bool(self._call("ServerLive", pb.ServerLiveRequest()).live)

    def ready(self) -> bool:
        return bool(self._call("ServerReady", pb.ServerReadyRequest()).ready)

    def model_ready(self, name: str, version: str | None = None) -> bool:
        request = pb.ModelReadyRequest(name=name, version=version or "")
        return bool(self._call("ModelReady", request).ready)

    def metadata(self, name: str, version: str | None = None) -> dict[str, Any]:
        reply = self._call(
            "ModelMetadata", pb.ModelMetadataRequest(name=name, version=version or "")
        )
        tensors = {
            key: [
                {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
                for t in getattr(reply, key)
            ]
            for key in ("inputs", "outputs")
        }
        return {
            "name": reply.name,
            "versions": list(reply.versions),
            "platform": reply.platform,
            **tensors,
        }

    def infer(self, name: str, request: InferRequest, version: str | None = None) -> InferResponse:
        message = grpc_codec.encode_request(request, name, raw=self.raw)
        message.model_version = version or ""
        for wanted in request.outputs or []:
            message.outputs.add().name = wanted.name
        return grpc_codec.decode_response(self._call("ModelInfer", message))


def request_of(
    *tensors: Tensor, outputs: list[str] | None = None, id: str | None = None
) -> InferRequest:
    return InferRequest(
        inputs=list(tensors),
        id=id,
        outputs=[RequestedOutput(n) for n in outputs] if outputs else None,
    )
