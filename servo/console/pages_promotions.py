"""Page 3, Promotions: the requests (pending first), and a request's page: its evidence
drawn (accuracy with intervals, drifted features, shadow agreement and latency), the
signature diff, the gates, Approve / Reject forms and the request's audit trail."""

from __future__ import annotations

from http import HTTPStatus
from typing import TYPE_CHECKING, Any

import orjson

from serving.http import Response, Route
from servo.admin_wire import DecisionBody, parse_body
from servo.console.app import ConsoleError, positive_id, redirect

if TYPE_CHECKING:
    from servo.console.app import Console, Visit


def promotions(visit: Visit) -> Response:
    requests = visit.store.promotions()
    return visit.render("promotions.html", title="Promotion requests", requests=requests)


def _request(visit: Visit) -> tuple[int, dict[str, Any]]:
    request_id = positive_id(visit.param("id"), "promotion request")
    return request_id, visit.store.promotion(request_id)


def promotion(visit: Visit) -> Response:
    request_id, doc = _request(visit)
    may_decide = "approver" in visit.session.roles and doc["status"] == "pending"
    return visit.render(
        "promotion.html",
        title=f"Promotion request {request_id}",
        request=doc,
        may_decide=may_decide,
        approver="approver" in visit.session.roles,
    )


def _decide(visit: Visit, decision: str) -> Response:
    request_id = positive_id(visit.param("id"), "promotion request")
    fields = {"reason": visit.form.get("reason", ""), "evidence_hash": visit.form.get("evidence")}
    body = parse_body(orjson.dumps(fields), DecisionBody)
    if not body.reason.strip():
        raise ConsoleError(HTTPStatus.BAD_REQUEST, "a reason is needed")
    visit.console.api.decide(request_id, decision, visit.session.identity, body)
    return redirect(f"/console/promotions/{request_id}")


def approve(visit: Visit) -> Response:
    return _decide(visit, "approved")


def reject(visit: Visit) -> Response:
    return _decide(visit, "rejected")


def routes(console: Console) -> list[Route]:
    return [
        Route("GET", "/console/promotions", console.page(promotions)),
        Route("GET", "/console/promotions/{id}", console.page(promotion)),
        Route(
            "POST",
            "/console/promotions/{id}/approve",
            console.action(approve, "approve", "approver"),
        ),
        Route(
            "POST", "/console/promotions/{id}/reject", console.action(reject, "reject", "approver")
        ),
    ]
