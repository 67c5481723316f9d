"""A model version served elsewhere over OIP (a KServe InferenceService, another Servo
server), standing where an OnnxModel stands in the repository and the router.

The route's url picks the transport: `http(s)://host:port` talks OIP REST in the binary
tensor format over one pooled keep-alive `aiohttp.ClientSession` per version (shadow
copies, which run on a worker thread, over a pooled `httpx.Client`); `grpc://host:port` talks OIP
gRPC over one `grpc.aio` channel per version (shadow copies over a sync channel), raw
contents (serving.remote_grpc). Both share what follows.

Every request has a timeout. A circuit breaker counts consecutive backend failures
(connection errors, timeouts, 5xx answers, gRPC UNAVAILABLE / DEADLINE_EXCEEDED /
INTERNAL): `failures` of them open it for `cooldown_s`, and while it is open requests fail
at once with a 503 naming the backend; after the cool-down one request probes it (success
closes it). The backend's 4xx answers (gRPC INVALID_ARGUMENT, NOT_FOUND, ...) are the
client's errors: they pass through with their status and the backend's message and count
as no failure.

The metadata read at load is retried with backoff within `metadata_timeout_s` while the
backend is unreachable or answers 5xx (a pod still starting); a 4xx answer fails the load
at once.

Batching at the edge: a remote version batches like a local one (under the route's
batching config; automatic: on, as it runs off the event loop): concurrent requests are
merged into one backend request, rows concatenated, answers split. Up to
`batches_in_flight` merged requests go to the backend at once; a merged request the
backend refuses (4xx) runs again request by request, one that meets an unavailable
backend fails all of its requests at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import httpx
import numpy as np
import numpy.typing as npt
import orjson

from serving.batcher import Batcher, BatchingConfig, CallObserver, Queued
from serving.codecs import decode_binary, decode_json, encode_binary
from serving.datatypes import NUMPY_DTYPES
from serving.errors import ModelLoadError, ServingError
from serving.model_folder import ModelCard, read_card
from serving.runtime import Arrays, OnnxModel, RemoteOptions, RuntimeOptions
from serving.signature import Signature, TensorSpec

log = logging.getLogger("servo.serving")
logging.getLogger("httpx").setLevel(logging.WARNING)  # not a log line per request

Outputs = list[npt.NDArray[Any]]


class RemoteError(ServingError):
    """A remote call that failed; `reason` (None: the backend answered, it is up) is what
    the circuit breaker records as a failure."""

    status = HTTPStatus.SERVICE_UNAVAILABLE

    def __init__(self, message: str, reason: str | None):
        super().__init__(message)
        self.reason = reason


class BackendUnavailable(RemoteError):
    status = HTTPStatus.SERVICE_UNAVAILABLE


class BadGateway(RemoteError):
    status = HTTPStatus.BAD_GATEWAY


class BackendTimeout(RemoteError):
    status = HTTPStatus.GATEWAY_TIMEOUT


class BackendRefused(RemoteError):
    """The backend's own 4xx answer, with its status and message."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message, None)
        self.status = status


class MetadataPending(Exception):
    """The metadata is not readable yet (backend unreachable, 5xx): worth another try."""


class Transport(Protocol):
    """One protocol's calls to one backend version (REST here, gRPC in remote_grpc).
    `infer` raises RemoteError; `metadata` MetadataPending or ModelLoadError."""

    async def metadata(self, timeout_s: float) -> dict[str, Any]: ...

    async def infer(self, inputs: Arrays, outputs: Sequence[str]) -> Outputs: ...

    def infer_blocking(self, inputs: Arrays, outputs: Sequence[str]) -> Outputs: ...

    def bind(self, signature: Signature) -> None: ...

    def close(self) -> Awaitable[None] | None: ...


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


def checked_outputs(
    found: dict[str, tuple[str, npt.NDArray[Any]]], types: dict[str, str], outputs: Sequence[str]
) -> Outputs:
    """The requested outputs of a backend's answer (name -> datatype, array), each of the
    signature's datatype; ValueError or KeyError when not."""
    result = []
    for name in outputs:
        datatype, array = found[name]
        if datatype != types[name]:
            raise ValueError(f"output '{name}' is {datatype}, not {types[name]}")
        result.append(array)
    return result


def malformed(where: str, error: Exception) -> BadGateway:
    return BadGateway(f"{where}: malformed answer ({error})", "malformed answer")


def _message(content: bytes) -> str:
    try:
        doc = orjson.loads(content)
        error = doc.get("error") if isinstance(doc, dict) else None
    except orjson.JSONDecodeError:
        error = None
    return str(error) if error else content[:200].decode("utf-8", "replace")


class Signed:
    """What a transport knows of its version: the datatypes of its inputs and outputs."""

    def __init__(self, remote: RemoteOptions, where: str):
        self.remote, self.where = remote, where
        self._in_types: dict[str, str] = {}
        self._out_types: dict[str, str] = {}

    def bind(self, signature: Signature) -> None:
        self._in_types = {s.name: s.datatype for s in signature.inputs}
        self._out_types = {s.name: s.datatype for s in signature.outputs}


class RestTransport(Signed):
    """OIP REST, binary tensor extension, pooled keep-alive connections: aiohttp on the
    event loop (measured about 10x the requests per second of httpx's AsyncClient at 16
    concurrent requests), httpx's sync client on worker threads."""

    def __init__(self, url: str, name: str, version: str, remote: RemoteOptions, where: str):
        super().__init__(remote, where)
        self.url = url
        self._model_url = f"{url}/v2/models/{name}/versions/{version}"
        self._client = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=remote.max_connections),
            timeout=aiohttp.ClientTimeout(total=remote.timeout_s),
        )
        limits = httpx.Limits(
            max_connections=remote.max_connections,
            max_keepalive_connections=remote.max_connections,
        )
        self._sync = httpx.Client(limits=limits, timeout=remote.timeout_s)

    async def metadata(self, timeout_s: float) -> dict[str, Any]:
        try:
            timeout = aiohttp.ClientTimeout(total=timeout_s)
            async with self._client.get(self._model_url, timeout=timeout) as response:
                status, content = response.status, await response.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise MetadataPending(f"{type(exc).__name__}: {exc}") from None
        if status >= 500:
            raise MetadataPending(f"answered {status}: {_message(content)}")
        if status != 200:
            raise ModelLoadError(f"{self.where}: metadata answered {status}: {_message(content)}")
        try:
            doc = orjson.loads(content)
        except orjson.JSONDecodeError:
            raise ModelLoadError(f"{self.where}: metadata is not JSON") from None
        if not isinstance(doc, dict):
            raise ModelLoadError(f"{self.where}: metadata is not a JSON object")
        return doc

    def _body(self, inputs: Arrays, outputs: Sequence[str]) -> tuple[bytes, dict[str, str]]:
        head: list[dict[str, Any]] = []
        blobs: list[bytes] = []
        for name, array in inputs.items():
            blob = encode_binary(self._in_types[name], array)
            head.append(
                {
                    "name": name,
                    "datatype": self._in_types[name],
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

    def _answer(
        self, status: int, length: str | None, body: bytes, outputs: Sequence[str]
    ) -> Outputs:
        if status != 200:
            message = f"{self.where}: {_message(body)}"
            if 400 <= status < 500:  # an answer: the backend is up
                known = status in HTTPStatus._value2member_map_
                raise BackendRefused(HTTPStatus(status if known else 400), message)
            raise BadGateway(f"{message} (answered {status})", f"answered {status}")
        try:
            size = int(length) if length is not None else len(body)
            doc = orjson.loads(body[:size])
            offset = size
            found: dict[str, tuple[str, npt.NDArray[Any]]] = {}
            for item in doc["outputs"]:
                shape = [int(d) for d in item["shape"]]
                blob_size = (item.get("parameters") or {}).get("binary_data_size")
                if blob_size is None:
                    array = decode_json(item["name"], item["datatype"], shape, item["data"])
                else:
                    raw = body[offset : offset + int(blob_size)]
                    offset += int(blob_size)
                    array = np.array(  # owns its memory
                        decode_binary(item["name"], item["datatype"], shape, raw)
                    )
                found[item["name"]] = (item["datatype"], array)
            return checked_outputs(found, self._out_types, outputs)
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, ServingError) as exc:
            raise malformed(self.where, exc) from None

    def _timeout(self) -> RemoteError:
        message = f"no answer in {self.remote.timeout_s} s"
        return BackendTimeout(f"{self.where}: {message}", message)

    def _unreachable(self, exc: Exception) -> RemoteError:
        name = type(exc).__name__
        return BackendUnavailable(f"{self.where}: unreachable ({name}: {exc})", name)

    async def infer(self, inputs: Arrays, outputs: Sequence[str]) -> Outputs:
        body, headers = self._body(inputs, outputs)
        try:
            url = f"{self._model_url}/infer"
            async with self._client.post(url, data=body, headers=headers) as response:
                status, content = response.status, await response.read()
                length = response.headers.get("inference-header-content-length")
        except TimeoutError:
            raise self._timeout() from None
        except aiohttp.ClientError as exc:
            raise self._unreachable(exc) from None
        return self._answer(status, length, content, outputs)

    def infer_blocking(self, inputs: Arrays, outputs: Sequence[str]) -> Outputs:
        body, headers = self._body(inputs, outputs)
        try:
            response = self._sync.post(f"{self._model_url}/infer", content=body, headers=headers)
        except httpx.TimeoutException:
            raise self._timeout() from None
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from None
        length = response.headers.get("inference-header-content-length")
        return self._answer(response.status_code, length, response.content, outputs)

    def close(self) -> Awaitable[None]:
        self._sync.close()
        return self._client.close()


def transport_for(
    url: str, name: str, version: str, remote: RemoteOptions, where: str
) -> Transport:
    if url.startswith("grpc://"):
        from serving.remote_grpc import GrpcTransport  # grpcio only where a route needs it

        return GrpcTransport(url.removeprefix("grpc://"), name, version, remote, where)
    return RestTransport(url, name, version, remote, where)


async def read_metadata(transport: Transport, where: str, timeout_s: float) -> dict[str, Any]:
    """The backend's metadata, tried again with backoff (50 ms doubling to 1 s) while it is
    pending, for at most `timeout_s`; ModelLoadError saying why not."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    delay, attempts = 0.05, 0
    while True:
        attempts += 1
        try:
            return await transport.metadata(max(deadline - loop.time(), 0.001))
        except MetadataPending as exc:
            left = deadline - loop.time()
            if left <= 0:
                raise ModelLoadError(
                    f"{where}: metadata not read in {timeout_s} s ({attempts} attempts; "
                    f"last: {exc})"
                ) from None
            await asyncio.sleep(min(delay, left))
            delay = min(delay * 2, 1.0)


class RemoteBatcher(Batcher):
    """A batcher whose merged call goes to the backend on the event loop, several at once."""

    def __init__(
        self,
        call: Callable[[Arrays, Sequence[str]], Awaitable[Outputs]],
        run: Callable[[Arrays, Sequence[str]], Outputs],
        executor: ThreadPoolExecutor,
        config: BatchingConfig,
        observer: CallObserver | None,
        *,
        in_flight: int,
    ):
        super().__init__(run, executor, config, observer)
        self._remote_call = call
        self._slots = asyncio.Semaphore(in_flight)
        self._running: set[asyncio.Task[None]] = set()

    async def _call(self, inputs: Arrays, outputs: Sequence[str]) -> Outputs:
        return await self._remote_call(inputs, outputs)

    def _retry_alone(self, error: ServingError) -> bool:
        return isinstance(error, BackendRefused)

    async def _dispatch(self, batch: list[Queued]) -> None:
        await self._slots.acquire()  # what arrives while it waits forms the next batch

        async def run() -> None:
            try:
                await self._run(batch)
            finally:
                self._slots.release()

        task = asyncio.get_running_loop().create_task(run())
        self._running.add(task)
        task.add_done_callback(self._running.discard)


class RemoteModel(OnnxModel):
    """A remote version: its signature from the backend's metadata, its answers from the
    backend."""

    platform = "remote"

    def __init__(
        self,
        url: str,
        card: ModelCard,
        options: RuntimeOptions,
        executor: ThreadPoolExecutor,
        remote: RemoteOptions,
        *,
        transport: Transport,
    ):
        super().__init__(Path(url), card, options, executor)
        self.url = url
        self.remote = remote
        self.breaker = CircuitBreaker(remote.failures, remote.cooldown_s)
        self.where = f"backend {url} (model '{card.name}' version {card.version})"
        self.transport = transport
        transport.bind(card.signature)
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
        """Read the version's metadata from the backend (retried within
        `metadata_timeout_s`); ModelLoadError saying why not. A `card_folder` gives the
        model card (reference profile); its signature must be the backend's."""
        remote = remote or RemoteOptions()
        where = f"{url} model '{name}' version {version}"
        transport = transport_for(
            url, name, version, remote, f"backend {url} (model '{name}' version {version})"
        )
        try:
            doc = await read_metadata(transport, where, remote.metadata_timeout_s)
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
        except ModelLoadError:
            _close(transport)
            raise
        model = cls(url, card, options, executor, remote, transport=transport)
        if isinstance(doc.get("platform"), str) and doc["platform"]:
            model.platform = doc["platform"]  # the backend's runtime, as a client sees it
        model.profile = model._read_profile()
        return model

    def load(self) -> None:  # the metadata is read by open()
        pass

    def _new_batcher(self, config: BatchingConfig) -> Batcher:
        return RemoteBatcher(
            self._call,
            self._call_blocking,
            self._executor,
            config,
            self.observer,
            in_flight=self.remote.batches_in_flight,
        )

    def _gate(self) -> None:
        left = self.breaker.check()
        if left is not None:
            raise BackendUnavailable(
                f"{self.where}: circuit open after {self.breaker.consecutive} consecutive "
                f"failures (last: {self.breaker.last_error}); next try in {left:.1f} s",
                None,
            )

    def _account(self, error: RemoteError) -> None:
        if error.reason is None:
            self.breaker.success()
        else:
            self.breaker.failure(error.reason)

    async def _call(self, inputs: Arrays, outputs: Sequence[str]) -> Outputs:
        self._gate()
        try:
            result = await self.transport.infer(inputs, outputs)
        except RemoteError as exc:
            self._account(exc)
            raise
        self.breaker.success()
        return result

    def _call_blocking(self, inputs: Arrays, outputs: Sequence[str]) -> Outputs:
        self._gate()
        try:
            result = self.transport.infer_blocking(inputs, outputs)
        except RemoteError as exc:
            self._account(exc)
            raise
        self.breaker.success()
        return result

    async def predict(self, inputs: Arrays, outputs: Sequence[str] | None = None) -> Outputs:
        names = self._output_names if outputs is None else outputs
        self.inflight += 1
        try:
            if self.batcher is not None:
                return await self.batcher.submit(inputs, names)
            started = time.perf_counter()
            result = await self._call(inputs, names)
        finally:
            self.inflight -= 1
        if self.observer is not None:
            rows = next(iter(inputs.values())).shape
            self.observer.call(rows[0] if rows else 1, time.perf_counter() - started)
        return result

    def run_blocking(self, inputs: Arrays) -> dict[str, npt.NDArray[Any]]:
        arrays = self._call_blocking(inputs, self._output_names)
        return dict(zip(self._output_names, arrays, strict=True))

    def unload(self) -> None:
        super().unload()
        _close(self.transport)

    def __repr__(self) -> str:
        return f"RemoteModel({self.name!r}, version={self.version!r}, url={self.url!r})"


def _close(transport: Transport) -> None:
    closing = transport.close()
    if closing is None:
        return
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        if asyncio.iscoroutine(closing):
            closing.close()  # no loop left to run it on: the process is ending
        return
    task = loop.create_task(_awaited(closing))
    _closing.add(task)
    task.add_done_callback(_closing.discard)


async def _awaited(closing: Awaitable[None]) -> None:
    await closing


_closing: set[asyncio.Task[None]] = set()
