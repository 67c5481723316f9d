"""Page 3, Promotions: the requests (pending first), and a request's page: its evidence
drawn (champion vs candidate accuracy with intervals, offline and on the same live
requests; the features that drifted most; shadow agreement and latency), the signature
diff, the gates re-judged on the evidence with the gates in force when it was filed, the
Approve / Reject forms (approvers only; the admin API's own path, bound to the evidence
hash shown) and the request's audit trail.

The evidence is read defensively: a part it lacks (an older format, a request filed by
hand) is said to be missing, never an error."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

import orjson
from pydantic import ValidationError

from retrain import gates as gate_rules
from retrain.policy import Gates
from serving.http import Response, Route
from servo.admin_wire import DecisionBody, parse_body
from servo.console import svg
from servo.console.app import ConsoleError, positive_id, redirect

if TYPE_CHECKING:
    from servo.console.app import Console, Visit

log = logging.getLogger("servo.console")

#: the drifted features drawn (the most drifted first)
TOP_FEATURES = 8


def _number(value: Any) -> float | None:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    return float(value) if ok else None


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _interval(value: Any) -> tuple[float | None, float | None]:
    if isinstance(value, list | tuple) and len(value) == 2:
        return _number(value[0]), _number(value[1])
    return None, None


def accuracy_bars(evidence: Mapping[str, Any]) -> list[svg.Bar]:
    """Champion and candidate accuracy with their 95% intervals: offline (the rows the
    offline gate judges) and live (the labelled requests both answered)."""
    offline, rows = gate_rules.offline_comparison(evidence.get("offline"))
    bars = []
    for where, found in ((f"offline ({rows})", offline), ("live", evidence.get("live"))):
        part = _mapping(found)
        for side in ("champion", "candidate"):
            value = _number(part.get(f"{side}_accuracy"))
            if value is None:
                continue
            low, high = _interval(part.get(f"{side}_accuracy_ci95"))
            bars.append(svg.Bar(f"{side} {where.split(' ')[0]}", value, low, high, group=side))
    return bars


def drifted_features(evidence: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The input features of the report that triggered the retrain, the most drifted
    first (JS distance over its threshold)."""
    report = _mapping(_mapping(evidence.get("trigger")).get("report"))
    features = _mapping(report.get("features")).get("features")
    found = []
    for item in features if isinstance(features, list) else []:
        entry = _mapping(item)
        js, threshold = _number(entry.get("js_distance")), _number(entry.get("js_threshold"))
        if js is None:
            continue
        ratio = js / threshold if threshold else None
        found.append({**entry, "ratio": ratio})
    found.sort(key=lambda e: (e["ratio"] is not None, e["ratio"] or e["js_distance"]), reverse=True)
    return found[:TOP_FEATURES]


def drift_charts(features: list[dict[str, Any]]) -> list[str]:
    """A bar chart of the top features' JS distance over its threshold (above 1: past
    it), and the reference vs live histogram of each feature whose entry has its bins."""
    if not features:
        return []
    bars = [
        svg.Bar(str(e.get("feature", "?")), float(e["ratio"]),
                group="drifted" if e.get("drifted") else "not drifted")
        for e in features
        if e["ratio"] is not None
    ]  # fmt: skip
    title = "The features that drifted most: JS distance / its threshold"
    charts = [svg.bars(title, bars, low=0.0)] if bars else []
    for entry in features:
        edges, reference, live = entry.get("edges"), entry.get("reference"), entry.get("live")
        if isinstance(edges, list) and isinstance(reference, list) and isinstance(live, list):
            title = f"{entry.get('feature')}: reference vs live"
            charts.append(svg.histograms(title, edges, reference, live))
    return charts


def shadow_chart(live: Mapping[str, Any]) -> str | None:
    """Latency p50 and p99 of champion and candidate on the shadowed requests."""
    latency = _mapping(live.get("latency"))
    bars = []
    for side in ("champion", "candidate"):
        summary = _mapping(latency.get(side))
        for quantile in ("p50", "p99"):
            value = _number(summary.get(f"{quantile}_ms"))
            if value is not None:
                bars.append(svg.Bar(f"{side} {quantile}", value, group=side))
    return svg.bars("Latency on the shadowed requests (ms)", bars, low=0.0) if bars else None


def gate_results(evidence: Mapping[str, Any]) -> tuple[list[dict[str, Any]], str]:
    """The gates judged on the evidence (`retrain.gates.evaluate`), with the gates of the
    policy the evidence records (else the defaults, said so)."""
    recorded = _mapping(evidence.get("policy")).get("gates")
    source = "the policy recorded in the evidence"
    try:
        rules = Gates.model_validate(recorded) if isinstance(recorded, Mapping) else None
    except ValidationError:
        rules = None
    if rules is None:
        rules, source = Gates(), "the default gates (the evidence records none)"
    try:
        results = gate_rules.evaluate(evidence, rules)
    except Exception:  # a malformed document: shown without its gates, never a 500
        log.exception("gates not judged on a request's evidence")
        return [], "not judged: the evidence is malformed"
    return [r.to_json() for r in results], source


def evidence_view(evidence: Mapping[str, Any]) -> dict[str, Any]:
    live = _mapping(evidence.get("live"))
    features = drifted_features(evidence)
    gates, gates_source = gate_results(evidence)
    bars = accuracy_bars(evidence)
    title = "Accuracy: champion vs candidate (95% intervals)"
    signature = _mapping(evidence.get("signature"))
    return {
        "accuracy_chart": svg.bars(title, bars, low=0.0, high=1.0) if bars else None,
        "live": live,
        "agreement": _number(live.get("agreement")),
        "shadow_chart": shadow_chart(live),
        "features": features,
        "drift_charts": drift_charts(features),
        "signature": signature,
        "changes": [
            {**_mapping(c), "kind": kind}
            for kind in ("inputs", "outputs")
            for c in signature.get(kind) or []
        ],
        "labels": _mapping(signature.get("class_labels")),
        "gates": gates,
        "gates_source": gates_source,
        "insufficient": bool(evidence.get("insufficient_evidence")),
        "trigger": _mapping(evidence.get("trigger")),
    }


def promotions(visit: Visit) -> Response:
    requests = visit.store.promotions()
    return visit.render("promotions.html", title="Promotion requests", requests=requests)


def promotion(visit: Visit) -> Response:
    request_id = positive_id(visit.param("id"), "promotion request")
    doc = visit.store.promotion(request_id)
    approver = "approver" in visit.session.roles
    return visit.render(
        "promotion.html",
        title=f"Promotion request {request_id}",
        request=doc,
        evidence=evidence_view(_mapping(doc["evidence"])),
        approver=approver,
        may_decide=approver and doc["status"] == "pending",
    )


def _decide(visit: Visit, decision: str) -> Response:
    request_id = positive_id(visit.param("id"), "promotion request")
    fields = {"reason": visit.form.get("reason", ""), "evidence_hash": visit.form.get("evidence")}
    body = parse_body(orjson.dumps(fields), DecisionBody)
    if not body.reason.strip():
        raise ConsoleError(HTTPStatus.BAD_REQUEST, "a reason is needed")
    if body.evidence_hash is None:  # a decision from the console is bound to what it showed
        raise ConsoleError(HTTPStatus.BAD_REQUEST, "the form carries no evidence hash")
    visit.console.api.decide(request_id, decision, visit.session.identity, body)
    return redirect(f"/console/promotions/{request_id}")


def approve(visit: Visit) -> Response:
    return _decide(visit, "approved")


def reject(visit: Visit) -> Response:
    return _decide(visit, "rejected")


def routes(console: Console) -> list[Route]:
    act = console.action
    return [
        Route("GET", "/console/promotions", console.page(promotions)),
        Route("GET", "/console/promotions/{id}", console.page(promotion)),
        Route("POST", "/console/promotions/{id}/approve", act(approve, "approve", "approver")),
        Route("POST", "/console/promotions/{id}/reject", act(reject, "reject", "approver")),
    ]
