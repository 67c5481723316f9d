"""Applies route tables: load and warm new versions before they take traffic, swap the
routing state in one step, then unload versions nothing routes to once they drain."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from serving.batcher import BatchingConfig
from serving.recorder import ModelMetrics, Recorder
from serving.repository import Entry, ModelRepository, State
from serving.router import LiveRoute, Router, RoutingState, cut
from serving.routes import ModelRoute, RouteTable
from serving.runtime import OnnxModel

log = logging.getLogger("servo.serving")


class Gateway:
    def __init__(
        self,
        *,
        repository: ModelRepository,
        router: Router,
        recorder: Recorder,
        batching: BatchingConfig | None = None,
        drain_timeout_s: float = 30.0,
        recording: bool = True,
    ):
        self.repository = repository
        self.router = router
        self.recorder = recorder
        self.batching = batching or BatchingConfig()
        self.drain_timeout_s = drain_timeout_s
        self.recording = recording
        self.applied = 0

    def _configure(self, route: ModelRoute) -> None:
        """Metrics and batching for every ready version of the route."""
        for _, deployment in route.deployments():
            model = self._ready(route.name, deployment.version)
            if model is None:
                continue
            if self.recording and model.observer is None:
                model.observer = ModelMetrics(self.recorder, route.name, deployment.version)
                self.recorder.initialise(route.name, deployment.version, model.profile)
            if self.recording and model.profile is not None and model.feature_sink is None:
                model.feature_sink = self.recorder.features(
                    route.name, deployment.version, model.profile
                )
            batching = (
                self.batching if route.batching is None else route.batching.over(self.batching)
            )
            model.configure_batching(batching)

    def _ready(self, name: str, version: str) -> OnnxModel | None:
        entry = self.repository.find(name, version)
        if entry is None or entry.state is not State.READY:
            return None
        return entry.model

    async def _load(self, table: RouteTable) -> list[Entry]:
        """Load what the table names and is not loaded yet. A version whose backend moved
        (its folder <-> a remote url, or another url: an InferenceService that became
        Ready, or stopped being so) is loaded anew; the entries it replaced are returned,
        to unload once the new routes are installed, and a version whose new backend
        failed to load keeps the old one."""
        loop = asyncio.get_running_loop()
        replaced: list[Entry] = []
        for route in table.models.values():
            for _, deployment in route.deployments():
                entry = self.repository.find(route.name, deployment.version)
                expect = (route.name, deployment.version)
                old = entry if entry is not None and entry.state is State.READY else None
                if old is not None and old.url == deployment.url:
                    if old.url is None and old.folder.resolve() != deployment.path.resolve():
                        log.error(
                            "model %s version %s is loaded from %s; the route names %s "
                            "(a version never changes its files; keeping the loaded one)",
                            route.name, deployment.version, old.folder, deployment.path,
                        )  # fmt: skip
                    continue
                if deployment.url is not None:
                    card = None if deployment.path == Path() else deployment.path
                    loaded = await self.repository.load_remote(deployment.url, expect, card)
                else:
                    loaded = await loop.run_in_executor(
                        None, self.repository.load_folder, deployment.path, expect
                    )
                failures = self.recorder.load_failures
                failures[expect] = failures.get(expect, 0) + int(loaded.state is State.FAILED)
                if old is None:
                    continue
                if loaded.state is State.READY:
                    log.info(
                        "model %s version %s moved from %s to %s", route.name,
                        deployment.version, old.url or old.folder, loaded.url or loaded.folder,
                    )  # fmt: skip
                    replaced.append(old)
                else:  # the new backend is not there (yet): the old one keeps serving
                    self.repository.restore(old)
        return replaced

    def _live(self, route: ModelRoute) -> LiveRoute | None:
        champion = self._ready(route.name, route.champion.version)
        if champion is None:
            return None
        canary = self._ready(route.name, route.canary.version) if route.canary else None
        shadows = []
        for deployment in route.shadows:
            shadow = self._ready(route.name, deployment.version)
            if shadow is not None:
                shadows.append((shadow, cut(deployment.percent)))
        return LiveRoute(
            champion=champion,
            canary=canary,
            canary_cut=cut(route.canary.percent) if route.canary and canary else 0,
            shadows=tuple(shadows),
            roles={d.version: variant for variant, d in route.deployments()},
        )

    async def apply(self, table: RouteTable) -> None:
        table.validate()
        replaced = await self._load(table)
        old = self.router.state
        live: dict[str, LiveRoute] = {}
        champions: dict[str, str] = {}
        keep: set[tuple[str, str]] = set()
        for route in table.models.values():
            champions[route.name] = route.champion.version
            keep.update((route.name, d.version) for _, d in route.deployments())
            self._configure(route)
            new = self._live(route)
            if new is None and route.name in old.live:
                previous = old.live[route.name]
                log.error(
                    "model %s: champion version %s is not ready; version %s keeps serving",
                    route.name, route.champion.version, previous.champion.version,
                )  # fmt: skip
                new = previous
                champions[route.name] = previous.champion.version
                keep.update((route.name, v) for v in previous.roles)
            if new is not None:
                live[route.name] = new
        self.router.install(RoutingState(live=live, champions=champions))
        self.applied += 1
        for moved in replaced:  # a version now served by another backend
            if moved.model is not None:
                if not await moved.model.drain(self.drain_timeout_s):
                    log.warning("%s still busy after %.0f s; unloading anyway", moved.model,
                                self.drain_timeout_s)  # fmt: skip
                moved.model.unload()
        for entry in self.repository.entries():
            if (entry.name, entry.version) not in keep:
                await self.repository.remove(entry.name, entry.version, self.drain_timeout_s)
