"""The registry store on SQLite and on a real PostgreSQL: versions, aliases with history,
audit log, and two writer processes that never lose or corrupt each other's writes."""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from registry.store import NotFound, RegistryError, RegistryStore
from tests.postgres import postgres_cluster


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    with postgres_cluster() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'registry.db'}"
    else:
        made = request.getfixturevalue("pg_url")
        store = RegistryStore(made)
        with store.engine.begin() as connection:  # a fresh database for every test
            connection.exec_driver_sql("DROP SCHEMA public CASCADE")
            connection.exec_driver_sql("CREATE SCHEMA public")
        store.close()
        yield made


def test_versions_aliases_and_audit(url: str) -> None:
    store = RegistryStore(url)
    store.create_schema()
    try:
        assert store.register_version("digits", "file:///a/1", {"accuracy": 0.97}) == 1
        assert store.register_version("digits", "file:///a/2", {"accuracy": 0.98}) == 2
        assert [v.version for v in store.versions("digits")] == [1, 2]
        assert store.version("digits", 2).metrics == {"accuracy": 0.98}
        assert store.set_alias("digits", "champion", 1, actor="ops", reason="first") is None
        assert store.set_alias("digits", "champion", 2, actor="ops", reason="better") == 1
        assert store.alias("digits", "champion") == 2
        history = store.alias_history("digits")
        assert [(h["from"], h["to"], h["actor"]) for h in history] == [
            (None, 1, "ops"),
            (1, 2, "ops"),
        ]
        store.set_status("digits", 2, "production", actor="ops")
        assert store.version("digits", 2).status == "production"
        with pytest.raises(NotFound):
            store.set_alias("digits", "champion", 9, actor="ops")
        with pytest.raises(RegistryError, match="unknown status"):
            store.set_status("digits", 1, "golden", actor="ops")
        audit = store.audit()
        assert [a["action"] for a in audit] == ["register", "register", "alias", "alias", "status"]
        assert audit[3]["rollback"] == {"alias": "champion", "version": 1}
        run = store.start_run("digits", "manual", {"seed": 0})
        store.record_step(run, "train", status="succeeded", cache_key="abc", duration_s=1.5)
        store.record_artifact(run, "train", name="model", direction="output", uri="file:///m",
                              content_hash="sha256:00", size=10)  # fmt: skip
        store.finish_run(run, "succeeded")
    finally:
        store.close()


def test_migrations_match_the_tables(url: str) -> None:
    from alembic import command

    from registry.store import alembic_config

    store = RegistryStore(url)
    store.create_schema()
    store.create_schema()  # idempotent
    try:
        config = alembic_config(store.engine)
        with store.engine.connect() as connection:
            config.attributes["connection"] = connection
            command.check(config)  # raises if the models drifted from the migrations
    finally:
        store.close()


def _writer(url: str, role: str, count: int) -> None:
    store = RegistryStore(url)
    try:
        for i in range(count):
            if role == "pipeline":
                store.register_version("digits", f"file:///runs/{i}", {"i": i})
            else:
                store.register_version("digits", f"file:///ops/{i}", {"i": i}, actor="ops")
                store.set_alias("digits", "champion", 1, actor="ops", reason=f"move {i}")
    finally:
        store.close()


def _create_schema(url: str, start: Any) -> None:
    start.wait(60)
    store = RegistryStore(url)
    try:
        store.create_schema()
    finally:
        store.close()


def test_processes_creating_one_new_schema_at_once_all_succeed(url: str) -> None:
    """Three `servo train` on a new registry at once once failed with "table rollouts
    already exists": Alembic reads the revision outside SQLite's per-migration
    transactions. Migrations now take a lock (an flock beside the SQLite file, an advisory
    lock on PostgreSQL); each process finds the database at the head, or brings it there."""
    context = multiprocessing.get_context("spawn")
    start = context.Event()
    makers = [context.Process(target=_create_schema, args=(url, start)) for _ in range(4)]
    for process in makers:
        process.start()
    start.set()
    for process in makers:
        process.join(120)
    assert [p.exitcode for p in makers] == [0] * 4
    store = RegistryStore(url)
    try:
        store.create_schema()  # at the head: nothing to do
        with store.engine.connect() as connection:
            (current,) = connection.exec_driver_sql("SELECT version_num FROM alembic_version")
        from registry.lite import migration_heads

        assert {current[0]} == migration_heads()
    finally:
        store.close()


def test_two_writer_processes_lose_nothing(url: str) -> None:
    store = RegistryStore(url)
    store.create_schema()
    store.register_version("digits", "file:///seed", {})
    context = multiprocessing.get_context("spawn")
    writers = [
        context.Process(target=_writer, args=(url, "pipeline", 40)),
        context.Process(target=_writer, args=(url, "operator", 25)),
    ]
    for process in writers:
        process.start()
    for process in writers:
        process.join(120)
        assert process.exitcode == 0
    try:
        versions = [v.version for v in store.versions("digits")]
        assert versions == list(range(1, 1 + 1 + 40 + 25))  # unique, contiguous, none lost
        uris = {v.artifact_uri for v in store.versions("digits")}
        assert {f"file:///runs/{i}" for i in range(40)} <= uris
        assert {f"file:///ops/{i}" for i in range(25)} <= uris
        assert len(store.alias_history("digits")) == 25
        actions = [a["action"] for a in store.audit()]
        assert actions.count("register") == 66 and actions.count("alias") == 25
    finally:
        store.close()


def test_promotion_requests_need_an_approver_and_are_decided_once(url: str) -> None:
    from registry.store import PermissionDenied

    store = RegistryStore(url)
    store.create_schema()
    try:
        store.register_version("digits", "file:///1", {})
        store.register_version("digits", "file:///2", {})
        evidence = {"trigger": {"psi": 0.31}, "comparison": {"mcnemar_p_value": 0.004}}
        first = store.file_promotion("digits", 2, evidence, actor="scheduler")
        second = store.file_promotion("digits", 2, {"again": True}, actor="scheduler")
        with pytest.raises(NotFound):
            store.file_promotion("digits", 9, {}, actor="scheduler")
        with pytest.raises(PermissionDenied, match="needs role approver"):
            store.decide(first, "approved", actor="intern", roles={"viewer"})
        store.decide(first, "approved", actor="ops", roles={"approver"}, reason="better on live")
        with pytest.raises(RegistryError, match="already approved"):
            store.decide(first, "rejected", actor="ops", roles={"approver"})
        store.decide(second, "rejected", actor="ops", roles={"approver"}, reason="duplicate")
        requests = store.promotions("digits")  # pending first (none left), then newest first
        assert [(r["id"], r["status"]) for r in requests] == [
            (second, "rejected"),
            (first, "approved"),
        ]
        assert requests[1]["evidence"] == evidence
        assert requests[1]["decision"]["actor"] == "ops"
        assert requests[1]["decision"]["reason"] == "better on live"
        assert store.promotions(status="pending") == []
        actions = [a["action"] for a in store.audit()]
        assert actions.count("promotion_filed") == 2
        assert "promotion_approved" in actions and "promotion_rejected" in actions
    finally:
        store.close()
