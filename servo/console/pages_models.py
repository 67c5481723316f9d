"""Page 1, Models: each model's versions (status, aliases), its route table (champion,
canary percent, shadows), the loop's state and the champion's live accuracy."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from serving.http import Response, Route

if TYPE_CHECKING:
    from servo.console.app import Console, Visit


def model_rows(visit: Visit) -> list[dict[str, Any]]:
    """One entry per registered model: versions, aliases, routes and loop state."""
    store = visit.store
    deployments = store.deployments()
    loop = store.loop_states()
    rows = []
    for name in store.models():
        aliases = store.aliases(name)
        by_version: dict[int, list[str]] = {}
        for alias, version in sorted(aliases.items()):
            by_version.setdefault(version, []).append(alias)
        rows.append(
            {
                "name": name,
                "versions": [
                    {"info": v, "aliases": by_version.get(v.version, [])}
                    for v in reversed(store.versions(name))
                ],
                "routes": deployments.get(name, []),
                "loop": loop.get(name),
            }
        )
    return rows


def models(visit: Visit) -> Response:
    return visit.render("models.html", title="Models", models=model_rows(visit))


def routes(console: Console) -> list[Route]:
    return [Route("GET", "/console/models", console.page(models))]
