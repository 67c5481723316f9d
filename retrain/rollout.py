"""The last step of a promotion: an approved request's candidate takes the traffic.

One interface, `Rollout`: `start(request, actor)` takes an approved request (the
registry's promotion document) and returns the request's final status. Until the canary
rollout lands, `ImmediateRollout` swaps the route at once: the candidate becomes champion
(the registry's `promote`: one transaction, audited with a rollback pointer, the old
champion archived), and the request is finished as `promoted`. A swap the registry refuses
(the version is no longer servable, the model has changed) finishes it as `failed`, with
the registry's reason, and the old champion keeps serving. A request that is no longer
`approved` when it starts (another process rolled it out) is left as it is.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Protocol

from registry.store import Conflict, RegistryError

if TYPE_CHECKING:
    from registry.store import RegistryStore

log = logging.getLogger("servo.retrain")


class Rollout(Protocol):
    def start(self, request: dict[str, Any], actor: str) -> str:
        """Roll out an approved request's candidate; returns the request's final status
        ("promoted", "failed", or "rolled_back" for a rollout that undid itself)."""
        ...


class ImmediateRollout:
    """The candidate becomes champion at once (route swap, old champion archived)."""

    def __init__(self, store: RegistryStore):
        self.store = store

    def start(self, request: dict[str, Any], actor: str) -> str:
        store = self.store
        request_id, model, version = int(request["id"]), request["model"], int(request["version"])
        current = store.promotion(request_id)["status"]
        if current != "approved":  # finished meanwhile (another process rolled it out)
            return str(current)
        reason = f"promotion request {request_id}"
        try:
            old = store.promote(model, version, actor, reason=reason, request_id=request_id)
        except RegistryError as exc:
            current = store.promotion(request_id)["status"]
            if current != "approved":  # another rollout of it finished first
                return str(current)
            if _swapped(store.promotion(request_id)):
                return "promoted"  # another rollout of it swapped first, and finishes it
            log.error(
                "promotion request %s: %s version %s not promoted: %s",
                request_id,
                model,
                version,
                exc,
            )
            store.finish_promotion(request_id, "failed", actor, reason=f"route swap refused: {exc}")
            return "failed"
        try:
            store.finish_promotion(
                request_id, "promoted", actor, reason=f"version {version} replaced version {old}"
            )
        except Conflict:  # finished by another process meanwhile
            return str(store.promotion(request_id)["status"])
        log.info(
            "promotion request %s: %s version %s is champion (was %s)",
            request_id,
            model,
            version,
            old,
        )
        return "promoted"


def _swapped(request: dict[str, Any]) -> bool:
    """Whether a route swap carried this request out (its audit has the promote)."""
    return any(entry["action"] == "promote" for entry in request.get("audit", ()))
