"""The route table and the `RouteSource` interface through which serving learns it.

Serving never imports the registry: `servo/` backs a RouteSource with it. Two sources live
here: `StaticRouteSource` (folders given on the command line) and `FileRouteSource` (a
JSON file, re-read when it changes).

Routes file (JSON):

    {"models": [
      {"name": "digits",
       "champion": {"version": "1", "path": "models/digits/1"},
       "canary":   {"version": "2", "path": "models/digits/2", "percent": 10},
       "shadows": [{"version": "3", "path": "models/digits/3", "percent": 100}],
       "others":  [{"version": "0", "path": "models/digits/0"}],
       "batching": {"enabled": true, "max_rows": 32, "max_delay_us": 500}}
    ]}

`percent` is the canary's share of traffic, or the share of requests copied to a shadow.
A deployment served elsewhere (a KServe InferenceService, another Servo server) gives
`"url"` instead of `path`: `"http://host:port"` (or https) for OIP REST,
`"grpc://host:port"` for OIP gRPC (no query; serving.remote); a `path` given with it is
read only for the version's model card (profile).
`others` are loaded and answer requests that name their version, but take no traffic.
`batching` (optional) overrides the server's batching (SERVO_BATCHING, SERVO_BATCH_MAX_ROWS,
SERVO_BATCH_MAX_DELAY_US) for this model's versions: `true`/`false` forces it on/off with
the server's limits; an object turns it on (unless `"enabled": false`) and its `max_rows`
and `max_delay_us` replace the server's; what it leaves out stays the server's. Any other
value makes the whole file invalid (the message names the model).
Relative paths are relative to the routes file.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import urllib.parse
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from serving.batcher import BatchingConfig
from serving.errors import ModelLoadError
from serving.model_folder import read_card, valid_name, valid_version

log = logging.getLogger("servo.serving")

CHAMPION, CANARY, SHADOW, OTHER = "champion", "canary", "shadow", "other"


class RouteError(ValueError):
    """A route table that cannot be applied; the message says why."""


@dataclass(frozen=True, slots=True)
class BatchingOverride:
    """A route's batching: each field given replaces the server's (None: the server's)."""

    enabled: bool | None = None
    max_rows: int | None = None
    max_delay_us: float | None = None

    def over(self, base: BatchingConfig) -> BatchingConfig:
        given = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return dataclasses.replace(base, **{k: v for k, v in given.items() if v is not None})


@dataclass(frozen=True, slots=True)
class Deployment:
    version: str
    path: Path
    #: canary: share of traffic; shadow: share of requests copied (0..100)
    percent: float = 100.0
    #: a version served elsewhere over OIP REST (serving.remote); `path`, when the entry
    #: gives one, is then only its model card (the reference profile)
    url: str | None = None


@dataclass(frozen=True, slots=True)
class ModelRoute:
    name: str
    champion: Deployment
    canary: Deployment | None = None
    shadows: tuple[Deployment, ...] = ()
    others: tuple[Deployment, ...] = ()
    #: None: the server's batching
    batching: BatchingOverride | None = None

    def deployments(self) -> Iterator[tuple[str, Deployment]]:
        yield CHAMPION, self.champion
        if self.canary is not None:
            yield CANARY, self.canary
        for shadow in self.shadows:
            yield SHADOW, shadow
        for other in self.others:
            yield OTHER, other

    def validate(self) -> None:
        if not valid_name(self.name):
            raise RouteError(f"invalid model name {self.name!r}")
        seen: set[str] = set()
        for variant, deployment in self.deployments():
            if not valid_version(deployment.version):
                raise RouteError(f"model '{self.name}': invalid version {deployment.version!r}")
            if deployment.version in seen:
                raise RouteError(
                    f"model '{self.name}': version {deployment.version} has more than one role"
                )
            seen.add(deployment.version)
            if not 0.0 <= deployment.percent <= 100.0:
                raise RouteError(
                    f"model '{self.name}': {variant} percent {deployment.percent} "
                    "is not within 0..100"
                )


@dataclass(frozen=True, slots=True)
class RouteTable:
    models: Mapping[str, ModelRoute] = field(default_factory=dict)

    def validate(self) -> RouteTable:
        for name, route in self.models.items():
            if name != route.name:
                raise RouteError(f"route key {name!r} names model {route.name!r}")
            route.validate()
        return self


class RouteSource(Protocol):
    def updates(self) -> AsyncIterator[RouteTable]:
        """The current table first, then each new one as it changes."""
        ...


def _version_key(version: str) -> tuple[int, int, str]:
    return (1, int(version), "") if version.isdigit() else (0, 0, version)


def table_from_folders(folders: Sequence[Path]) -> RouteTable:
    """Each model's highest version is its champion; its other versions answer only
    requests that name them. A folder whose servo.json is unreadable is skipped here
    (and reported by the loader under the folder's name)."""
    by_model: dict[str, list[Deployment]] = {}
    for folder in map(Path, folders):
        try:
            card = read_card(folder)
            name, version = card.name, card.version
        except ModelLoadError:
            name, version = folder.name, "unknown"
        deployments = by_model.setdefault(name, [])
        if any(d.version == version for d in deployments):
            log.error(
                "%s: model %s version %s is given twice; ignoring this one", folder, name, version
            )
            continue
        deployments.append(Deployment(version, folder))
    models: dict[str, ModelRoute] = {}
    for name, deployments in by_model.items():
        deployments.sort(key=lambda d: _version_key(d.version))
        models[name] = ModelRoute(
            name=name, champion=deployments[-1], others=tuple(deployments[:-1])
        )
    return RouteTable(models)


class StaticRouteSource:
    def __init__(self, folders: Sequence[Path]):
        self.folders = list(folders)

    async def updates(self) -> AsyncIterator[RouteTable]:
        yield table_from_folders(self.folders)


def check_url(url: str, where: str) -> str:
    """A remote deployment's base URL: http or https (OIP REST) with a host, or
    grpc://host:port (OIP gRPC, no path); no query, fragment or credentials."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port  # raises ValueError on a bad port
    except ValueError as exc:
        raise RouteError(f"{where}: url {url[:100]!r} is not a URL ({exc})") from None
    if parts.scheme not in ("http", "https", "grpc") or not parts.hostname:
        raise RouteError(
            f"{where}: url {url[:100]!r} needs http://, https:// or grpc:// and a host"
        )
    if parts.query or parts.fragment or parts.username or parts.password:
        raise RouteError(f"{where}: url {url[:100]!r} takes no query, fragment or credentials")
    if parts.scheme == "grpc" and (port is None or parts.path.strip("/")):
        raise RouteError(f"{where}: url {url[:100]!r} needs grpc://host:port, no path")
    return url.rstrip("/")


def _deployment(doc: Any, base: Path, where: str) -> Deployment:
    if not isinstance(doc, dict):
        raise RouteError(f"{where} must be an object")
    version, path, url = doc.get("version"), doc.get("path"), doc.get("url")
    if url is not None and not isinstance(url, str):
        raise RouteError(f"{where}: url must be a string")
    if not isinstance(version, str) or not (isinstance(path, str) or (url and path is None)):
        raise RouteError(f"{where} needs string 'version' and 'path' (or 'url')")
    percent = doc.get("percent", 100.0)
    if isinstance(percent, bool) or not isinstance(percent, int | float):
        raise RouteError(f"{where}: percent must be a number")
    folder = Path() if path is None else (base / path).resolve()
    return Deployment(
        version, folder, float(percent), None if url is None else check_url(url, where)
    )


def _batching(doc: Any, where: str) -> BatchingOverride | None:
    if doc is None:
        return None
    if isinstance(doc, bool):
        return BatchingOverride(enabled=doc)
    if not isinstance(doc, dict):
        raise RouteError(
            f"{where}: batching must be true, false or an object with enabled, max_rows "
            f"and max_delay_us, got {json.dumps(doc)[:64]}"
        )
    unknown = sorted(set(doc) - {"enabled", "max_rows", "max_delay_us"})
    if unknown:
        raise RouteError(
            f"{where}: batching takes enabled, max_rows and max_delay_us, not {', '.join(unknown)}"
        )
    enabled, rows, delay = doc.get("enabled", True), doc.get("max_rows"), doc.get("max_delay_us")
    if not isinstance(enabled, bool):
        raise RouteError(f"{where}: batching enabled must be true or false, got {enabled!r}")
    if rows is not None and (type(rows) is not int or rows < 1):
        raise RouteError(f"{where}: batching max_rows must be an integer >= 1, got {rows!r}")
    if delay is not None and (
        isinstance(delay, bool) or not isinstance(delay, int | float) or not 0 <= delay < 1e9
    ):
        raise RouteError(
            f"{where}: batching max_delay_us must be a number of microseconds >= 0, got {delay!r}"
        )
    return BatchingOverride(
        enabled=enabled, max_rows=rows, max_delay_us=None if delay is None else float(delay)
    )


def parse_routes(text: str, base: Path) -> RouteTable:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RouteError(f"not valid JSON ({exc})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("models"), list):
        raise RouteError("needs a 'models' list")
    models: dict[str, ModelRoute] = {}
    for i, item in enumerate(doc["models"]):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise RouteError(f"models[{i}] needs a string 'name'")
        name = item["name"]
        if name in models:
            raise RouteError(f"model '{name}' appears twice")
        canary = item.get("canary")
        route = ModelRoute(
            name=name,
            champion=_deployment(item.get("champion"), base, f"'{name}' champion"),
            canary=None if canary is None else _deployment(canary, base, f"'{name}' canary"),
            shadows=tuple(
                _deployment(d, base, f"'{name}' shadow") for d in item.get("shadows") or []
            ),
            others=tuple(_deployment(d, base, f"'{name}' other") for d in item.get("others") or []),
            batching=_batching(item.get("batching"), f"model '{name}'"),
        )
        models[name] = route
    return RouteTable(models).validate()


class FileRouteSource:
    """A JSON routes file, polled for changes. An invalid file is logged and ignored:
    the last good table stays in force."""

    def __init__(self, path: Path, poll_s: float = 0.5):
        self.path = Path(path)
        self.poll_s = poll_s

    def _stamp(self) -> tuple[int, int] | None:
        try:
            stat = self.path.stat()
        except OSError:
            return None
        return (stat.st_mtime_ns, stat.st_size)

    def read(self) -> RouteTable:
        try:
            text = self.path.read_text(encoding="utf-8")
        except OSError as exc:
            raise RouteError(f"{self.path}: cannot read ({exc.strerror})") from None
        try:
            return parse_routes(text, self.path.parent)
        except RouteError as exc:
            raise RouteError(f"{self.path}: {exc}") from None

    async def updates(self) -> AsyncIterator[RouteTable]:
        last: tuple[int, int] | None = None
        while True:
            stamp = self._stamp()
            if stamp is not None and stamp != last:
                last = stamp
                try:
                    yield self.read()
                except RouteError as exc:
                    log.error("routes not applied: %s", exc)
            await asyncio.sleep(self.poll_s)
