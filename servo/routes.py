"""The registry as the gateway's RouteSource: its deployments table, polled for changes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from registry.store import RegistryStore
from serving.routes import Deployment, ModelRoute, RouteError, RouteTable, check_url

log = logging.getLogger("servo")


def _path(uri: str) -> Path:
    parsed = urlparse(uri)
    if parsed.scheme not in ("file", ""):
        raise ValueError(f"artifact {uri} is not a local folder (file://)")
    return Path(unquote(parsed.path))


def _card_folder(uri: str) -> Path:
    """A remote version's artifact folder when this process can read it (its model card,
    the reference profile), else Path() (none)."""
    try:
        folder = _path(uri)
    except ValueError:
        return Path()
    return folder if folder.is_dir() else Path()


def _deployment(name: str, row: dict[str, Any]) -> Deployment:
    version, percent = str(row["version"]), float(row["percent"])
    url = row.get("url")
    if url:  # served elsewhere (a Ready InferenceService): the gateway calls it
        try:
            checked = check_url(url, f"model '{name}' version {version}")
        except RouteError as exc:  # what the backend's status says is not for us to trust
            log.error("%s; serving its folder instead", exc)
        else:
            return Deployment(version, _card_folder(row["artifact_uri"]), percent, checked)
    return Deployment(version, _path(row["artifact_uri"]), percent)


def table_from_deployments(deployments: dict[str, list[dict[str, Any]]]) -> RouteTable:
    """The gateway's route table: a row with a `url` (its endpoint is ready elsewhere)
    is a remote deployment, one without loads its artifact folder (the embedded
    fallback, e.g. until its InferenceService is Ready)."""
    models: dict[str, ModelRoute] = {}
    for name, rows in deployments.items():
        by_role: dict[str, list[Deployment]] = {}
        for row in rows:
            if not row.get("servable", True) or not row["artifact_uri"]:
                # deployed before versions had the flag, and its folder was never completed
                log.error("model %s version %s is not servable; its %s route is skipped",
                          name, row["version"], row["role"])  # fmt: skip
                continue
            by_role.setdefault(row["role"], []).append(_deployment(name, row))
        champion = by_role.get("champion")
        if not champion:
            log.error("model %s has deployments but no servable champion; skipped", name)
            continue
        canary = by_role.get("canary")
        models[name] = ModelRoute(
            name=name,
            champion=champion[0],
            canary=canary[0] if canary else None,
            shadows=tuple(by_role.get("shadow", ())),
            others=tuple(by_role.get("other", ())),
        )
    return RouteTable(models).validate()


class RegistryRouteSource:
    def __init__(self, store: RegistryStore, poll_s: float = 1.0):
        self.store = store
        self.poll_s = poll_s

    async def updates(self) -> AsyncIterator[RouteTable]:
        last = -1
        while True:
            try:
                revision = await asyncio.to_thread(self.store.deployments_revision)
                if revision != last:
                    deployments = await asyncio.to_thread(self.store.deployments)
                    table = table_from_deployments(deployments)
                    last = revision
                    yield table
            except Exception as exc:  # a registry that is down: keep the routes we have
                log.error("registry routes not read: %s", exc)
            await asyncio.sleep(self.poll_s)
