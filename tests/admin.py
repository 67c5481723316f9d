"""What the admin tests share: a real SQLite registry with a served model, the admin API on
a real server on 127.0.0.1, tokens of each role, and a snapshot of the registry's state to
show that a refused request changed nothing."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from registry.store import RegistryStore
from retrain.rollout import ImmediateRollout, Rollout
from servo.admin import AdminServer, build_admin_app
from servo.auth import Authenticator

ROLES = ("viewer", "labeler", "operator", "approver")
EVIDENCE = {
    "trigger": {"signal": "accuracy_stall"},
    "live": {"n_labelled": 250, "champion": {"accuracy": 0.81}, "candidate": {"accuracy": 0.93}},
}


@dataclass
class Admin:
    store: RegistryStore
    server: AdminServer
    url: str
    tokens: dict[str, str] = field(default_factory=dict)
    root: Path = Path()

    def client(self, role: str | None = None, token: str | None = None) -> httpx.Client:
        secret = token if token is not None else (self.tokens[role] if role else None)
        headers = {"authorization": f"Bearer {secret}"} if secret else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=10)

    def version(self) -> int:
        """A new servable version of digits (a folder of its own)."""
        folder = self.root / f"digits-{len(self.store.versions('digits')) + 1}"
        folder.mkdir(parents=True)
        return self.store.register_version("digits", folder.as_uri(), {"accuracy": 0.9})

    def file(self, version: int | None = None, **kwargs: Any) -> int:
        """A pending promotion request for a new version (or `version`)."""
        version = self.version() if version is None else version
        return self.store.file_promotion("digits", version, EVIDENCE, "gates", **kwargs)


def make_registry(root: Path) -> RegistryStore:
    root.mkdir(parents=True, exist_ok=True)
    store = RegistryStore(f"sqlite:///{root / 'registry.db'}")
    store.create_schema()
    return store


def start_admin(root: Path, rollout: Rollout | None = None, **kwargs: Any) -> Admin:
    """The registry (digits version 1 as champion, one token per role) and the admin API
    on a free port of 127.0.0.1."""
    store = make_registry(root)
    admin = Admin(
        store,
        AdminServer(
            build_admin_app(
                store,
                rollout=rollout or ImmediateRollout(store),
                authenticator=Authenticator(store),
                **kwargs,
            )
        ),
        "",
        root=root,
    )
    first = admin.version()
    store.set_deployments("digits", [(first, "champion", 100.0)], actor="setup")
    store.set_alias("digits", "champion", first, actor="setup")
    admin.tokens = {role: store.create_token(f"{role}-1", role, "setup") for role in ROLES}
    port = admin.server.start(port=0)  # the default host: 127.0.0.1
    admin.url = f"http://127.0.0.1:{port}"
    return admin


@contextmanager
def running_admin(root: Path, rollout: Rollout | None = None, **kwargs: Any) -> Iterator[Admin]:
    admin = start_admin(root, rollout, **kwargs)
    try:
        yield admin
    finally:
        admin.server.stop()
        admin.store.close()


def snapshot(store: RegistryStore) -> dict[str, Any]:
    """Everything a refused admin request must leave as it was (the audit log may grow by
    the attempt; tokens' last use may move)."""
    return {
        "deployments": store.deployments(),
        "aliases": {m: store.aliases(m) for m in store.models()},
        "versions": {m: [(v.version, v.status) for v in store.versions(m)] for m in store.models()},
        "promotions": [{k: v for k, v in p.items() if k != "audit"} for p in store.promotions()],
        "tokens": [{k: v for k, v in t.items() if k != "last_used_at"} for t in store.tokens()],
        "loop": store.loop_states(),
    }
