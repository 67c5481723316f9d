"""The serving process, built in order: repository -> data plane -> REST and gRPC servers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field

import uvicorn
from prometheus_client import CollectorRegistry

from serving.app import build_app
from serving.batcher import BatchingConfig
from serving.dataplane import DataPlane
from serving.feedback import Authenticate
from serving.gateway import Gateway
from serving.grpc_server import build_server, build_threaded_server
from serving.http import AsgiApp
from serving.httplimits import HttpLimits, HttpStats
from serving.httpserver import NativeHttpServer
from serving.offloop import OffloopDecoder
from serving.payload_log import PayloadLog, PayloadLogConfig
from serving.recorder import Recorder
from serving.repository import ModelRepository
from serving.router import Router
from serving.routes import RouteSource
from serving.runtime import RemoteOptions, RuntimeOptions
from serving.shadow import ShadowRunner

log = logging.getLogger("servo.serving")


@dataclass(frozen=True, slots=True)
class ServingConfig:
    host: str = "127.0.0.1"
    http_port: int = 8080
    grpc_port: int = 8081
    grpc_enabled: bool = True
    max_request_bytes: int = 64 * 1024 * 1024
    #: REST bodies larger than this are decoded in a worker process, off the event loop
    #: (0: every body on the loop)
    offloop_decode_bytes: int = 1024 * 1024
    offloop_decode_workers: int = 1
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)
    #: remote versions (a route's `url`): timeout, circuit breaker, pool
    remote: RemoteOptions = field(default_factory=RemoteOptions)
    executor_threads: int = 4
    server_name: str = "servo"
    server_version: str = "0"
    shadow_max_pending: int = 64
    shadow_timeout_s: float = 5.0
    drain_timeout_s: float = 30.0
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    #: metrics on; off only to measure their cost (benchmarks)
    recording: bool = True
    #: None: no payload log (feedback is still counted, but not stored)
    payload_log: PayloadLogConfig | None = None
    feedback_index_size: int = 100_000
    #: "native" (serving.httpserver, the default) or "uvicorn" (the same app over ASGI)
    http_server: str = "native"
    #: the native server's limits and timeouts against slow, huge or hostile clients
    http_limits: HttpLimits = field(default_factory=HttpLimits)
    grpc_server: str = "threaded"
    grpc_workers: int = 128


class _Uvicorn(uvicorn.Server):
    """uvicorn without its own signal handling: the serving process owns signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class Server:
    def __init__(
        self,
        config: ServingConfig,
        source: RouteSource,
        registry: CollectorRegistry | None = None,
        authenticate: Authenticate | None = None,
    ):
        self.config = config
        #: who sends feedback (servo backs it with the registry's tokens); None: open
        self.authenticate = authenticate
        self.source = source
        self.registry = registry if registry is not None else CollectorRegistry()
        self.recorder = Recorder(self.registry)
        self.payload_log = PayloadLog(config.payload_log) if config.payload_log else None
        self.recorder.payload_log = self.payload_log
        self.repository = ModelRepository(config.runtime, config.executor_threads, config.remote)
        self.router = Router()
        self.shadows = ShadowRunner(
            self.recorder, config.shadow_max_pending, config.shadow_timeout_s
        )
        self.shadows.payload_log = self.payload_log
        self.gateway = Gateway(
            repository=self.repository,
            router=self.router,
            recorder=self.recorder,
            batching=config.batching,
            drain_timeout_s=config.drain_timeout_s,
            recording=config.recording,
        )
        self.dataplane = DataPlane(
            repository=self.repository,
            router=self.router,
            recorder=self.recorder,
            shadows=self.shadows,
            server_name=config.server_name,
            server_version=config.server_version,
            recording=config.recording,
            payload_log=self.payload_log,
            feedback_index_size=config.feedback_index_size,
            offloop=OffloopDecoder(config.offloop_decode_bytes, config.offloop_decode_workers),
        )
        self.http_port: int | None = None
        self.grpc_port: int | None = None
        self._stop = asyncio.Event()

    def stop(self) -> None:
        self._stop.set()

    async def _follow_routes(self) -> None:
        async for table in self.source.updates():
            try:
                await self.gateway.apply(table)
            except Exception:
                log.exception("route table not applied")
            log.info("routes applied (%d); ready: %s", self.gateway.applied, self.dataplane.ready())

    async def _start_native(self, app: AsgiApp, sock: socket.socket) -> NativeHttpServer:
        stats = HttpStats()
        self.registry.register(stats)  # servo_http_* on /metrics
        config = self.config
        native = NativeHttpServer(app, config.max_request_bytes, config.http_limits, stats)
        await native.start(sock)
        return native

    async def run(self) -> None:
        """Start both servers, load the models (health answers while they load), serve
        until `stop()`, then drain and close."""
        config = self.config
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((config.host, config.http_port))
        self.http_port = sock.getsockname()[1]
        app = build_app(self.dataplane, self.registry, config.max_request_bytes, self.authenticate)
        native: NativeHttpServer | None = None
        http: _Uvicorn | None = None
        http_task: asyncio.Task[None] | None = None
        if config.http_server == "native":
            native = await self._start_native(app, sock)
        else:
            http = _Uvicorn(
                uvicorn.Config(
                    app,
                    loop="none",
                    http="httptools",
                    lifespan="off",
                    access_log=False,
                    log_config=None,
                    timeout_keep_alive=int(config.http_limits.keepalive_s),
                    proxy_headers=False,
                )
            )
            http_task = asyncio.create_task(http.serve(sockets=[sock]))
        grpc_server = None
        threaded = None
        if config.grpc_enabled and config.grpc_server == "aio":
            grpc_server = build_server(self.dataplane, config.max_request_bytes)
            self.grpc_port = grpc_server.add_insecure_port(f"{config.host}:{config.grpc_port}")
            await grpc_server.start()
        elif config.grpc_enabled:
            threaded, pool = build_threaded_server(
                self.dataplane,
                config.max_request_bytes,
                loop=asyncio.get_running_loop(),
                workers=config.grpc_workers,
            )
            self.grpc_port = threaded.add_insecure_port(f"{config.host}:{config.grpc_port}")
            threaded.start()
        log.info(
            "serving on http://%s:%s (REST) and %s:%s (gRPC)",
            config.host,
            self.http_port,
            config.host,
            self.grpc_port,
        )
        follow = asyncio.create_task(self._follow_routes())
        try:
            await self._stop.wait()
        finally:
            follow.cancel()
            if native is not None:
                await native.stop()
            if http is not None and http_task is not None:
                http.should_exit = True
                await http_task
            if grpc_server is not None:
                await grpc_server.stop(grace=5)
            if threaded is not None:
                # in-flight calls finish on this loop while a worker thread waits for them
                stopped = threaded.stop(grace=5)
                await asyncio.get_running_loop().run_in_executor(None, stopped.wait)
                pool.shutdown(wait=False)
            sock.close()
            await self._close_workers()

    async def _close_workers(self) -> None:
        """What runs beside the servers: decoding worker, shadows, payload log, sessions."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.dataplane.offloop.close)
        await self.shadows.close()
        if self.payload_log is not None:
            await loop.run_in_executor(None, self.payload_log.close)
        self.repository.close()
