"""A registry store on SQLite in tmp_path or on a fresh schema of a real PostgreSQL (the
cluster of tests.postgres), for the tests that run on both. A test module imports the
`pg_url` fixture (one cluster per module) and makes its `store` fixture with
`backend_store`."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from registry.store import RegistryStore
from tests.postgres import postgres_cluster


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    with postgres_cluster() as url:
        yield url


def fresh_url(request: pytest.FixtureRequest, tmp_path: Path, backend: str) -> str:
    """An empty database: a SQLite file in tmp_path, or PostgreSQL's public schema dropped
    and made again (the module's `pg_url` fixture holds the cluster)."""
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'registry.db'}"
    url = str(request.getfixturevalue("pg_url"))
    store = RegistryStore(url)
    try:
        with store.engine.begin() as connection:
            connection.exec_driver_sql("DROP SCHEMA public CASCADE")
            connection.exec_driver_sql("CREATE SCHEMA public")
    finally:
        store.close()
    return url


@contextmanager
def backend_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RegistryStore]:
    """A store at the latest schema on the backend named by the fixture's param."""
    store = RegistryStore(fresh_url(request, tmp_path, str(request.param)))
    store.create_schema()
    try:
        yield store
    finally:
        store.close()
