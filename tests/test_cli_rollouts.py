"""`servo rollouts list|show|rollback` as a real `servo` process on a real SQLite registry:
show recomputes every verdict of a rollout the real judge decided (rolled back, and
promoted through its steps) from the stored counts and finds the same ones, and names the
look whose stored verdict does not follow (exit code 1); rollback by an operator, refused
for a viewer (audited) and for a rollout that is over; hostile ids and filters."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from registry.models import RolloutLook
from tests.admin import make_registry
from tests.rollouts import approved, judged_rollout
from tests.test_cli_loop import LOCAL, Cli


@pytest.fixture
def cli(tmp_path: Path) -> Iterator[Cli]:
    """digits: version 1 champion, versions 2 and 3 in shadow (candidates)."""
    store = make_registry(tmp_path)
    helper = Cli(store, f"sqlite:///{tmp_path / 'registry.db'}", tmp_path)
    for _ in range(3):
        helper.version()
    store.set_deployments("digits", [(1, "champion", 100.0)], actor="setup")
    store.set_alias("digits", "champion", 1, actor="setup")
    for version in (2, 3):
        store.add_shadow("digits", version, actor="loop")
    try:
        yield helper
    finally:
        store.close()


def test_show_replays_the_judges_verdicts(cli: Cli) -> None:
    bad = judged_rollout(cli.store, "digits", 2, error_rates=(0.1, 0.02), seed=1)
    assert bad["status"] == "rolled_back"
    shown = cli.json("rollouts", "show", str(bad["id"]))
    assert shown["same"] is True and shown["error"] is None and shown["differences"] == []
    assert len(shown["replayed"]) == len(shown["looks"]) == bad["looks"] > 0
    assert shown["replayed"][-1]["decision"] == "rollback"
    assert shown["replayed"][-1]["reason"] == shown["rollout"]["verdict"]["reason"]
    assert [look["seq"] for look in shown["looks"]] == list(range(1, bad["looks"] + 1))
    text = cli.run("rollouts", "show", str(bad["id"]))
    assert text.returncode == 0, text.stderr
    assert "digits version 2 against champion 1: rolled_back" in text.stdout
    assert "step 1 at 10%" in text.stdout and "decision rollback: rollback: errors" in text.stdout
    assert f"replayed: same verdict at every look ({bad['looks']} looks)" in text.stdout

    good = judged_rollout(cli.store, "digits", 3, error_rates=(0.0, 0.05), seed=2)
    assert good["status"] == "promoted" and good["step"] == 1
    text = cli.run("rollouts", "show", str(good["id"]))
    assert text.returncode == 0, text.stderr
    for line in ("step 1 at 10%", "step 2 at 50%", "decision advance", "outcome: promoted",
                 "replayed: same verdict"):  # fmt: skip
        assert line in text.stdout, text.stdout
    assert "step 3 at 100%" not in text.stdout  # promoted, never judged at 100 %


def test_show_names_a_stored_verdict_that_does_not_follow(cli: Cli) -> None:
    rollout = judged_rollout(cli.store, "digits", 3, error_rates=(0.0, 0.05), seed=2)
    looks = cli.store.rollout_looks(rollout["id"])
    forged = {**looks[1]["verdict"], "decision": "rollback"}
    forged["rollback_e"] = {**forged["rollback_e"], "errors": 1e6}
    with cli.store.engine.begin() as connection:  # someone edits a stored look
        connection.execute(
            sa.update(RolloutLook)
            .where(RolloutLook.rollout_id == rollout["id"], RolloutLook.seq == 2)
            .values(verdict=forged)
        )
    shown = cli.json("rollouts", "show", str(rollout["id"]), code=1)
    assert shown["same"] is False
    assert [d["seq"] for d in shown["differences"]] == [2]
    (found,) = shown["differences"]
    assert any(d.startswith("decision stored 'rollback', replayed") for d in found["differences"])
    assert any(d.startswith("rollback_e[errors] stored 1000000.0") for d in found["differences"])
    text = cli.run("rollouts", "show", str(rollout["id"]))
    assert text.returncode == 1
    assert f"replayed: DIFFERENT at 1 of {rollout['looks']} looks" in text.stdout
    assert "look 2: decision stored 'rollback'" in text.stdout
    # a rollout started without the judge's settings cannot be replayed: said, not failed
    cli.store.remove_shadow("digits", 2, actor="gates")
    cli.version()
    cli.store.add_shadow("digits", 4, actor="loop")
    bare = cli.store.start_rollout(approved(cli.store, "digits", 4), "bob", steps=[10, 100],
                                   config={})  # fmt: skip
    cli.store.record_look(bare["id"], step=0, percent=10.0, counts={}, verdict={})
    text = cli.run("rollouts", "show", str(bare["id"]))
    assert text.returncode == 0 and "replayed: not possible (no 'judge')" in text.stdout


def test_list_and_rollback(cli: Cli) -> None:
    rollout = cli.store.start_rollout(approved(cli.store, "digits", 2), "bob",
                                      steps=[10, 50, 100], config={})  # fmt: skip
    rid = str(rollout["id"])
    listed = cli.json("rollouts", "list", "--status", "running")
    assert [(r["id"], r["status"], r["percent"]) for r in listed] == [(rollout["id"], "running",
                                                                       10.0)]  # fmt: skip
    assert cli.json("rollouts", "list", "--model", "iris") == []
    assert cli.run("rollouts", "list").stdout.startswith(f"{rid}\tdigits\tversion 2 (champion 1)")
    viewer = cli.store.create_token("val", "viewer", "setup")
    refused = cli.json("rollouts", "rollback", rid, "--reason", "no", token=viewer, code=1)
    assert "needs role operator" in refused["error"]
    attempt = cli.store.audit(action="attempt")[-1]
    assert (attempt["actor"], attempt["subject"]) == ("val", f"rollout/{rid}")
    assert cli.store.rollout(rollout["id"])["status"] == "running"
    done = cli.json("rollouts", "rollback", rid, "--reason", "pager at 3am")
    assert (done["status"], done["reason"]) == ("rolled_back", "pager at 3am")
    assert [(d["version"], d["role"]) for d in cli.store.deployments()["digits"]] == [
        (1, "champion"), (3, "shadow"),
    ]  # fmt: skip
    entry = cli.store.audit(action="canary_rollback")[-1]
    assert entry["actor"] == LOCAL and entry["detail"]["reason"] == "pager at 3am"
    again = cli.json("rollouts", "rollback", rid, "--reason", "twice", code=1)
    assert again["error"] == f"rollout {rid} is already rolled_back"
    missing = cli.json("rollouts", "rollback", "999", "--reason", "x", code=1)
    assert missing["error"] == "no rollout 999"
    assert cli.json("rollouts", "show", "999", code=1) == {"error": "no rollout 999"}
    for args in (["show", "0x1"], ["rollback", rid]):  # not an id; no --reason
        assert cli.run("rollouts", *args).returncode == 2, args
    bogus = cli.json("rollouts", "list", "--status", "done", code=1)
    assert "unknown rollout status 'done'" in bogus["error"]
    # `servo rollback MODEL` while a rollout runs rolls that rollout back
    other = cli.store.start_rollout(approved(cli.store, "digits", 3), "bob", steps=[10, 100],
                                    config={})  # fmt: skip
    back = cli.run("rollback", "digits", "--reason", "by model")
    assert back.returncode == 0, back.stderr
    assert f"rollout {other['id']} of version 3 rolled back; version 1 is champion" in back.stdout
    assert cli.store.rollout(other["id"])["status"] == "rolled_back"
