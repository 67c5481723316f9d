"""Page 4, Rollouts: the list (newest first) and a rollout's page: each step's counts (looks,
requests and events of each arm), the judge's e-value paths per metric against their
thresholds (rollback: m/alpha over the whole rollout; promotion: 1/(beta w) or 1/beta,
restarting each step), each decision and when it was made, and whether the stored
verdicts follow from the stored counts (`servo.cli_rollouts.replay_rollout`, the replay of
`servo rollouts show`; for a long rollout on request)."""

from __future__ import annotations

import datetime as dt
import itertools
from typing import TYPE_CHECKING, Any

from markupsafe import Markup

from retrain.judge import JudgeConfig
from serving.http import Response, Route
from servo.cli_rollouts import replay_rollout, step_totals
from servo.console import svg
from servo.console.app import positive_id
from servo.console.pages_runs import query

if TYPE_CHECKING:
    from servo.console.app import Console, Visit

#: a rollout with more looks is replayed on request only (`?replay=1`): a replay costs
#: about a third of a millisecond a look
REPLAY_LOOKS = 300


def judge_config(rollout: dict[str, Any]) -> JudgeConfig | None:
    """The judge settings the rollout started with (None: not recorded or not readable)."""
    try:
        return JudgeConfig.from_json(rollout["config"]["judge"])
    except (KeyError, TypeError, ValueError):
        return None


def step_rows(rollout: dict[str, Any], looks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per step of the rollout (`servo.cli_rollouts.step_totals`): its share, looks,
    requests and events of each arm, and the decision of its last look with its time."""
    rows = []
    for step in step_totals(rollout, looks):
        mine, verdict = step["looks"], step["verdict"]
        rows.append(
            {
                "index": step["index"],
                "percent": step["percent"],
                "looks": len(mine),
                "canary_requests": step["requests"][0],
                "champion_requests": step["requests"][1],
                "events": step["events"],
                "decision": verdict.get("decision"),
                "reason": verdict.get("reason"),
                "at": mine[-1]["at"] if mine else None,
                "reached": step["index"] <= rollout["step"],
            }
        )
    return rows


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
            paths[key] = points
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
    replayed = None
    if len(looks) <= REPLAY_LOOKS or query(visit).get("replay") == "1":
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
