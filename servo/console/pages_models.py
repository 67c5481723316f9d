"""Page 1, Models: each model's versions (status, aliases), its route table (champion,
canary percent, shadows), the loop's state, and the champion's live accuracy with its
Wilson interval and label coverage over the loop's recent checks (each check records the
monitors' accuracy part: `servo.loop.check_accuracy`)."""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Any

from serving.http import Response, Route
from servo.console import svg

if TYPE_CHECKING:
    from registry.store import RegistryStore
    from servo.console.app import Console, Visit

#: the checks drawn per model (the newest)
CHECKS = 200


def live_accuracy(store: RegistryStore, model: str, champion: int | None) -> dict[str, Any]:
    """The champion's accuracy over its recent checks: `latest` (the newest check's
    accuracy part, None: no labelled rows yet) and `chart` (SVG; None: nothing to draw)."""
    if champion is None:
        return {"latest": None, "chart": None}
    checks = [
        (event["at"], (event["detail"] or {}).get("accuracy"))
        for event in store.loop_events(model, kinds=["check"], limit=CHECKS)
        if (event["detail"] or {}).get("version") == champion
    ]
    measured = [(at, acc) for at, acc in checks if acc and acc.get("accuracy") is not None]
    latest = measured[-1][1] if measured else None
    if not measured:
        return {"latest": None, "chart": None}
    end: dt.datetime = measured[-1][0]

    def minutes(at: dt.datetime) -> float:
        return (at - end).total_seconds() / 60.0

    accuracy = svg.Series(
        "accuracy (95% interval)",
        [(minutes(at), acc["accuracy"]) for at, acc in measured],
        band=[(acc["wilson_low"], acc["wilson_high"]) for _, acc in measured]
        if all(acc.get("wilson_low") is not None for _, acc in measured)
        else None,
    )
    coverage = svg.Series(
        "label coverage",
        [(minutes(at), acc["coverage"]) for at, acc in measured if acc.get("coverage") is not None],
    )
    chart = svg.line_chart(
        f"{model} v{champion}: live accuracy and label coverage",
        [accuracy, coverage],
        x_label="minutes before the latest check",
        y_label="share",
    )
    return {"latest": latest, "chart": chart}


def model_rows(store: RegistryStore) -> list[dict[str, Any]]:
    """One entry per registered model: versions, aliases, routes, loop state, accuracy."""
    deployments = store.deployments()
    loop = store.loop_states()
    rows = []
    for name in store.models():
        aliases = store.aliases(name)
        by_version: dict[int, list[str]] = {}
        for alias, version in sorted(aliases.items()):
            by_version.setdefault(version, []).append(alias)
        routes = deployments.get(name, [])
        champion = next((r["version"] for r in routes if r["role"] == "champion"), None)
        rows.append(
            {
                "name": name,
                "versions": [
                    {"info": v, "aliases": by_version.get(v.version, [])}
                    for v in reversed(store.versions(name))
                ],
                "routes": routes,
                "champion": champion,
                "loop": loop.get(name),
                "live": live_accuracy(store, name, champion),
            }
        )
    return rows


def models(visit: Visit) -> Response:
    return visit.render("models.html", title="Models", models=model_rows(visit.store))


def routes(console: Console) -> list[Route]:
    return [Route("GET", "/console/models", console.page(models))]
