"""Page 5, Monitors: per model, the drift score and the live accuracy over time per version,
from the loop's recorded checks (loop events of kind "check": their "drift" and "accuracy"
parts, `servo.loop.check_drift` and `check_accuracy`), with the retrains (loop events),
promotions and rollbacks (the model's audit entries) marked; and the latest checks."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from markupsafe import Markup

from serving.http import Response, Route
from servo.console import svg
from servo.console.app import ConsoleError

if TYPE_CHECKING:
    from servo.console.app import Console, Visit

#: the newest checks drawn (a check a minute: a week is ten thousand)
MAX_CHECKS = 2000
#: the newest checks listed in the table
TABLE_CHECKS = 20
#: loop events marked on the charts, and their labels
EVENT_LABELS = {
    "retrain_started": "retrain",
    "canary_rolled_back": "canary rolled back",
    "canary_promoted": "canary promoted",
}
#: audit actions (subject: the model) marked on the charts
AUDIT_LABELS = {
    "promote": "promoted",
    "rollback": "rollback",
    "canary_promote": "promoted",
    "canary_rollback": "rollback",
}


def stamp(at: dt.datetime) -> float:
    """Unix seconds of a registry time (naive: UTC)."""
    return (at if at.tzinfo else at.replace(tzinfo=dt.UTC)).timestamp()


def clock(seconds: float, pattern: str = "%m-%d %H:%M") -> str:
    """A time label (UTC): month-day hour:minute by default."""
    return dt.datetime.fromtimestamp(seconds, dt.UTC).strftime(pattern)


def time_axis(span_s: float) -> Callable[[float], str]:
    """Axis labels for a span of time: seconds within two hours, days beyond two days."""
    pattern = "%H:%M:%S" if span_s < 7200 else "%m-%d %H:%M" if span_s < 172800 else "%Y-%m-%d"
    return lambda seconds: clock(seconds, pattern)


def number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def markers(store: Any, model: str, since: float) -> list[svg.Marker]:
    """Retrains, promotions and rollbacks of `model` at or after `since` (Unix seconds)."""
    out = []
    for event in store.loop_events(model, kinds=sorted(EVENT_LABELS), limit=500):
        at = stamp(event["at"])
        if at >= since:
            out.append(svg.Marker(at, EVENT_LABELS[event["kind"]], event["kind"]))
    for entry in store.audit(subject=model, limit=500):
        label = AUDIT_LABELS.get(entry["action"])
        at = stamp(entry["at"])
        if label is not None and at >= since:
            version = (entry["detail"] or {}).get("version")
            shown = f"{label} v{version}" if isinstance(version, int) else label
            out.append(svg.Marker(at, shown, label.split()[0]))
    return sorted(out, key=lambda m: m.x)


FIGURES = ("js_distance_max", "js_threshold", "js_feature", "accuracy", "wilson_low",
           "wilson_high", "labelled", "coverage")  # fmt: skip


def figures(detail: dict[str, Any]) -> dict[str, Any] | None:
    """A check's figures (`FIGURES`, each present, None when not measured) from its
    "drift" (`servo.loop.check_drift`) and "accuracy" (`servo.loop.check_accuracy`)
    parts; None for a check recorded without them (before they were kept)."""
    if "drift" not in detail and "accuracy" not in detail:
        return None
    parts = [detail.get("drift"), detail.get("accuracy")]
    merged = {k: v for part in parts if isinstance(part, dict) for k, v in part.items()}
    return {k: merged.get(k) for k in FIGURES}


def series_by_version(checks: list[dict[str, Any]]) -> dict[str, Any]:
    """Per version: drift (largest JS distance, and its threshold) and accuracy (with its
    interval) points over time; checks without figures are counted, not drawn."""
    drift: dict[int, list[tuple[float, float]]] = {}
    threshold: dict[int, list[tuple[float, float]]] = {}
    accuracy: dict[int, list[tuple[float, float]]] = {}
    band: dict[int, list[tuple[float, float]]] = {}
    missing = 0
    for check in checks:
        detail = check["detail"] or {}
        found, version = figures(detail), detail.get("version")
        if found is None or not isinstance(version, int):
            missing += 1
            continue
        at = stamp(check["at"])
        js, limit = number(found["js_distance_max"]), number(found["js_threshold"])
        if js is not None:
            drift.setdefault(version, []).append((at, js))
            if limit is not None:
                threshold.setdefault(version, []).append((at, limit))
        value = number(found["accuracy"])
        low, high = number(found["wilson_low"]), number(found["wilson_high"])
        if value is not None:
            accuracy.setdefault(version, []).append((at, value))
            band.setdefault(version, []).append(
                (value if low is None else low, value if high is None else high)
            )
    return {
        "drift": drift,
        "threshold": threshold,
        "accuracy": accuracy,
        "band": band,
        "missing": missing,
    }


def check_row(check: dict[str, Any]) -> dict[str, Any]:
    """One check for the table: its fields, each present (None or empty when not recorded)."""
    detail = check["detail"] or {}
    return {
        "at": check["at"],
        "version": detail.get("version"),
        "verdict": detail.get("verdict"),
        "signals": list(detail.get("signals") or []),
        "reasons": list(detail.get("reasons") or []),
        "error": detail.get("error"),
        "recorded": figures(detail) is not None,
        "figures": figures(detail) or dict.fromkeys(FIGURES),
    }


def monitor_context(store: Any, model: str) -> dict[str, Any]:
    """The page's context; a 404 for a model the registry does not know."""
    if model not in store.models():
        raise ConsoleError(HTTPStatus.NOT_FOUND, f"no model {model[:200]!r}")
    checks = store.loop_events(model, kinds=["check"], limit=MAX_CHECKS)
    found = series_by_version(checks)
    since = stamp(checks[0]["at"]) if checks else 0.0
    marked = markers(store, model, since) if checks else []
    axis = time_axis(stamp(checks[-1]["at"]) - since if checks else 0.0)
    drift = [svg.Series(f"v{v} largest JS distance", p) for v, p in sorted(found["drift"].items())]
    drift += [
        svg.Series(f"v{v} JS threshold", p, step=True)
        for v, p in sorted(found["threshold"].items())
    ]
    accuracy = [
        svg.Series(f"v{v} accuracy", p, band=found["band"][v])
        for v, p in sorted(found["accuracy"].items())
    ]
    charts = [
        svg.line_chart(
            f"{model}: input drift (largest JS distance of a feature)",
            drift,
            markers=marked,
            x_format=axis,
            y_label="JS distance",
        ),
        svg.line_chart(
            f"{model}: live accuracy (Wilson 95% interval)",
            accuracy,
            markers=marked,
            x_format=axis,
            y_label="accuracy",
        ),
    ]
    latest = [check_row(c) for c in reversed(checks[-TABLE_CHECKS:])]
    return {
        "model": model,
        "charts": [Markup(c) for c in charts],
        "checks": len(checks),
        "missing": found["missing"],
        "latest": latest,
        "events": marked,
        "clock": clock,
        "loop": store.loop_states().get(model),
    }


def monitors_index(visit: Visit) -> Response:
    return visit.render("monitors.html", title="Monitors", models=visit.store.models())


def monitor(visit: Visit) -> Response:
    model = visit.param("model")
    return visit.render(
        "monitor.html", title=f"Monitor: {model}", **monitor_context(visit.store, model)
    )


def routes(console: Console) -> list[Route]:
    return [
        Route("GET", "/console/monitors", console.page(monitors_index)),
        Route("GET", "/console/monitors/{model}", console.page(monitor)),
    ]
