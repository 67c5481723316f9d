"""The loop's CLI commands as a real `servo` process (this worktree's interpreter, `-m
servo.cli`) on a real SQLite registry: tokens create/list/revoke, promotions
list/show/approve/reject, rollback, retrain, each with --json; the identity (--token /
SERVO_TOKEN, or the local user with every role), separation of duties, and refusals
(exit code 1, audited, nothing changed)."""

from __future__ import annotations

import getpass
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from registry.store import RegistryStore
from tests.admin import EVIDENCE, make_registry, snapshot

ROOT = Path(__file__).resolve().parent.parent
LOCAL = f"cli:{getpass.getuser()}"


@dataclass
class Cli:
    store: RegistryStore
    url: str
    cwd: Path

    def run(
        self, *args: str, token: str | None = None, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        environ = {k: v for k, v in os.environ.items() if k != "SERVO_TOKEN"}
        environ.update({"PYTHONPATH": str(ROOT), "SERVO_REGISTRY_URL": self.url, **(env or {})})
        extra = ["--token", token] if token else []
        return subprocess.run(
            [sys.executable, "-m", "servo.cli", *args, *extra],
            cwd=self.cwd,
            env=environ,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    def json(self, *args: str, token: str | None = None, code: int = 0) -> Any:
        done = self.run(*args, "--json", token=token)
        assert done.returncode == code, done.stdout + done.stderr
        return json.loads(done.stdout)

    def version(self) -> int:
        folder = self.cwd / f"digits-{len(self.store.versions('digits')) + 1}"
        folder.mkdir()
        return self.store.register_version("digits", folder.as_uri(), {})


@pytest.fixture
def cli(tmp_path: Path) -> Iterator[Cli]:
    store = make_registry(tmp_path)
    helper = Cli(store, f"sqlite:///{tmp_path / 'registry.db'}", tmp_path)
    first = helper.version()
    store.set_deployments("digits", [(first, "champion", 100.0)], actor="setup")
    store.set_alias("digits", "champion", first, actor="setup")
    try:
        yield helper
    finally:
        store.close()


def test_tokens_create_list_revoke(cli: Cli) -> None:
    created = cli.json("tokens", "create", "ann", "--role", "approver")
    assert created["name"] == "ann" and created["role"] == "approver"
    secret = created["token"]
    assert secret.startswith("servo_") and len(secret) > 40
    identity = cli.store.authenticate(secret)
    assert identity is not None and identity.name == "ann" and identity.role == "approver"
    human = cli.run("tokens", "create", "lab", "--role", "labeler")
    assert human.returncode == 0 and "shown only now" in human.stdout
    listed = cli.json("tokens", "list")
    assert {t["name"]: t["role"] for t in listed} == {"ann": "approver", "lab": "labeler"}
    assert secret not in json.dumps(listed)
    assert all(t["created_by"] == LOCAL for t in listed)
    table = cli.run("tokens", "list")
    assert table.returncode == 0 and "ann\tapprover" in table.stdout
    assert cli.json("tokens", "revoke", "lab") == {"name": "lab", "revoked": True}
    assert [t["revoked_at"] is not None for t in cli.json("tokens", "list")] == [False, True]
    # a second active token of one name is refused; an unknown role never reaches the store
    again = cli.json("tokens", "create", "ann", "--role", "viewer", code=1)
    assert "ann" in again["error"]
    bad = cli.run("tokens", "create", "x", "--role", "root")
    assert bad.returncode == 2 and "'root' is not one of" in bad.stderr
    gone = cli.json("tokens", "revoke", "nobody", code=1)
    assert "nobody" in gone["error"]


def test_promotions_list_show_approve_as_the_local_user(cli: Cli) -> None:
    candidate = cli.version()
    request_id = cli.store.file_promotion("digits", candidate, EVIDENCE, "gates")
    listed = cli.json("promotions", "list", "--status", "pending")
    assert [(p["id"], p["status"]) for p in listed] == [(request_id, "pending")]
    assert cli.run("promotions", "list").stdout.startswith(f"{request_id}\tdigits\tversion 2")
    shown = cli.json("promotions", "show", str(request_id))
    assert shown["evidence"] == EVIDENCE
    human = cli.run("promotions", "show", str(request_id))
    assert f"evidence sha256: {shown['evidence_hash']}" in human.stdout
    done = cli.json(
        "promotions",
        "approve",
        str(request_id),
        "--reason",
        "ahead",
        "--evidence-hash",
        shown["evidence_hash"],
        "--immediate",
    )
    assert done["status"] == "promoted" and done["decision"]["actor"] == LOCAL
    assert cli.store.aliases("digits")["champion"] == candidate
    assert {v.version: v.status for v in cli.store.versions("digits")} == {
        1: "archived",
        candidate: "production",
    }


def test_reject_with_a_token_and_the_token_from_the_environment(cli: Cli) -> None:
    token = cli.store.create_token("ann", "approver", "setup")
    first = cli.store.file_promotion("digits", cli.version(), EVIDENCE, "gates")
    done = cli.json("promotions", "reject", str(first), "--reason", "worse", token=token)
    assert done["status"] == "rejected" and done["decision"]["actor"] == "ann"
    second = cli.store.file_promotion("digits", cli.version(), EVIDENCE, "gates")
    run = cli.run(
        "promotions", "reject", str(second), "--reason", "no", "--json", env={"SERVO_TOKEN": token}
    )
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["decision"]["actor"] == "ann"
    assert cli.store.aliases("digits")["champion"] == 1


def test_rollback_and_retrain(cli: Cli) -> None:
    candidate = cli.version()
    request_id = cli.store.file_promotion("digits", candidate, EVIDENCE, "gates")
    cli.json("promotions", "approve", str(request_id), "--reason", "ok", "--immediate")
    back = cli.json("rollback", "digits", "--reason", "regression")
    assert back == {"model": "digits", "champion": 1, "was": candidate}
    assert cli.store.aliases("digits")["champion"] == 1
    human = cli.run("rollback", "digits", "--to", str(candidate))
    assert human.returncode == 0 and f"version {candidate} is champion (was 1)" in human.stdout
    queued = cli.json("retrain", "digits", "--reason", "fresh labels")
    assert queued["status"] == "queued"
    (taken,) = cli.store.take_retrain_requests()
    assert (taken["id"], taken["actor"], taken["reason"]) == (
        queued["request"],
        LOCAL,
        "fresh labels",
    )


def test_refusals_exit_1_are_audited_and_change_nothing(cli: Cli) -> None:
    viewer = cli.store.create_token("vic", "viewer", "setup")
    operator = cli.store.create_token("olga", "operator", "setup")
    request_id = cli.store.file_promotion(
        "digits", cli.version(), EVIDENCE, "gates", triggered_by=LOCAL
    )
    cases: list[tuple[list[str], str | None, str]] = [
        (
            ["promotions", "approve", str(request_id), "--reason", "r"],
            viewer,
            "needs role approver",
        ),
        (
            ["promotions", "reject", str(request_id), "--reason", "r"],
            operator,
            "needs role approver",
        ),
        (["retrain", "digits"], viewer, "needs role operator"),
        (["rollback", "digits"], viewer, "needs role operator"),
        (["tokens", "create", "eve", "--role", "approver"], operator, "needs role approver"),
        (["tokens", "revoke", "vic"], viewer, "needs role approver"),
        (["retrain", "nosuch"], operator, "model 'nosuch' is not registered"),
        (["rollback", "../etc"], operator, "invalid model name"),
        (["rollback", "digits"], operator, ""),  # no previous champion: a conflict
        (["promotions", "approve", "999", "--reason", "r"], None, "999"),
        # separation of duties: the local user triggered this run by hand
        (["promotions", "approve", str(request_id), "--reason", "mine"], None, ""),
        (
            [
                "promotions",
                "approve",
                str(request_id),
                "--reason",
                "r",
                "--evidence-hash",
                "0" * 64,
            ],
            None,
            "evidence",
        ),
    ]
    for args, token, message in cases:
        before = snapshot(cli.store)
        audited = len(cli.store.audit())
        error = cli.json(*args, token=token, code=1)["error"]
        assert message in error, (args, error)
        assert snapshot(cli.store) == before, args
        entries = cli.store.audit()[audited:]
        assert len(entries) == 1, (args, entries)
        assert entries[0]["actor"] == {viewer: "vic", operator: "olga", None: LOCAL}[token], args
    human = cli.run("retrain", "digits", token=viewer)
    assert human.returncode == 1 and human.stderr.startswith("Error: vic (roles: viewer)")
    unknown = cli.json("retrain", "digits", token="servo_" + "z" * 43, code=1)
    assert "unknown, revoked or malformed" in unknown["error"]
    assert cli.store.take_retrain_requests() == []
    assert cli.store.promotion(request_id)["status"] == "pending"


def test_help_says_who_acts_without_a_token(cli: Cli) -> None:
    run = cli.run("promotions", "approve", "--help")
    assert run.returncode == 0
    text = " ".join(run.stdout.split())  # click wraps the help
    assert "cli:$USER" in text and "whoever can write the registry can do anything" in text


def test_the_loop_commands_import_no_serving_stack_nor_trainers(cli: Cli) -> None:
    token = cli.store.create_token("ann", "approver", "setup")
    request_id = cli.store.file_promotion("digits", cli.version(), EVIDENCE, "gates")
    code = (
        "import json, sys\n"
        "from servo.cli import main\n"
        "for args in json.loads(sys.argv[1]):\n"
        "    try:\n"
        "        main(args, prog_name='servo')\n"
        "    except SystemExit as exc:\n"
        "        assert not exc.code, (args, exc.code)\n"
        "print('MODULES=' + json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    commands = [
        ["tokens", "list"], ["promotions", "list"], ["promotions", "show", str(request_id)],
        ["promotions", "approve", str(request_id), "--reason", "ok", "--token", token,
         "--immediate"],
        ["rollback", "digits"], ["retrain", "digits"],
    ]  # fmt: skip
    run = subprocess.run(
        [sys.executable, "-c", code, json.dumps([[*c, "--json"] for c in commands])],
        cwd=cli.cwd, capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT), "SERVO_REGISTRY_URL": cli.url},
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    modules = set(json.loads(run.stdout.rpartition("MODULES=")[2]))
    assert {"sqlalchemy", "click"} <= modules  # the probe sees what was imported
    heavy = {"onnxruntime", "grpc", "numpy", "pyarrow", "sklearn", "onnx", "uvloop", "orjson",
             "torch", "alembic"}  # fmt: skip
    assert not modules & heavy, sorted(modules & heavy)
    assert cli.store.aliases("digits")["champion"] == 1  # approved, then rolled back
