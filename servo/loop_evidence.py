"""The evidence of a promotion request, put together from the registry (lineage, offline
evaluation), the payload log (the paired live comparison) and the version folders (the
signature diff), in the form `retrain.evidence.build_evidence` defines."""

from __future__ import annotations

import datetime as dt
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from servo import __version__

if TYPE_CHECKING:
    from registry.store import RegistryStore
    from retrain.policy import Policy


def _card(store: RegistryStore, model: str, version: int) -> dict[str, Any]:
    from serving.model_folder import read_card

    uri = store.version(model, version).artifact_uri
    folder = Path(urllib.parse.unquote(urllib.parse.urlparse(uri).path))
    return read_card(folder).to_json()


def lineage(store: RegistryStore, run_id: int | None) -> dict[str, Any]:
    """Pipeline run, dataset content hash, cache keys and code version."""
    doc: dict[str, Any] = {"run_id": run_id, "code_version": __version__}
    if run_id is None:
        return doc
    run = store.run(run_id, recover=False)
    data = [a["content_hash"] for a in run["artifacts"]
            if a["step"] == "ingest" and a["direction"] == "output"]  # fmt: skip
    doc.update({
        "pipeline": run["pipeline"],
        "trigger": run["trigger"],
        "parameters": run["parameters"],
        "dataset_hash": data[0] if data else None,
        "steps": [{"step": s["step"], "status": s["status"], "cache_key": s["cache_key"]}
                  for s in run["steps"]],
    })  # fmt: skip
    return doc


def offline(store: RegistryStore, model: str, version: int) -> dict[str, Any]:
    """The run's evaluation: holdout metrics with the paired comparison against the
    champion on the same rows, and the same on the held-out production rows."""
    metrics = dict(store.version(model, version).metrics)
    return {
        "holdout_rows": metrics.get("holdout_rows"),
        "accuracy": metrics.get("accuracy"),
        "comparison": metrics.get("comparison"),
        "production": metrics.get("production"),
    }


def gather_evidence(
    store: RegistryStore,
    model: str,
    *,
    champion: int,
    candidate: int,
    policy: Policy,
    detail: dict[str, Any],
    payload_root: Path,
    timed_out: bool = False,
) -> tuple[dict[str, Any] | None, int]:
    """(evidence, labelled paired requests); evidence None while fewer than
    `policy.shadow.min_labelled` labelled requests were answered by both and the shadow's
    timeout has not passed (`timed_out`: it has, the evidence is marked insufficient)."""
    from retrain import evidence
    from retrain.policy import to_json

    cand = detail.get("candidate") or {}
    since = dt.datetime.fromisoformat(cand["since"]) if cand.get("since") else None
    live = evidence.live_from_payload_log(
        payload_root, model, str(champion), str(candidate), since=since
    )
    n_labelled = int(live.get("n_labelled") or 0)
    enough = n_labelled >= policy.shadow.min_labelled
    if not enough and not timed_out:
        return None, n_labelled
    trigger = {
        "trigger": cand.get("trigger"),
        "reason": detail.get("reason"),
        "report": detail.get("report"),
        "state": detail.get("trigger"),
    }
    doc = evidence.build_evidence(
        trigger=trigger,
        policy=to_json(policy),
        lineage={
            **lineage(store, cand.get("run_id")),
            "champion": champion,
            "candidate": candidate,
        },
        offline=offline(store, model, candidate),
        live=live,
        signature=evidence.signature_diff(
            _card(store, model, champion), _card(store, model, candidate)
        ),
        insufficient=not enough,
    )
    return doc, n_labelled
