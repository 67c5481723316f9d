"""Feedback and the registry's tokens, on a real `servo serve --from-registry`: open while
no token exists; once one does, 401 without a valid bearer token, 403 for any role but
labeler, 200 for a labeler; a revoked token stops working. Also the Authenticator itself:
its header parsing and its cache on a real SQLite registry."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from registry.store import RegistryStore
from servo.auth import OPEN_CALLER, Authenticator, bearer_token
from servo.demo import digits_holdout
from tests.servers import RunningServer, start_server

X_TEST, Y_TEST = digits_holdout()


def infer_body(ident: str, row: int) -> bytes:
    return orjson.dumps(
        {
            "id": ident,
            "inputs": [
                {
                    "name": "input",
                    "datatype": "FP32",
                    "shape": [1, 64],
                    "data": X_TEST[row].tolist(),
                }
            ],
        }
    )


def poll(check: Callable[[], bool]) -> None:
    """Until `check()` holds (bounded by pytest-timeout)."""
    while not check():
        time.sleep(0.1)


@pytest.fixture
def served(model_root: Path, tmp_path: Path) -> Iterator[tuple[RunningServer, RegistryStore]]:
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    store = RegistryStore(url)
    store.create_schema()
    version = store.register_version("digits", (model_root / "digits" / "1").as_uri(), {})
    store.set_deployments("digits", [(version, "champion", 100.0)], actor="test")
    server = start_server(
        ["--from-registry"],
        tmp_path / "server.log",
        wait_for=["digits"],
        env={"SERVO_REGISTRY_URL": url, "SERVO_ROUTES_POLL_S": "0.1"},
    )
    try:
        yield server, store
    finally:
        assert server.stop() == 0, server.log()
        store.close()


def test_feedback_is_open_until_a_token_exists_then_needs_a_labeler(
    served: tuple[RunningServer, RegistryStore],
) -> None:
    server, store = served
    with httpx.Client(base_url=server.url, timeout=10) as client:
        for i in range(8):
            reply = client.post("/v2/models/digits/infer", content=infer_body(f"p{i}", i))
            assert reply.status_code == 200, reply.text

        def feedback(
            ident: str, token: str | None = None, header: str | None = None
        ) -> httpx.Response:
            headers = {"authorization": header or f"Bearer {token}"} if (token or header) else {}
            body = orjson.dumps({"id": ident, "label": int(Y_TEST[int(ident[1:])])})
            return client.post("/v2/models/digits/feedback", content=body, headers=headers)

        # no token in the registry: open to everyone
        open_reply = feedback("p0")
        assert open_reply.status_code == 200, open_reply.text
        assert open_reply.json()["accepted"] == 1

        tokens = {
            role: store.create_token(f"{role}-1", role, actor="test")
            for role in ("viewer", "labeler", "operator", "approver")
        }
        # the gateway learns within its cache time (5 s) that tokens exist now (p7 probes:
        # it may be labelled while feedback is still open)
        poll(lambda: feedback("p7").status_code == 401)
        refused = feedback("p1")
        assert refused.headers["www-authenticate"].startswith("Bearer")
        assert "feedback needs a bearer token of role labeler" in refused.json()["error"]
        assert "missing" in refused.json()["error"]
        unknown = feedback("p1", token="servo_" + "x" * 43)
        assert (
            unknown.status_code == 401
            and "unknown, revoked or malformed" in unknown.json()["error"]
        )
        assert feedback("p1", header="Basic dXNlcjpwYXNz").status_code == 401
        assert feedback("p1", header="Bearer").status_code == 401
        for role in ("viewer", "operator", "approver"):
            reply = feedback("p1", token=tokens[role])
            assert reply.status_code == 403, (role, reply.text)
            assert f"token '{role}-1' may not write labels" in reply.json()["error"]
            assert "needs labeler" in reply.json()["error"]
        # none of the refused requests stored p1's label: the labeler's is the first
        accepted = feedback("p1", token=tokens["labeler"])
        assert accepted.status_code == 200, accepted.text
        assert accepted.json()["accepted"] == 1 and accepted.json()["duplicates"] == 0
        assert feedback("p1", token=tokens["labeler"]).json()["duplicates"] == 1
        # lower-case scheme, as RFC 6750 allows
        assert feedback("p2", header=f"bearer {tokens['labeler']}").status_code == 200

        store.revoke_token("labeler-1", actor="test")
        poll(lambda: feedback("p6", token=tokens["labeler"]).status_code == 401)
        assert feedback("p3", token=tokens["labeler"]).status_code == 401
        # inference stays open: tokens are about labels and the admin API
        reply = client.post("/v2/models/digits/infer", content=infer_body("p9", 9))
        assert reply.status_code == 200


@pytest.mark.parametrize(
    ("header", "token"),
    [
        (None, None),
        ("", None),
        ("Bearer", None),
        ("Bearer ", None),
        ("Basic abc", None),
        ("Bearer a b", None),
        ("Bearer " + "a" * 257, None),
        ("Bearer caf\u00e9", None),
        ("Bearer servo_abc-DEF_123", "servo_abc-DEF_123"),
        ("bearer  servo_x=", "servo_x="),
        ("BEARER servo_x", "servo_x"),
    ],
)
def test_bearer_header_parsing(header: str | None, token: str | None) -> None:
    assert bearer_token(header) == token


def test_the_authenticator_caches_by_hash_and_fresh_asks_the_registry(tmp_path: Path) -> None:
    store = RegistryStore(f"sqlite:///{tmp_path / 'r.db'}")
    store.create_schema()
    now = [0.0]
    auth = Authenticator(store, cache_s=5.0, clock=lambda: now[0])
    try:
        assert not auth.tokens_required()
        assert auth.feedback_caller(None) == OPEN_CALLER
        token = store.create_token("lab", "labeler", actor="test")
        assert not auth.tokens_required()  # cached for 5 s
        now[0] = 5.1
        assert auth.tokens_required()
        assert auth.feedback_caller(None) is None
        identity = auth.identify(f"Bearer {token}")
        assert identity is not None and identity.name == "lab" and "labeler" in identity.roles
        caller = auth.feedback_caller(f"Bearer {token}")
        assert caller is not None and caller.identity == "lab" and "labeler" in caller.roles
        assert all(token not in key for key in auth._identities)  # keyed by its sha256
        store.revoke_token("lab", actor="test")
        assert auth.identify(f"Bearer {token}") is not None  # the cached answer, for now
        assert auth.identify(f"Bearer {token}", fresh=True) is None  # the registry's
        now[0] = 20.0
        assert auth.identify(f"Bearer {token}") is None
        # a flood of unknown tokens is bounded in memory
        small = Authenticator(store, cache_s=5.0, max_cached=8, clock=lambda: now[0])
        for i in range(50):
            assert small.identify(f"Bearer servo_unknown{i}") is None
        assert len(small._identities) == 8
    finally:
        store.close()
