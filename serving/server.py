"""The serving process, built in order: repository -> data plane -> REST and gRPC servers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn

from serving.app import build_app
from serving.dataplane import DataPlane
from serving.grpc_server import build_server
from serving.repository import ModelRepository
from serving.runtime import RuntimeOptions

log = logging.getLogger("servo.serving")


@dataclass(frozen=True, slots=True)
class ServingConfig:
    host: str = "127.0.0.1"
    http_port: int = 8080
    grpc_port: int = 8081
    grpc_enabled: bool = True
    max_request_bytes: int = 64 * 1024 * 1024
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)
    executor_threads: int = 4
    server_name: str = "servo"
    server_version: str = "0"


class _Uvicorn(uvicorn.Server):
    """uvicorn without its own signal handling: the serving process owns signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class Server:
    def __init__(self, config: ServingConfig, folders: Sequence[Path]):
        self.config = config
        self.folders = list(folders)
        self.repository = ModelRepository(config.runtime, config.executor_threads)
        self.dataplane = DataPlane(self.repository, config.server_name, config.server_version)
        self.http_port: int | None = None
        self.grpc_port: int | None = None
        self._stop = asyncio.Event()

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        """Start both servers, load the models (health answers while they load), serve
        until `stop()`, then drain and close."""
        config = self.config
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((config.host, config.http_port))
        self.http_port = sock.getsockname()[1]
        app = build_app(self.dataplane, config.max_request_bytes)
        http = _Uvicorn(
            uvicorn.Config(
                app,
                loop="none",
                http="httptools",
                lifespan="off",
                access_log=False,
                log_config=None,
                timeout_keep_alive=65,
                proxy_headers=False,
            )
        )
        http_task = asyncio.create_task(http.serve(sockets=[sock]))
        grpc_server = None
        if config.grpc_enabled:
            grpc_server = build_server(self.dataplane, config.max_request_bytes)
            self.grpc_port = grpc_server.add_insecure_port(f"{config.host}:{config.grpc_port}")
            await grpc_server.start()
        log.info(
            "serving on http://%s:%s (REST) and %s:%s (gRPC)",
            config.host,
            self.http_port,
            config.host,
            self.grpc_port,
        )
        loop = asyncio.get_running_loop()
        for folder in self.folders:
            await loop.run_in_executor(None, self.repository.load_folder, folder)
        log.info("ready: %s", self.dataplane.ready())
        try:
            await self._stop.wait()
        finally:
            http.should_exit = True
            if grpc_server is not None:
                await grpc_server.stop(grace=5)
            await http_task
            sock.close()
            self.repository.close()
