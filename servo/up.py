"""`servo up`: the closed loop as one service on one machine.

Built in order: registry (SQLite under DIR unless --registry) -> bootstrap (digits, on an
empty registry) -> gateway following the registry's deployments (payload log under
DIR/payload) -> monitors (the gateway's own metrics, or a Prometheus) -> loop metrics on
the gateway's /metrics -> controller (scheduler, trigger, worker, shadow, evidence, gates,
canary rollout judged on the gateway's counts) -> admin API (127.0.0.1 unless
--admin-host). With --no-serve-models (the controller form for Kubernetes: gateway pods
serve the models) the gateway still listens, for /metrics and /v2/health, but routes no
model, and the monitors and the canary judge read the Prometheus that scrapes the gateway
pods (required), each version's reference profile read from its artifact folder. SIGTERM or
SIGINT stops them in reverse: the controller (a running retrain is stopped and marked
interrupted, the scheduler shuts down, canary runners stop: their rollouts resume at the
next start), the admin API, the gateway (in-flight requests finish, the payload log is
flushed).
"""

from __future__ import annotations

import asyncio
import gc
import ipaddress
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from monitors.monitor import MonitorConfig, MonitorExporter, MonitorReport, build_report, monitor
from monitors.sources import EmbeddedSource, PrometheusSource, SourceUnavailable
from servo import logs
from servo.loop_metrics import LoopMetrics

if TYPE_CHECKING:
    from registry.store import RegistryStore
    from serving.server import Server
    from servo.settings import Settings

log = logging.getLogger("servo.up")

#: the model `servo up` trains on an empty registry
BOOTSTRAP_MODEL = "digits"
ACTOR = "servo-up"


@dataclass(frozen=True)
class UpOptions:
    dir: Path
    admin_port: int = 8082
    prometheus_url: str | None = None
    policy_path: Path | None = None
    #: bootstrap parameters (digits pipeline params)
    bootstrap_params: dict[str, Any] | None = None
    #: the admin API's address (every admin route needs a token)
    admin_host: str = "127.0.0.1"
    #: False: the controller form; the gateway routes no model (gateway pods serve them)
    serve_models: bool = True

    def __post_init__(self) -> None:
        if not self.serve_models and not self.prometheus_url:
            raise ValueError(
                "--no-serve-models needs --prometheus URL: this process serves no model, so "
                "its monitors and canary judge must read the Prometheus that scrapes the "
                "gateway pods"
            )
        if not self.admin_host.strip():
            raise ValueError("--admin-host must not be empty (default 127.0.0.1)")


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and "localhost"; False for any other address or name."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def report_admin_exposure(host: str, port: int | None) -> None:
    """The decision logged when the admin API listens beyond loopback (a pod's address:
    reachable from the cluster; every admin route needs a token)."""
    if not is_loopback(host):
        logs.decision(
            "admin_api_exposed",
            level=logging.WARNING,
            host=host,
            port=port,
            reason="bound beyond loopback: every admin route needs a token",
        )


def registry_url_for(directory: Path) -> str:
    return f"sqlite:///{(directory / 'registry.db').resolve()}"


def bootstrap(
    store: RegistryStore, registry_url: str, directory: Path, params: dict[str, Any] | None = None
) -> int:
    """On an empty registry: train digits, register it, make it champion and deploy it.
    Returns the champion version (0: the registry was not empty, nothing done)."""
    if store.models():
        return 0
    from servo.loop_train import train_once

    logs.decision("bootstrap_started", model=BOOTSTRAP_MODEL, reason="empty registry")
    outcome = train_once(registry_url, directory, BOOTSTRAP_MODEL, dict(params or {}), "bootstrap")
    if outcome.version is None:
        raise RuntimeError(
            f"bootstrap training of {BOOTSTRAP_MODEL} failed: {outcome.error} "
            f"(log: {outcome.log_path})"
        )
    version = outcome.version
    store.set_alias(BOOTSTRAP_MODEL, "champion", version, actor=ACTOR, reason="bootstrap")
    store.set_deployments(
        BOOTSTRAP_MODEL, [(version, "champion", 100.0)], actor=ACTOR, reason="bootstrap"
    )
    logs.decision(
        "bootstrapped",
        model=BOOTSTRAP_MODEL,
        version=version,
        run_id=outcome.run_id,
        accuracy=outcome.metrics.get("accuracy"),
    )
    return version


class Reports:
    """Monitor reports for the controller, asked for from its threads: embedded (the
    gateway's own metrics, snapshotted on the serving event loop, where the recorder
    lives) or a Prometheus. Every report also goes to `servo_drift_score` & co."""

    def __init__(
        self,
        server: Server,
        loop: asyncio.AbstractEventLoop,
        *,
        prometheus_url: str | None = None,
        full_s: float = 3600.0,
        keep_s: float = 86400.0,
        store: RegistryStore | None = None,
    ):
        self.server = server
        self.loop = loop
        #: a version the gateway has not loaded: its profile from its registry folder
        self.store = store
        self._folder_profiles: dict[tuple[str, str], tuple[Any, float | None]] = {}
        self.prometheus = PrometheusSource(prometheus_url) if prometheus_url else None
        self.embedded = EmbeddedSource(server.registry, full_s=full_s, keep_s=keep_s)
        self.exporter = MonitorExporter(server.registry)
        self.source = "prometheus" if self.prometheus is not None else "embedded"

    def _profile(self, model: str, version: str) -> tuple[Any, float | None] | None:
        entry = self.server.repository.find(model, version)
        if entry is None or entry.model is None:
            return self._folder_profile(model, version) if self.store is not None else None
        accuracy = entry.model.card.metrics.get("accuracy")
        baseline = float(accuracy) if isinstance(accuracy, int | float) else None
        return entry.model.profile, baseline

    def _folder_profile(self, model: str, version: str) -> tuple[Any, float | None] | None:
        """The profile and baseline accuracy from the version's model card in its artifact
        folder (kept: a registered version's folder does not change); None: unreadable."""
        from monitors.profile import ProfileError
        from registry.store import NotFound
        from serving.errors import ModelLoadError
        from servo.monitoring import resolve

        key = (model, version)
        if key not in self._folder_profiles:
            if not version.isdigit():
                return None
            try:
                target = resolve(model, int(version), None, self.store)
            except (LookupError, NotFound, ModelLoadError, ProfileError, OSError) as exc:
                log.warning("profile of %s %s not read from its folder: %s", model, version, exc)
                return None
            self._folder_profiles[key] = (target.profile, target.baseline)
        return self._folder_profiles[key]

    def _compute(self, model: str, version: str, config: MonitorConfig) -> MonitorReport:
        loaded = self._profile(model, version)
        if loaded is None:
            why = (
                f"version {version} is not loaded"
                if self.store is None
                else f"version {version}: no model card readable in its artifact folder"
            )
            return _unavailable(model, version, config, why, self.source)
        profile, baseline = loaded
        if self.prometheus is not None:
            return monitor(
                self.prometheus, model, version, profile, baseline=baseline, config=config
            )
        data = self.embedded.window(
            model, version, config.window_s, history_s=config.history_s, step_s=config.step_s
        )
        return build_report(data, profile, baseline=baseline, config=config, source="embedded")

    def report(
        self,
        model: str,
        version: int,
        config: MonitorConfig,
        timeout_s: float = 30.0,
        *,
        export: bool = True,
    ) -> MonitorReport:
        """The report of `model` `version` over `config.window_s` (blocking; call it from a
        thread other than the serving loop's); `export=False`: not shown in the metrics (a
        count the loop needs, not the monitors' window)."""

        async def on_loop() -> MonitorReport:
            if self.prometheus is not None:  # network I/O: off the serving loop
                return await asyncio.to_thread(self._compute, model, str(version), config)
            return self._compute(model, str(version), config)

        try:
            future = asyncio.run_coroutine_threadsafe(on_loop(), self.loop)
            report = future.result(timeout_s)
        except (SourceUnavailable, TimeoutError, RuntimeError) as exc:
            why = str(exc) or type(exc).__name__
            return _unavailable(model, str(version), config, why, self.source)
        if export:
            self.exporter.update(report)
        return report


def _unavailable(
    model: str, version: str, config: MonitorConfig, why: str, source: str
) -> MonitorReport:
    return MonitorReport(
        model=model,
        version=version,
        source=source,
        window_s=config.window_s,
        end=None,
        verdict="unavailable",
        error=why,
    )


class LoopController(Protocol):
    def start(self) -> None: ...
    def stop(self) -> None: ...
    def may_roll_out(self, model: str) -> bool: ...


@dataclass
class Running:
    """What `run_up` started, handed to the factories of the controller and admin API."""

    server: Server
    store: RegistryStore
    reports: Reports
    controller: LoopController | None
    admin_port: int | None
    #: the loop's metrics on the gateway's /metrics (the rollout gives it its e-values)
    loop_metrics: LoopMetrics | None = None


def run_up(
    settings: Settings,
    options: UpOptions,
    *,
    controller_factory: Callable[[Running], LoopController | None] | None = None,
    admin_factory: Callable[[Running], Any] | None = None,
) -> None:
    """Run until SIGTERM/SIGINT. `controller_factory` builds the loop's controller (None:
    the gateway and monitors only); `admin_factory` starts the admin server and returns
    an object with `stop()` and `port`."""
    import uvloop

    from serving.routes import RouteSource, StaticRouteSource
    from serving.server import Server
    from servo.auth import Authenticator
    from servo.cli_common import open_store
    from servo.routes import RegistryRouteSource

    options.dir.mkdir(parents=True, exist_ok=True)
    store: RegistryStore = open_store(settings.registry_url)
    try:
        recovered = store.recover_runs()
        if recovered:
            logs.decision("runs_recovered", runs=recovered, reason="their process is gone")
        bootstrap(store, settings.registry_url, options.dir, options.bootstrap_params)
        routes: RouteSource = (
            RegistryRouteSource(store, settings.routes_poll_s)
            if options.serve_models
            else StaticRouteSource([])  # an empty table: infer answers unknown model
        )
        # once the registry holds any token, feedback needs a labeler's
        server = Server(
            settings.serving_config(), routes, authenticate=Authenticator(store).feedback_caller
        )
        loop_metrics = LoopMetrics(store)
        server.registry.register(loop_metrics)
        up = _Up(settings, options, store, server, controller_factory, admin_factory, loop_metrics)
        uvloop.run(up.main())
    finally:
        store.close()


@dataclass
class _Up:
    settings: Settings
    options: UpOptions
    store: RegistryStore
    server: Server
    controller_factory: Callable[[Running], LoopController | None] | None
    admin_factory: Callable[[Running], Any] | None
    loop_metrics: LoopMetrics | None = None

    async def start_loop(self, running: Running, serving: asyncio.Task[None]) -> Any:
        """The admin API and the controller, once the gateway listens; returns the admin
        server (None: none)."""
        server = self.server
        while server.http_port is None and not serving.done():
            await asyncio.sleep(0.02)
        admin = None
        if self.admin_factory is not None and not serving.done():
            admin = await asyncio.to_thread(self.admin_factory, running)
            running.admin_port = getattr(admin, "port", None)
            if admin is not None:
                report_admin_exposure(self.options.admin_host, running.admin_port)
        if self.controller_factory is not None and not serving.done():
            running.controller = await asyncio.to_thread(self.controller_factory, running)
            if running.controller is not None:
                await asyncio.to_thread(running.controller.start)
        logs.decision(
            "up",
            http_port=server.http_port,
            grpc_port=server.grpc_port,
            admin_port=running.admin_port,
            admin_host=self.options.admin_host,
            serve_models=self.options.serve_models,
            registry=_redacted(self.settings.registry_url),
            payload_log=str(self.settings.payload_log_dir),
            monitors="prometheus" if self.options.prometheus_url else "embedded",
        )
        return admin

    async def main(self) -> None:
        gc.collect()
        gc.freeze()
        gc.set_threshold(50_000, 50, 100)
        loop = asyncio.get_running_loop()
        stopping = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stopping.set)
        server = self.server
        serving = asyncio.create_task(server.run())
        options = self.options
        reports = Reports(
            server,
            loop,
            prometheus_url=options.prometheus_url,
            store=None if options.serve_models else self.store,
        )
        running = Running(server, self.store, reports, None, None, self.loop_metrics)
        admin = None
        try:
            admin = await self.start_loop(running, serving)
            done = asyncio.create_task(stopping.wait())
            await asyncio.wait({serving, done}, return_when=asyncio.FIRST_COMPLETED)
            done.cancel()
        finally:
            logs.decision("shutdown_started")
            server.stop()  # stop accepting; in-flight requests finish, payload log flushed
            if running.controller is not None:  # the scheduler, a running retrain
                await asyncio.to_thread(running.controller.stop)
            if admin is not None:
                await asyncio.to_thread(admin.stop)
            await serving
            logs.decision("shutdown_finished")
            logs.flush()


def _redacted(url: str) -> str:
    """A registry URL without its password."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<registry>"


def serve_loop(settings: Settings, options: UpOptions) -> None:
    """`servo up`: logging, the policy (validated before anything starts), then everything
    `run_up` starts, with the loop's controller and the admin API."""
    from retrain.policy import load_config

    logs.configure(settings.log_level, settings.log_format)
    if options.policy_path is not None:
        config = load_config(options.policy_path)
    else:  # the default location: absent means the built-in defaults
        config = load_config(Path("servo.yaml"), missing_ok=True)
    logs.decision("policy_loaded", path=config.source, models=sorted(config.models))
    rollouts: dict[int, Any] = {}

    def rollout_for(running: Running) -> Any:
        """One rollout for the admin API and the controller: the canary (or an immediate
        swap, per the model's policy), judged on the gateway's own counts (or Prometheus',
        as the monitors are); its runners run the rollouts of the models whose lock the
        controller holds."""
        from retrain.rollout import CanaryRollout, CountsSource
        from servo.canary import EmbeddedCounts, PrometheusCounts
        from servo.loop_promotion import GuardedRollout

        def may_run(model: str) -> bool:  # no controller yet: its start resumes them
            controller = running.controller
            return controller is not None and bool(controller.may_roll_out(model))

        if id(running) not in rollouts:
            prometheus = running.reports.prometheus
            counts: CountsSource = (
                EmbeddedCounts(running.server.recorder, running.reports.loop)
                if prometheus is None
                else PrometheusCounts(prometheus)
            )
            canary = CanaryRollout(running.store, counts, config.for_model, may_run=may_run)
            if running.loop_metrics is not None:
                running.loop_metrics.verdicts = canary.verdicts
            rollouts[id(running)] = GuardedRollout(canary)
        return rollouts[id(running)]

    def admin(running: Running) -> Any:
        from servo.admin import AdminServer, build_admin_app
        from servo.auth import Authenticator

        app = build_admin_app(
            running.store,
            rollout=rollout_for(running),
            authenticator=Authenticator(running.store),
            policy_for=config.for_model,
            console_secure=settings.console_https,
        )
        server = AdminServer(app)
        server.start(options.admin_host, options.admin_port)
        return server

    def controller(running: Running) -> LoopController:
        from retrain.scheduler import LoopScheduler
        from servo.loop import Controller, ControllerConfig
        from servo.reconcile import kubernetes_config

        return Controller(
            running.store,
            config=config,
            reports=running.reports,
            rollout=rollout_for(running),
            scheduler=LoopScheduler(settings.registry_url),
            settings=ControllerConfig(
                directory=options.dir.resolve(),
                registry_url=settings.registry_url,
                payload_root=(settings.payload_log_dir or options.dir / "payload").resolve(),
                kubernetes=kubernetes_config(settings, options.dir.resolve()),
            ),
        )

    run_up(settings, options, controller_factory=controller, admin_factory=admin)
