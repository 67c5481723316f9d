"""Page 4, Rollouts: the list (newest first) and a rollout's page: each step's counts (looks,
requests and events of each arm), the judge's e-value paths per metric against their
thresholds (rollback: m/alpha over the whole rollout; promotion: 1/(beta w) or 1/beta,
restarting each step), each decision and when it was made, and whether the stored
verdicts follow from the stored counts (`servo.cli_rollouts.replay_rollout`, the replay of
`servo rollouts show`)."""

from __future__ import annotations

import datetime as dt
import itertools
import math
from typing import TYPE_CHECKING, Any

from markupsafe import Markup

from retrain.judge import JudgeConfig
from serving.http import Response, Route
from servo.cli_rollouts import replay_rollout
from servo.console import svg
from servo.console.app import positive_id

if TYPE_CHECKING:
    from servo.console.app import Console, Visit

#: the most points of an e-value path drawn (a long rollout has thousands of looks)
MAX_POINTS = 400


def judge_config(rollout: dict[str, Any]) -> JudgeConfig | None:
    """The judge settings the rollout started with (None: not recorded or not readable)."""
    try:
        return JudgeConfig.from_json(rollout["config"]["judge"])
    except (KeyError, TypeError, ValueError):
        return None


def step_rows(rollout: dict[str, Any], looks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per step of the rollout: its share, looks, requests and events of each arm, and the
    decision of its last look (with when it was taken)."""
    rows = []
    for index, percent in enumerate(rollout["steps"]):
        mine = [look for look in looks if look["step"] == index]
        requests = [0, 0]
        events: dict[str, list[int]] = {}
        for look in mine:
            for metric, (ct, ce, bt, be) in look["counts"].items():
                if metric == "errors":
                    requests = [requests[0] + ct, requests[1] + bt]
                pair = events.setdefault(metric, [0, 0])
                pair[0], pair[1] = pair[0] + ce, pair[1] + be
        last = mine[-1] if mine else None
        verdict = last["verdict"] if last and isinstance(last["verdict"], dict) else {}
        rows.append(
            {
                "index": index,
                "percent": percent,
                "looks": len(mine),
                "canary_requests": requests[0],
                "champion_requests": requests[1],
                "events": events,
                "decision": verdict.get("decision"),
                "reason": verdict.get("reason"),
                "at": last["at"] if last else None,
                "reached": index <= rollout["step"],
            }
        )
    return rows


def thin(points: list[tuple[float, float]], keep: set[int]) -> list[tuple[float, float]]:
    """At most about MAX_POINTS points: every k-th, the last, and the looks in `keep`."""
    stride = max(1, math.ceil(len(points) / MAX_POINTS))
    last = len(points) - 1
    return [p for i, p in enumerate(points) if i % stride == 0 or i == last or int(p[0]) in keep]


def e_value_charts(
    rollout: dict[str, Any], looks: list[dict[str, Any]], config: JudgeConfig | None
) -> list[Markup]:
    """One chart per judged metric: its rollback and promotion e-value paths by look, the
    thresholds, and a marker at each step change and at the final decision."""
    verdicts = [
        (look["seq"], look["verdict"]) for look in looks if isinstance(look["verdict"], dict)
    ]
    metrics = list(config.metrics) if config is not None else sorted(
        {m for _, v in verdicts for m in (v.get("rollback_e") or {})}
    )  # fmt: skip
    markers = []
    for previous, look in itertools.pairwise(looks):
        if look["step"] != previous["step"]:
            markers.append(
                svg.Marker(look["seq"], f"step {look['step'] + 1}: {look['percent']:g}%", "step")
            )
    decided = {seq for seq, v in verdicts if v.get("decision") in ("advance", "rollback")}
    if looks and rollout["status"] != "running":
        markers.append(
            svg.Marker(looks[-1]["seq"], rollout["status"].replace("_", " "), rollout["status"])
        )
    thresholds: list[tuple[float, str]] = []
    if config is not None:
        thresholds = [
            (config.rollback_threshold, f"rollback at m/alpha = {config.rollback_threshold:g}"),
            (config.promotion_threshold, f"promotion at {config.promotion_threshold:g}"),
        ]
    charts = []
    for metric in metrics:
        paths = {}
        for key in ("rollback_e", "promote_e"):
            points = [
                (float(seq), float(v[key][metric]))
                for seq, v in verdicts
                if isinstance(v.get(key), dict) and isinstance(v[key].get(metric), int | float)
            ]
            paths[key] = thin(points, decided)
        charts.append(
            Markup(
                svg.line_chart(
                    f"{metric}: e-values by look",
                    [
                        svg.Series("rollback e (whole rollout)", paths["rollback_e"], step=True),
                        svg.Series("promotion e (this step)", paths["promote_e"], step=True),
                    ],
                    thresholds=thresholds,
                    log_y=True,
                    markers=markers,
                    x_label="look",
                    y_label="e-value",
                )
            )
        )
    return charts


def rollouts(visit: Visit) -> Response:
    rows = visit.store.rollouts(limit=200)
    return visit.render("rollouts.html", title="Rollouts", rollouts=rows)


def rollout(visit: Visit) -> Response:
    rollout_id = positive_id(visit.param("id"), "rollout")
    doc = visit.store.rollout(rollout_id)
    looks = visit.store.rollout_looks(rollout_id)
    config = judge_config(doc)
    replayed = replay_rollout(doc, looks)
    return visit.render(
        "rollout.html",
        title=f"Rollout {rollout_id}",
        rollout=doc,
        config=config,
        steps=step_rows(doc, looks),
        charts=e_value_charts(doc, looks, config),
        replay=replayed,
        looks=len(looks),
        duration_s=_duration(doc),
    )


def _duration(doc: dict[str, Any]) -> float | None:
    end = doc["finished_at"]
    return (end - doc["started_at"]).total_seconds() if isinstance(end, dt.datetime) else None


def routes(console: Console) -> list[Route]:
    return [
        Route("GET", "/console/rollouts", console.page(rollouts)),
        Route("GET", "/console/rollouts/{id}", console.page(rollout)),
    ]
