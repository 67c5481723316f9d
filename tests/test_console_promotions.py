"""The console's promotion pages on a real admin server on 127.0.0.1 over a real SQLite
registry, with evidence built by retrain.evidence from seeded paired outcomes and a drift
report from monitors.report: pending first, the evidence drawn (valid SVG), gates and
signature diff, a viewer refused (forms disabled, POST 403, audited), an approver's
approval promoting the candidate (route table and audit trail change), a stale evidence
hash refused, and hostile names and reasons shown escaped."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from monitors.report import compare as drift_report
from retrain.evidence import build_evidence, offline_from_comparison, paired_live, signature_diff
from retrain.policy import Policy, to_json
from retrain.steps import compare
from servo.console.pages_promotions import drift_charts
from tests.admin import Admin, running_admin, snapshot
from tests.console_login import Clients, field, secured

SCRIPT = "<script>alert(1)</script>"
ESCAPED = "&lt;script&gt;alert(1)&lt;/script&gt;"
PIXELS = {"name": "pixels", "datatype": "FP32", "shape": [-1, 64]}
LABEL = {"name": "label", "datatype": "INT64", "shape": [-1]}


def evidence(seed: int = 0) -> dict[str, Any]:
    """Evidence as the loop builds it: a live paired comparison (the candidate better),
    the offline one, a drift report with a hostile feature name, a signature diff."""
    rng = np.random.default_rng(seed)
    n = 400
    truth = rng.integers(0, 10, n)
    champion = np.where(rng.random(n) < 0.80, truth, (truth + 1) % 10)
    candidate = np.where(rng.random(n) < 0.93, truth, (truth + 2) % 10)
    latency = rng.uniform(0.001, 0.003, n)
    live = paired_live(
        [str(v) for v in champion], [str(v) for v in candidate], [str(v) for v in truth],
        latency.tolist(), (latency * 1.2).tolist(), seed=seed,
    )  # fmt: skip
    hardness = rng.random(600)
    offline = offline_from_comparison(compare(hardness < 0.95, hardness < 0.85, seed=seed))
    reference = rng.multinomial(5000, np.full(12, 1 / 12), size=3)
    shifted = rng.multinomial(800, np.linspace(1, 3, 12) / np.linspace(1, 3, 12).sum(), size=1)
    window = np.vstack([rng.multinomial(800, np.full(12, 1 / 12), size=2), shifted])
    drift = drift_report(["pixel_1", "pixel_2", SCRIPT], reference, window).to_json()
    card = {"inputs": [PIXELS], "outputs": [LABEL], "class_labels": None}
    wider = {**card, "outputs": [LABEL, {"name": "probabilities", "datatype": "FP32",
                                         "shape": [-1, 10]}]}  # fmt: skip
    return build_evidence(
        trigger={"trigger": "drift", "reason": "input drift", "report": {"features": drift}},
        policy=to_json(Policy()), lineage={"champion": 1, "candidate": 2}, offline=offline,
        live=live, signature=signature_diff(card, wider),
    )  # fmt: skip


@pytest.fixture
def admin(tmp_path: Path) -> Iterator[Admin]:
    with running_admin(tmp_path) as running:
        yield running


@pytest.fixture
def web(admin: Admin) -> Iterator[Clients]:
    clients = Clients(admin.url)
    yield clients
    clients.close()


def file(admin: Admin, **kwargs: Any) -> int:
    return admin.store.file_promotion("digits", admin.version(), evidence(), "gates", **kwargs)


def champion(admin: Admin) -> int:
    (version,) = [
        r["version"] for r in admin.store.deployments()["digits"] if r["role"] == "champion"
    ]
    return int(version)


def svgs(html: str) -> list[ET.Element]:
    """Every SVG picture of a page, parsed (a malformed one fails the test)."""
    return [ET.fromstring(m) for m in re.findall(r"<svg.*?</svg>", html, flags=re.S)]


def test_the_list_shows_pending_first_and_the_page_draws_the_evidence(
    admin: Admin, web: Clients
) -> None:
    pending = file(admin)
    decided = file(admin)
    admin.store.decide(decided, "rejected", "approver-1", {"approver"}, "not now")
    client = web.login(admin.tokens["viewer"])
    listing = client.get("/console/promotions").text
    assert listing.index(f'/console/promotions/{pending}"') < listing.index(
        f'/console/promotions/{decided}"'
    )
    page = client.get(f"/console/promotions/{pending}")
    secured(page)
    html = page.text
    pictures = svgs(html)
    assert len(pictures) >= 3  # accuracy, drifted features, shadow latency
    titles = " ".join("".join(p.itertext()) for p in pictures)
    assert "Accuracy: champion vs candidate" in titles and "champion live" in titles
    assert "candidate offline" in titles and "The features that drifted most" in titles
    assert "Latency on the shadowed requests" in titles
    live = admin.store.promotion(pending)["evidence"]["live"]
    assert f"agreement {100 * live['agreement']:.1f}%" in html
    for gate in ("signature", "live_non_inferiority", "offline_non_inferiority", "latency"):
        assert f"<td>{gate}</td>" in html
    assert "compatible" in html and "<td>probabilities</td><td>added</td>" in html
    assert "promotion_filed" in html and admin.store.promotion(pending)["evidence_hash"] in html
    assert SCRIPT not in html and ESCAPED in html  # the hostile feature name, as text


def test_a_viewer_sees_the_forms_disabled_and_is_refused(admin: Admin, web: Clients) -> None:
    request = file(admin)
    path = f"/console/promotions/{request}"
    for role in ("viewer", "operator"):
        client = web.login(admin.tokens[role])
        page = client.get(path).text
        assert page.count("disabled") == 4 and "Deciding needs an approver's token" in page
        before = snapshot(admin.store)
        form = {"csrf": field(page, "csrf"), "evidence": field(page, "evidence"), "reason": "go"}
        refused = client.post(f"{path}/approve", data=form)
        assert refused.status_code == 403 and "needs role approver" in refused.text
        assert client.post(f"{path}/reject", data=form).status_code == 403
        assert snapshot(admin.store) == before
    trail = admin.store.promotion(request)["audit"]
    refusals = [(e["actor"], e["detail"]["action"]) for e in trail if e["action"] == "attempt"]
    assert refusals == [
        ("viewer-1", "console approve"), ("viewer-1", "console reject"),
        ("operator-1", "console approve"), ("operator-1", "console reject"),
    ]  # fmt: skip


def test_an_approver_approves_and_the_route_table_and_audit_change(
    admin: Admin, web: Clients
) -> None:
    request = file(admin)
    candidate = admin.store.promotion(request)["version"]
    client = web.login(admin.tokens["approver"])
    path = f"/console/promotions/{request}"
    page = client.get(path).text
    assert "disabled" not in page
    form = {"csrf": field(page, "csrf"), "evidence": field(page, "evidence"), "reason": SCRIPT}
    done = client.post(f"{path}/approve", data=form)
    assert done.status_code == 303 and done.headers["location"] == path
    assert champion(admin) == candidate
    doc = admin.store.promotion(request)
    assert doc["status"] == "promoted" and doc["decision"]["actor"] == "approver-1"
    assert doc["decision"]["reason"] == SCRIPT
    actions = [e["action"] for e in doc["audit"]]
    assert actions[:2] == ["promotion_filed", "promotion_approved"] and "promote" in actions
    shown = client.get(path).text
    assert SCRIPT not in shown and "approved by approver-1 at" in shown and ESCAPED in shown
    assert '<form class="decide"' not in shown  # decided: no forms any more
    models = client.get("/console/models").text
    assert f"<tr><td>{candidate}</td><td>champion</td><td>100.0</td>" in models


def test_a_stale_evidence_hash_or_no_reason_is_refused(admin: Admin, web: Clients) -> None:
    request = file(admin)
    client = web.login(admin.tokens["approver"])
    path = f"/console/promotions/{request}"
    page = client.get(path).text
    csrf = field(page, "csrf")
    before = snapshot(admin.store)
    stale = client.post(
        f"{path}/approve", data={"csrf": csrf, "evidence": "0" * 64, "reason": "go"}
    )
    assert stale.status_code == 409, stale.text
    empty = client.post(f"{path}/reject", data={"csrf": csrf, "evidence": field(page, "evidence"),
                                                "reason": "  "})  # fmt: skip
    assert empty.status_code == 400 and "a reason is needed" in empty.text
    unbound = client.post(f"{path}/approve", data={"csrf": csrf, "reason": "go"})
    assert unbound.status_code == 400 and "no evidence hash" in unbound.text
    assert snapshot(admin.store) == before
    form = {"csrf": csrf, "reason": "go", "evidence": "0" * 64}
    missing = client.post("/console/promotions/999/approve", data=form)
    assert missing.status_code == 404
    refusals = [e for e in admin.store.audit(limit=50) if e["action"] == "attempt"]
    assert [e["detail"]["status"] for e in refusals] == [409, 400, 400, 404]


def test_a_hostile_model_name_and_a_request_without_known_evidence_render(
    admin: Admin, web: Clients
) -> None:
    folder = admin.root / "hostile"
    folder.mkdir()
    version = admin.store.register_version(SCRIPT, folder.as_uri(), {})
    request = admin.store.file_promotion(SCRIPT, version, {"note": SCRIPT}, "gates",
                                         triggered_by="someone")  # fmt: skip
    client = web.login(admin.tokens["viewer"])
    for path in ("/console/promotions", f"/console/promotions/{request}", "/console/models"):
        page = client.get(path)
        assert page.status_code == 200, page.text
        assert SCRIPT not in page.text and ESCAPED in page.text
    page = client.get(f"/console/promotions/{request}").text
    assert "the evidence holds no accuracy figures" in page and "the default gates" in page
    odd = {"live": [1], "offline": "x", "signature": {"inputs": "bad", "compatible": True},
           "trigger": {"report": {"features": {"features": [{"js_distance": "a"}, 5]}}},
           "policy": {"gates": {"live_margin": "wide"}}}  # fmt: skip
    strange = admin.store.file_promotion(SCRIPT, version, odd, "gates")
    shown = client.get(f"/console/promotions/{strange}")
    assert shown.status_code == 200 and "not judged: the evidence is malformed" in shown.text


def test_features_with_their_bins_get_reference_and_live_histograms() -> None:
    bins = {"edges": [0.0, 1.0, 2.0], "reference": [5, 5], "live": [9, 1]}
    entry = {"feature": SCRIPT, "js_distance": 0.2, "js_threshold": 0.1, "drifted": True,
             "ratio": 2.0, **bins}  # fmt: skip
    ratios, histogram = drift_charts([entry])
    assert "drifted" in ratios and "reference vs live" in histogram
    assert SCRIPT not in histogram and ESCAPED in histogram
    ET.fromstring(histogram)
    assert drift_charts([]) == []
