"""A model version served elsewhere over OIP REST (a KServe InferenceService, another
Servo server), standing where an OnnxModel stands in the repository and the router.

Requests go over one pooled keep-alive `httpx.AsyncClient` per version (shadow copies,
which run on a worker thread, over a pooled `httpx.Client`), in the binary tensor format,
each with a timeout. A circuit breaker counts consecutive backend failures (connection
errors, timeouts, 5xx answers): `failures` of them open it for `cooldown_s`, and while it
is open requests fail at once with a 503 naming the backend; after the cool-down one
request probes it (success closes it). The backend's 4xx answers are the client's errors:
they pass through with their status and the backend's message and count as no failure.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
import orjson

from serving.batcher import BatchingConfig
from serving.codecs import decode_binary, decode_json, encode_binary
from serving.datatypes import NUMPY_DTYPES
from serving.errors import ModelLoadError, ServingError
from serving.model_folder import ModelCard, read_card
from serving.runtime import Arrays, OnnxModel, RemoteOptions, RuntimeOptions
from serving.signature import Signature, TensorSpec

log = logging.getLogger("servo.serving")
logging.getLogger("httpx").setLevel(logging.WARNING)  # not a log line per request


class BackendUnavailable(ServingError):
    status = HTTPStatus.SERVICE_UNAVAILABLE


class BadGateway(ServingError):
    status = HTTPStatus.BAD_GATEWAY


class BackendTimeout(ServingError):
    status = HTTPStatus.GATEWAY_TIMEOUT


class BackendRefused(ServingError):
    """The backend's own 4xx answer, with its status and message."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


class CircuitBreaker:
    def __init__(self, failures: int, cooldown_s: float):
        self.threshold = failures
        self.cooldown_s = cooldown_s
        self.consecutive = 0
        self.open_until = 0.0
        self.last_error = ""

    def check(self) -> float | None:
        """None when a request may go; else the seconds left until it may."""
        if self.consecutive < self.threshold:
            return None
        left = self.open_until - time.monotonic()
        if left > 0:
            return left
        self.open_until = time.monotonic() + self.cooldown_s  # half-open: one probe goes
        return None

    def success(self) -> None:
        self.consecutive = 0

    def failure(self, error: str) -> None:
        self.consecutive += 1
        self.last_error = error
        if self.consecutive >= self.threshold:
            self.open_until = time.monotonic() + self.cooldown_s

    @property
    def is_open(self) -> bool:
        return self.consecutive >= self.threshold


def _signature(doc: Any, where: str) -> Signature:
    def specs(key: str) -> tuple[TensorSpec, ...]:
        items = doc.get(key) if isinstance(doc, dict) else None
        if not isinstance(items, list) or not items:
            raise ModelLoadError(f"{where}: metadata has no '{key}' list")
        out = []
        for item in items:
            ok = isinstance(item, dict) and isinstance(item.get("name"), str)
            shape = item.get("shape") if ok else None
            if (
                not ok
                or item.get("datatype") not in NUMPY_DTYPES
                or not isinstance(shape, list)
                or not all(type(d) is int and d >= -1 for d in shape)
            ):
                raise ModelLoadError(f"{where}: metadata {key} entry {str(item)[:100]} is invalid")
            out.append(TensorSpec(item["name"], item["datatype"], tuple(shape)))
        return tuple(out)

    return Signature(specs("inputs"), specs("outputs"))


def _message(response: httpx.Response) -> str:
    try:
        doc = orjson.loads(response.content)
        error = doc.get("error") if isinstance(doc, dict) else None
    except orjson.JSONDecodeError:
        error = None
    return str(error) if error else response.content[:200].decode("utf-8", "replace")


class RemoteModel(OnnxModel):
    """A remote version: its signature from the backend's metadata, its answers from the
    backend. Batching at the edge is not done (the backend batches)."""

    platform = "remote"

    def __init__(
        self,
        url: str,
        card: ModelCard,
        options: RuntimeOptions,
        executor: ThreadPoolExecutor,
        remote: RemoteOptions,
    ):
        super().__init__(Path(url), card, options, executor)
        self.url = url
        self.remote = remote
        self.breaker = CircuitBreaker(remote.failures, remote.cooldown_s)
        self.where = f"backend {url} (model '{card.name}' version {card.version})"
        self._infer_url = f"{url}/v2/models/{card.name}/versions/{card.version}/infer"
        limits = httpx.Limits(
            max_connections=remote.max_connections,
            max_keepalive_connections=remote.max_connections,
        )
        self._client = httpx.AsyncClient(limits=limits, timeout=remote.timeout_s)
        self._sync = httpx.Client(limits=limits, timeout=remote.timeout_s)
        self._output_names = [s.name for s in card.signature.outputs]
        self._inline = False

    @classmethod
    async def open(
        cls,
        url: str,
        name: str,
        version: str,
        *,
        card_folder: Path | None,
        options: RuntimeOptions,
        executor: ThreadPoolExecutor,
        remote: RemoteOptions | None = None,
    ) -> RemoteModel:
        """Read the version's metadata from the backend; ModelLoadError saying why not.
        A `card_folder` gives the model card (reference profile); its signature must be
        the backend's."""
        remote = remote or RemoteOptions()
        where = f"{url} model '{name}' version {version}"
        try:
            async with httpx.AsyncClient(timeout=remote.metadata_timeout_s) as client:
                response = await client.get(f"{url}/v2/models/{name}/versions/{version}")
        except httpx.HTTPError as exc:
            raise ModelLoadError(
                f"{where}: metadata not read ({type(exc).__name__}: {exc})"
            ) from None
        if response.status_code != 200:
            raise ModelLoadError(f"{where}: metadata answered {response.status_code}: "
                                 f"{_message(response)}")  # fmt: skip
        try:
            doc = orjson.loads(response.content)
        except orjson.JSONDecodeError:
            raise ModelLoadError(f"{where}: metadata is not JSON") from None
        signature = _signature(doc, where)
        if card_folder is not None:
            card = read_card(card_folder)
            if card.signature != signature or (card.name, card.version) != (name, version):
                raise ModelLoadError(
                    f"{where}: model card in {card_folder} ('{card.name}' version "
                    f"{card.version}, {card.signature.to_json()}) is not the backend's "
                    f"{signature.to_json()}"
                )
        else:
            card = ModelCard(name, version, "remote", "", signature)
        model = cls(url, card, options, executor, remote)
        if isinstance(doc.get("platform"), str) and doc["platform"]:
            model.platform = doc["platform"]  # the backend's runtime, as a client sees it
        model.profile = model._read_profile()
        return model

    def load(self) -> None:  # the metadata is read by open()
        pass

    @property
    def batchable(self) -> bool:
        return False

    def configure_batching(self, config: BatchingConfig) -> bool:
        return False

    def _body(self, inputs: Arrays, outputs: Sequence[str]) -> tuple[bytes, dict[str, str]]:
        specs = {s.name: s for s in self.signature.inputs}
        head: list[dict[str, Any]] = []
        blobs: list[bytes] = []
        for name, array in inputs.items():
            blob = encode_binary(specs[name].datatype, array)
            head.append(
                {
                    "name": name,
                    "datatype": specs[name].datatype,
                    "shape": list(array.shape),
                    "parameters": {"binary_data_size": len(blob)},
                }
            )
            blobs.append(blob)
        doc = {
            "inputs": head,
            "outputs": [{"name": n, "parameters": {"binary_data": True}} for n in outputs],
        }
        header = orjson.dumps(doc)
        return b"".join([header, *blobs]), {
            "Inference-Header-Content-Length": str(len(header)),
            "Content-Type": "application/octet-stream",
        }

    def _answer(self, response: httpx.Response, outputs: Sequence[str]) -> list[npt.NDArray[Any]]:
        status = response.status_code
        if status != 200:
            message = f"{self.where}: {_message(response)}"
            if 400 <= status < 500:  # an answer: the backend is up
                self.breaker.success()
                known = status in HTTPStatus._value2member_map_
                raise BackendRefused(HTTPStatus(status if known else 400), message)
            self.breaker.failure(f"answered {status}")
            raise BadGateway(f"{message} (answered {status})")
        body = response.content
        length = response.headers.get("inference-header-content-length")
        try:
            size = int(length) if length is not None else len(body)
            doc = orjson.loads(body[:size])
            offset = size
            found: dict[str, npt.NDArray[Any]] = {}
            specs = self.plan.outputs
            for item in doc["outputs"]:
                shape = [int(d) for d in item["shape"]]
                if item["datatype"] != specs[item["name"]].datatype:
                    raise ValueError(
                        f"output '{item['name']}' is {item['datatype']}, "
                        f"not {specs[item['name']].datatype}"
                    )
                blob_size = (item.get("parameters") or {}).get("binary_data_size")
                if blob_size is None:
                    found[item["name"]] = decode_json(
                        item["name"], item["datatype"], shape, item["data"]
                    )
                else:
                    raw = body[offset : offset + int(blob_size)]
                    offset += int(blob_size)
                    array = decode_binary(item["name"], item["datatype"], shape, raw)
                    found[item["name"]] = np.array(array)  # owns its memory
            result = [found[name] for name in outputs]
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, ServingError) as exc:
            self.breaker.failure("malformed answer")
            raise BadGateway(f"{self.where}: malformed answer ({exc})") from None
        self.breaker.success()
        return result

    def _gate(self) -> None:
        left = self.breaker.check()
        if left is not None:
            raise BackendUnavailable(
                f"{self.where}: circuit open after {self.breaker.consecutive} consecutive "
                f"failures (last: {self.breaker.last_error}); next try in {left:.1f} s"
            )

    def _transport_error(self, exc: httpx.HTTPError) -> ServingError:
        if isinstance(exc, httpx.TimeoutException):
            self.breaker.failure(f"no answer in {self.remote.timeout_s} s")
            return BackendTimeout(f"{self.where}: no answer in {self.remote.timeout_s} s")
        self.breaker.failure(type(exc).__name__)
        return BackendUnavailable(f"{self.where}: unreachable ({type(exc).__name__}: {exc})")

    async def predict(
        self, inputs: Arrays, outputs: Sequence[str] | None = None
    ) -> list[npt.NDArray[Any]]:
        names = self._output_names if outputs is None else outputs
        self._gate()
        body, headers = self._body(inputs, names)
        self.inflight += 1
        started = time.perf_counter()
        try:
            response = await self._client.post(self._infer_url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            raise self._transport_error(exc) from None
        finally:
            self.inflight -= 1
        result = self._answer(response, names)
        if self.observer is not None:
            rows = next(iter(inputs.values())).shape
            self.observer.call(rows[0] if rows else 1, time.perf_counter() - started)
        return result

    def run_blocking(self, inputs: Arrays) -> dict[str, npt.NDArray[Any]]:
        self._gate()
        body, headers = self._body(inputs, self._output_names)
        try:
            response = self._sync.post(self._infer_url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            raise self._transport_error(exc) from None
        arrays = self._answer(response, self._output_names)
        return dict(zip(self._output_names, arrays, strict=True))

    def unload(self) -> None:
        self._sync.close()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        task = loop.create_task(self._client.aclose())
        _closing.add(task)
        task.add_done_callback(_closing.discard)

    def __repr__(self) -> str:
        return f"RemoteModel({self.name!r}, version={self.version!r}, url={self.url!r})"


_closing: set[asyncio.Task[None]] = set()
