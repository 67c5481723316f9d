"""The `servo` command: one group, one command per verb."""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from servo import __version__, cli_loop
from servo.cli_common import echo_json as _echo_json
from servo.cli_common import open_store as _store
from servo.cli_common import registry_option

if TYPE_CHECKING:
    from servo.settings import Settings

# Imports stay inside the commands that need them: `servo --help` and the registry commands
# must not pay for the serving stack (gRPC, ONNX Runtime) or the trainers (see
# tests/test_cli_imports.py and benchmarks/cli_startup.py).


def _configure_logging(level: str) -> None:
    import logging

    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _serve(
    settings: Settings,
    folders: list[Path],
    routes: Path | None = None,
    on_ready: object = None,
    from_registry: bool = False,
) -> None:
    import asyncio
    import signal
    import threading

    import uvloop

    from serving.routes import FileRouteSource, RouteSource, StaticRouteSource
    from serving.server import Server

    source: RouteSource
    authenticate = None
    if from_registry:
        from servo.auth import Authenticator
        from servo.routes import RegistryRouteSource

        store = _store(settings.registry_url)
        source = RegistryRouteSource(store, settings.routes_poll_s)
        # once the registry holds any token, feedback needs a labeler's
        authenticate = Authenticator(store).feedback_caller
    elif routes:
        source = FileRouteSource(routes, settings.routes_poll_s)
    else:
        source = StaticRouteSource(folders)
    server = Server(settings.serving_config(), source, authenticate=authenticate)

    async def main() -> None:
        # The hot path allocates many short-lived objects: collect the young generation
        # less often, and never rescan what startup created (measured: +4-13% req/s).
        gc.collect()
        gc.freeze()
        gc.set_threshold(50_000, 50, 100)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, server.stop)
        task = asyncio.create_task(server.run())
        monitor = None
        if settings.monitor_every_s > 0 and settings.metrics:
            from monitors.monitor import MonitorConfig
            from servo.embedded_monitor import EmbeddedMonitor

            config = MonitorConfig(
                window_s=settings.monitor_window_s, detector=settings.monitor_detector
            )
            watcher = EmbeddedMonitor(server, every_s=settings.monitor_every_s, config=config)
            monitor = asyncio.create_task(watcher.run())
        if callable(on_ready):
            while server.http_port is None or not server.dataplane.ready():
                if task.done():
                    break
                await asyncio.sleep(0.05)
            if not task.done():
                threading.Thread(target=on_ready, args=(server,), daemon=True).start()
        try:
            await task
        finally:
            if monitor is not None:
                monitor.cancel()

    uvloop.run(main())


@click.group()
@click.version_option(__version__, prog_name="servo")
def main() -> None:
    """Servo: serve ONNX models over the Open Inference Protocol (REST and gRPC)."""
    # A command's imports (SQLAlchemy's, the trainers') create many objects that live as
    # long as the process: collect the young generation less often (a cached `servo train`:
    # about -10% CPU), until the command ends (in-process callers get theirs back).
    # `servo serve` sets its own.
    before = gc.get_threshold()
    gc.set_threshold(50_000, 50, 100)
    click.get_current_context().call_on_close(lambda: gc.set_threshold(*before))


@main.command()
@click.argument("folders", nargs=-1, type=click.Path(path_type=Path))
@click.option(
    "--routes",
    envvar="SERVO_ROUTES",
    type=click.Path(path_type=Path, dir_okay=False),
    help="JSON routes file (champion, canary, shadows per model), re-read when it changes",
)
@click.option(
    "--from-registry",
    is_flag=True,
    help="serve the registry's deployments (SERVO_REGISTRY_URL), following their changes; "
    "once the registry holds a token, feedback needs a labeler's",
)
@click.option("--host", envvar="SERVO_HOST", default="127.0.0.1", show_default=True)
@click.option("--http-port", envvar="SERVO_HTTP_PORT", default=8080, show_default=True)
@click.option("--grpc-port", envvar="SERVO_GRPC_PORT", default=8081, show_default=True)
@click.option("--log-level", envvar="SERVO_LOG_LEVEL", default="INFO", show_default=True)
def serve(
    *,
    folders: list[Path],
    routes: Path | None,
    from_registry: bool,
    host: str,
    http_port: int,
    grpc_port: int,
    log_level: str,
) -> None:
    """Serve model version folders (model.onnx + servo.json), or the models of a routes
    file. With folders, each model's highest version is its champion and the others answer
    requests that name their version. Other settings come from SERVO_* variables."""
    if sum((bool(folders), bool(routes), from_registry)) != 1:
        raise click.UsageError("give model folders, --routes FILE or --from-registry (one)")
    from servo.settings import Settings

    settings = Settings(host=host, http_port=http_port, grpc_port=grpc_port, log_level=log_level)
    _configure_logging(settings.log_level)
    _serve(settings, list(folders), routes, from_registry=from_registry)


@main.group()
def models() -> None:
    """Registered models and their versions."""


@models.command("list")
@registry_option
def models_list(registry_url: str) -> None:
    """Each model with its latest version and aliases."""
    store = _store(registry_url)
    try:
        for name in store.models():
            versions = store.versions(name)
            aliases = ", ".join(f"{a}={v}" for a, v in sorted(store.aliases(name).items()))
            latest = versions[-1].version if versions else "-"
            click.echo(f"{name}\tversions={len(versions)}\tlatest={latest}\t{aliases}")
    finally:
        store.close()


@models.command("show")
@click.argument("name")
@click.argument("version", required=False, type=int)
@registry_option
def models_show(name: str, version: int | None, registry_url: str) -> None:
    """A model's versions (metrics, status, lineage run) and aliases, or one version."""
    from registry.store import NotFound

    store = _store(registry_url)
    try:
        if version is None:
            versions = store.versions(name)
            if not versions:
                raise click.ClickException(f"model '{name}' is not registered")
            _echo_json(
                {
                    "name": name,
                    "aliases": store.aliases(name),
                    "alias_history": store.alias_history(name),
                    "versions": [v.__dict__ for v in versions],
                }
            )
        else:
            try:
                info = store.version(name, version)
            except NotFound as exc:
                raise click.ClickException(str(exc)) from None
            doc: dict[str, Any] = dict(info.__dict__)
            if info.run_id is not None:
                doc["lineage"] = store.run(info.run_id)
            _echo_json(doc)
    finally:
        store.close()


@main.group()
def runs() -> None:
    """Pipeline runs and their lineage."""


@runs.command("list")
@click.option("--limit", default=20, show_default=True)
@registry_option
def runs_list(limit: int, registry_url: str) -> None:
    store = _store(registry_url)
    try:
        for run in store.runs(limit):
            click.echo(
                f"{run['id']}\t{run['pipeline']}\t{run['status']}\t{run['trigger']}"
                f"\t{run['started_at']}"
            )
    finally:
        store.close()


@runs.command("show")
@click.argument("run_id", type=int)
@registry_option
def runs_show(run_id: int, registry_url: str) -> None:
    from registry.store import NotFound

    store = _store(registry_url)
    try:
        try:
            _echo_json(store.run(run_id))
        except NotFound as exc:
            raise click.ClickException(str(exc)) from None
    finally:
        store.close()


@main.command("train")
@click.option("--dataset", default="digits", show_default=True,
              type=click.Choice(["digits", "images"]))  # fmt: skip
@click.option("--images", type=click.Path(path_type=Path, exists=True),
              help="--dataset images: a folder of class subfolders (raw images or the output "
                   "of preprocess-images), or the .npz of preprocess-images --npz")  # fmt: skip
@click.option("--size", help="images: WIDTHxHEIGHT [default: 28x28; a .npz: its own]")
@click.option("--mode", type=click.Choice(["L", "RGB"]),
              help="images: colour mode [default: L; a .npz: its own]")  # fmt: skip
@click.option("--framework", default="sklearn", show_default=True,
              type=click.Choice(["sklearn", "sklearn-gbt", "xgboost", "torch", "keras"]),
              help="xgboost, torch and keras need their extras")  # fmt: skip
@click.option("--epochs", type=int, help="torch/keras: training epochs")
@click.option("--name", default="digits", show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option(
    "--work-dir",
    envvar="SERVO_WORK_DIR",
    default=".servo",
    show_default=True,
    type=click.Path(path_type=Path),
)
@click.option("--no-cache", is_flag=True, help="run every step even if its outputs are cached")
@click.option(
    "--artifacts", envvar="SERVO_ARTIFACTS", default=None,
    help="artifact store URL (fsspec: file://, s3://, gs://, ...); default: the work folder",
)  # fmt: skip
@registry_option
def train_command(
    *, dataset: str, images: Path | None, size: str | None, mode: str | None, framework: str,
    epochs: int | None, name: str, seed: int, work_dir: Path, no_cache: bool,
    artifacts: str | None, registry_url: str,
) -> None:  # fmt: skip
    """Run the pipeline (ingest, split, train, evaluate) and register the new version."""
    from retrain.pipeline import StepFailed
    from serving.model_folder import NAME_RULE, valid_name
    from servo.train import train, train_cached

    if not valid_name(name):
        raise click.BadParameter(f"invalid model name {name!r} ({NAME_RULE})", param_hint="--name")
    params: dict[str, Any] = {"seed": seed, "framework": framework}
    if dataset == "images":
        if images is None:
            raise click.UsageError("--dataset images needs --images DIR")
        params["images"] = str(images)
        params.update({k: v for k, v in (("size", size), ("mode", mode)) if v is not None})
    if epochs is not None:
        params["epochs"] = epochs
    # a fully cached re-run on a SQLite registry is recorded without SQLAlchemy (None: the
    # fast path does not apply, nothing was written)
    cached = None if no_cache else train_cached(
        registry_url, work=work_dir, name=name, params=params, artifacts=artifacts
    )  # fmt: skip
    if cached is not None:
        trained = cached
    else:
        store = _store(registry_url)
        try:
            trained = train(
                store, work=work_dir, name=name, params=params, cache=not no_cache,
                artifacts=artifacts,
            )  # fmt: skip
        except (StepFailed, ModuleNotFoundError) as exc:
            raise click.ClickException(str(exc)) from None
        finally:
            store.close()
    statuses = ", ".join(f"{k}={v.status}" for k, v in trained.run.steps.items())
    verb = "unchanged: already registered as" if trained.reused else "registered"
    click.echo(
        f"{verb} {name} version {trained.version} (run {trained.run.run_id}: {statuses}); "
        f"holdout accuracy {trained.metrics['accuracy']:.3f} -> {trained.folder}"
    )


@main.command("preprocess-images")
@click.argument("src", type=click.Path(path_type=Path, file_okay=False, exists=True))
@click.argument("dst", type=click.Path(path_type=Path, file_okay=False))
@click.option("--size", default="28x28", show_default=True, help="WIDTHxHEIGHT")
@click.option("--mode", default="RGB", show_default=True, type=click.Choice(["RGB", "L"]))
@click.option("--workers", default=0, show_default=True, help="processes (0: one per core)")
@click.option("--npz", is_flag=True, help="also write the arrays as DST/images.npz")
def preprocess_images(
    src: Path, dst: Path, *, size: str, mode: str, workers: int, npz: bool
) -> None:
    """Decode, convert and resize a folder of images in class subfolders into uniform PNG
    images in the same class subfolders of DST (which `servo train --dataset images`
    takes); corrupt files are skipped and listed in DST/report.json."""
    from retrain.images import preprocess, write

    try:
        width, height = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise click.BadParameter(
            f"expected WIDTHxHEIGHT, got {size!r}", param_hint="--size"
        ) from None
    result = preprocess(src, (width, height), mode, workers=workers or None, progress=True)
    data, report = write(result, dst, npz=npz)
    click.echo(f"{len(result.files)} images -> {data}; {len(result.skipped)} skipped ({report})")


@main.command()
@click.argument("name")
@click.option("--champion", type=int, required=True, help="the version that answers")
@click.option("--canary", type=int, help="a version taking --percent of the traffic")
@click.option("--percent", type=float, default=10.0, show_default=True)
@click.option("--shadow", type=int, multiple=True, help="versions getting copies")
@click.option("--actor", envvar="USER", default="operator", show_default=True)
@click.option("--reason", default="", help="recorded in the audit log")
@registry_option
def deploy(
    *,
    name: str,
    champion: int,
    canary: int | None,
    percent: float,
    shadow: tuple[int, ...],
    actor: str,
    reason: str,
    registry_url: str,
) -> None:
    """Set a model's deployments (the route table `servo serve --from-registry` follows)."""
    from registry.store import RegistryError

    rows = [(champion, "champion", 100.0)]
    if canary is not None:
        rows.append((canary, "canary", percent))
    rows += [(version, "shadow", 100.0) for version in shadow]
    store = _store(registry_url)
    try:
        store.set_deployments(name, rows, actor=actor, reason=reason)
    except RegistryError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        store.close()
    click.echo(f"{name}: " + ", ".join(f"{role} {v} ({p:g}%)" for v, role, p in rows))


@main.group()
def pipeline() -> None:
    """The retraining pipeline, for other runners."""


@pipeline.command("compile")
@click.option("--kfp", "kfp_out", required=True, type=click.Path(path_type=Path, dir_okay=False),
              help="write a Kubeflow Pipelines v2 spec (YAML) here")  # fmt: skip
@click.option("--image", default="servo:latest", show_default=True,
              help="the container image whose `servo step` runs each step")  # fmt: skip
@click.option("--seed", default=0, show_default=True)
def pipeline_compile(kfp_out: Path, image: str, seed: int) -> None:
    """Compile the digits pipeline for Kubeflow Pipelines (needs the `kfp` extra)."""
    try:
        from retrain.digits import digits_pipeline
        from retrain.kfp import compile_kfp

        compile_kfp(digits_pipeline({"seed": seed}), kfp_out, image=image)
    except ModuleNotFoundError as exc:
        hint = "install the kfp extra: pip install 'servo-ml[kfp]'"
        raise click.ClickException(f"{exc}; {hint}") from None
    click.echo(f"wrote {kfp_out}")


@main.command("step")
@click.argument("name")
@click.option("--function", "function", required=True, help="one of retrain.steps' steps")
@click.option("--params", default="{}", show_default=True, help="the step's parameters (JSON)")
@click.option("--input", "inputs", nargs=2, multiple=True, metavar="NAME PATH")
@click.option("--output", "outputs", nargs=2, multiple=True, metavar="NAME PATH")
def step_command(
    name: str, function: str, params: str, inputs: tuple[tuple[str, str], ...],
    outputs: tuple[tuple[str, str], ...],
) -> None:  # fmt: skip
    """Run one pipeline step on files (what each Kubeflow Pipelines container runs)."""
    from retrain.kfp import run_step

    try:
        parsed = json.loads(params)
        if not isinstance(parsed, dict):
            raise ValueError("--params must be a JSON object")
        metrics = run_step(
            name, function=function, params=parsed,
            inputs={k: Path(v) for k, v in inputs}, outputs={k: Path(v) for k, v in outputs},
        )  # fmt: skip
    except (KeyError, ValueError, OSError, RuntimeError) as exc:
        raise click.ClickException(f"step {name}: {exc}") from None
    _echo_json({"step": name, "metrics": metrics})


@main.command("monitor")
@click.argument("model")
@click.option("--version", "version_", type=int, help="registry version (default: the champion)")
@click.option(
    "--model-dir", type=click.Path(path_type=Path, file_okay=False, exists=True),
    help="a model version folder instead of the registry's",
)  # fmt: skip
@click.option("--window", default="15m", show_default=True, help="e.g. 90s, 15m, 1h")
@click.option(
    "--source", envvar="SERVO_PROMETHEUS_URL", default="http://127.0.0.1:9090",
    show_default=True, help="the Prometheus that scrapes the gateway",
)  # fmt: skip
@click.option("--history", default="24h", show_default=True, help="the stall detector's history")
@click.option("--step", default="1m", show_default=True, help="the label stream's resolution")
@click.option(
    "--detector", default="ucb", show_default=True,
    type=click.Choice(["ucb", "ddm", "adwin", "none"]),
)  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
@registry_option
def monitor_command(
    *,
    model: str,
    version_: int | None,
    model_dir: Path | None,
    window: str,
    source: str,
    history: str,
    step: str,
    detector: str,
    as_json: bool,
    registry_url: str,
) -> None:
    """Drift and accuracy of one model version over a window, read from Prometheus.
    Exit code 0: fine; 1: drift or an accuracy stall; 2: cannot tell (Prometheus
    unavailable, or too few samples)."""
    from monitors.monitor import MonitorConfig, monitor
    from monitors.profile import ProfileError
    from monitors.sources import PrometheusSource
    from registry.store import NotFound
    from serving.errors import ModelLoadError
    from servo.monitoring import parse_duration, resolve, table

    try:
        config = MonitorConfig(
            window_s=parse_duration(window),
            history_s=parse_duration(history),
            step_s=parse_duration(step),
            detector=detector,
        )
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    store = _store(registry_url) if model_dir is None else None
    try:
        target = resolve(model, version_, model_dir, store)
    except (LookupError, NotFound, ModelLoadError, ProfileError) as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(2)  # not 1: that means drift; without the version there is nothing to tell
    finally:
        if store is not None:
            store.close()
    report = monitor(
        PrometheusSource(source),
        target.model,
        target.version,
        target.profile,
        baseline=target.baseline,
        config=config,
    )
    if as_json:
        _echo_json(report.to_json())
    else:
        click.echo(table(report))
    sys.exit(report.exit_code)


@main.command("up")
@click.option("--dir", "work_dir", envvar="SERVO_DIR", default=".servo", show_default=True,
              type=click.Path(path_type=Path, file_okay=False),
              help="registry (SQLite), artifacts, versions, payload log, worker logs")  # fmt: skip
@click.option("--host", envvar="SERVO_HOST", default="127.0.0.1", show_default=True)
@click.option("--http-port", envvar="SERVO_HTTP_PORT", default=8080, show_default=True)
@click.option("--grpc-port", envvar="SERVO_GRPC_PORT", default=8081, show_default=True)
@click.option("--admin-port", envvar="SERVO_ADMIN_PORT", default=8082, show_default=True,
              help="the admin API's port")  # fmt: skip
@click.option("--admin-host", envvar="SERVO_ADMIN_HOST", default="127.0.0.1", show_default=True,
              help="the admin API's address (every admin route needs a token)")  # fmt: skip
@click.option("--serve-models/--no-serve-models", "serve_models", envvar="SERVO_SERVE_MODELS",
              default=True, show_default=True,
              help="--no-serve-models: the controller only (gateway pods serve the models): "
                   "its gateway answers /metrics and /v2/health but routes no model; needs "
                   "--prometheus")  # fmt: skip
@click.option("--registry", "registry_url", envvar="SERVO_REGISTRY_URL", default=None,
              help="registry SQLAlchemy URL [default: sqlite:///DIR/registry.db]")  # fmt: skip
@click.option("--prometheus", "prometheus_url", envvar="SERVO_PROMETHEUS_URL", default=None,
              help="monitors read this Prometheus [default: the gateway's metrics]")  # fmt: skip
@click.option("--payload-log-dir", "payload_log_dir", envvar="SERVO_PAYLOAD_LOG_DIR",
              default=None, type=click.Path(path_type=Path, file_okay=False),
              help="the payload log the monitors read [default: DIR/payload]")  # fmt: skip
@click.option("--policy", "policy_file", envvar="SERVO_POLICY_FILE", default=None,
              type=click.Path(path_type=Path, dir_okay=False),
              help="the loop policy (YAML) [default: ./servo.yaml if it exists]")  # fmt: skip
@click.option("--log-level", envvar="SERVO_LOG_LEVEL", default="INFO", show_default=True)
@click.option("--log-format", envvar="SERVO_LOG_FORMAT", default="text", show_default=True,
              type=click.Choice(["text", "json"]))  # fmt: skip
def up_command(
    *, work_dir: Path, host: str, http_port: int, grpc_port: int, admin_port: int,
    admin_host: str, serve_models: bool, registry_url: str | None, prometheus_url: str | None,
    payload_log_dir: Path | None, policy_file: Path | None, log_level: str, log_format: str,
) -> None:  # fmt: skip
    """Run the closed loop: the gateway serving the registry's deployments, monitors, the
    retraining scheduler and controller, and the admin API. On an empty registry it first
    trains the digits model and makes it champion. SIGTERM stops it cleanly."""
    from pydantic import ValidationError

    from servo.settings import Settings
    from servo.up import UpOptions, registry_url_for, serve_loop

    try:
        settings = Settings(
            host=host, http_port=http_port, grpc_port=grpc_port, admin_port=admin_port,
            log_level=log_level, log_format=log_format,
            registry_url=registry_url or registry_url_for(work_dir),
            prometheus_url=prometheus_url, policy_file=policy_file,
            payload_log_dir=payload_log_dir or work_dir / "payload",
        )  # fmt: skip
        options = UpOptions(dir=work_dir, admin_port=settings.admin_port,
                            prometheus_url=settings.prometheus_url,
                            policy_path=settings.policy_file, admin_host=admin_host,
                            serve_models=serve_models)  # fmt: skip
    except (ValidationError, ValueError) as exc:
        raise click.UsageError(str(exc)) from None
    try:
        serve_loop(settings, options)
    except ValueError as exc:  # a bad policy file: its error names the file, key and value
        raise click.ClickException(str(exc)) from None


@main.command("export-demo")
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--name", default="digits", show_default=True)
@click.option("--version", "version_", default="1", show_default=True)
def export_demo(folder: Path, name: str, version_: str) -> None:
    """Train the digits classifier and write it as a model version folder."""
    from servo.demo import export_digits

    card = export_digits(folder, name=name, version=version_)
    click.echo(
        f"wrote {folder} ({card.name} version {card.version}, "
        f"holdout accuracy {card.metrics['accuracy']:.3f})"
    )


@main.command()
@click.option("--dir", "work_dir", default=".servo-demo", show_default=True,
              type=click.Path(path_type=Path, file_okay=False),
              help="a new folder, or one an earlier demo made (emptied first)")  # fmt: skip
@click.option("--http-port", envvar="SERVO_HTTP_PORT", default=8080, show_default=True)
@click.option("--grpc-port", envvar="SERVO_GRPC_PORT", default=8081, show_default=True)
@click.option("--admin-port", envvar="SERVO_ADMIN_PORT", default=8082, show_default=True)
@click.option("--interactive", is_flag=True,
              help="wait for a person to approve the promotion (the demo prints how)")  # fmt: skip
@click.option("--plot", "plot_path", type=click.Path(path_type=Path, dir_okay=False),
              help="the PNG [default: DIR/demo.png]; its JSON summary goes beside")  # fmt: skip
@click.option("--exit", "exit_after", is_flag=True,
              help="stop servo up after the summary [default: it serves until Ctrl-C]")  # fmt: skip
def demo(*, work_dir: Path, http_port: int, grpc_port: int, admin_port: int,
         interactive: bool, plot_path: Path | None, exit_after: bool) -> None:  # fmt: skip
    """The whole loop in a few minutes: `servo up` trains and serves digits, traffic with
    labels, a drift, the monitors alarm, the loop retrains, shadows, asks for approval,
    rolls the candidate out, and the accuracy recovers. Prints the timeline and a summary
    table, writes a PNG and a JSON summary; then keeps serving (a curl that works)."""
    import time

    started = time.time()
    from servo.demo_loop import Demo, DemoError, DemoOptions, serve_until_stopped
    from servo.demo_report import table, timeline_text, write

    options = DemoOptions(dir=work_dir, http_port=http_port, grpc_port=grpc_port,
                          admin_port=admin_port, interactive=interactive, plot=plot_path,
                          exit=exit_after)  # fmt: skip
    runner = Demo(options, echo=click.echo)
    try:
        summary = runner.run()
    except DemoError as exc:
        runner.stop_up()
        raise click.ClickException(str(exc)) from None
    except BaseException:
        runner.stop_up()
        raise
    png, doc = write(summary, plot_path or runner.directory / "demo.png", started)
    click.echo("\ntimeline:\n" + timeline_text(summary))
    click.echo("\n" + table(summary) + "\n")
    click.echo(f"plot: {png}\nsummary: {doc}")
    missed = [name for name, met in summary["goals"].items() if not met]
    if missed:
        click.echo(f"goals missed: {', '.join(missed)}")
    url, body, said = runner.example()
    click.echo(said)
    click.echo("\nthe loop keeps serving; try it (Ctrl-C stops it):\n")
    click.echo(f"curl -s {url} -H 'Content-Type: application/json' -d '{body}'\n")
    code = runner.stop_up() if exit_after else serve_until_stopped(runner)
    if code not in (0, None):
        raise click.ClickException(f"servo up exited with {code} (log: {summary['up_log']})")


cli_loop.add_commands(main)

if __name__ == "__main__":
    main()
