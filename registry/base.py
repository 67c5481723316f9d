"""The registry store's plumbing: engines, transactions with retries, the audit helper,
the Alembic migrations. `registry.store.RegistryStore` is the door; this is its frame."""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Engine, create_engine, event, select
from sqlalchemy import text as sql_text
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from registry.lite import migration_heads as _migration_heads
from registry.models import AuditEntry, Model, ModelVersion, utcnow

T = TypeVar("T")


class RegistryError(Exception):
    pass


class NotFound(RegistryError):
    pass


class PermissionDenied(RegistryError):
    """The actor may not do this (a wrong role, self-approval): HTTP 403."""


class Conflict(RegistryError):
    """The request is valid but the state forbids it (decided twice, expired, a rollout
    running, a name taken): HTTP 409. The message says why."""


class Invalid(RegistryError):
    """Bad input (a malformed name, an unknown role, a reason too long): HTTP 400."""


#: the longest reason a decision, a route change or a trigger may carry
MAX_REASON = 4096


def check_reason(reason: str) -> str:
    if not isinstance(reason, str):
        raise Invalid(f"a reason must be a string, got {type(reason).__name__}")
    if len(reason) > MAX_REASON:
        raise Invalid(f"the reason is {len(reason)} characters long (at most {MAX_REASON})")
    return reason


def canonical_json(doc: Any) -> str:
    """Sorted keys, no spaces, UTF-8 as is, no NaN or infinity (ValueError)."""
    return json.dumps(
        doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def json_object(value: Any, what: str) -> dict[str, Any]:
    """`value` as it reads back from a JSON column; Invalid unless a finite JSON object."""
    if not isinstance(value, dict):
        raise Invalid(f"{what} must be a JSON object, got {type(value).__name__}")
    try:
        text = canonical_json(value)
    except (TypeError, ValueError) as exc:
        raise Invalid(f"{what} is not finite JSON: {exc}") from exc
    doc: dict[str, Any] = json.loads(text)
    return doc


def aware(at: dt.datetime) -> dt.datetime:
    """A datetime read back from the database, in UTC (SQLite returns naive UTC ones)."""
    return at if at.tzinfo is not None else at.replace(tzinfo=dt.UTC)


def request_of(detail: dict[str, Any]) -> int | None:
    """The promotion request an audit entry names (detail["request"]), if it is an id."""
    value = detail.get("request")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _sqlite_engine(url: str) -> Engine:
    engine = create_engine(url, connect_args={"timeout": 30, "isolation_level": None})

    @event.listens_for(engine, "connect")
    def _pragmas(connection: Any, _: Any) -> None:
        cursor = connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection: Any) -> None:
        # take the write lock up front: two writers queue instead of deadlocking
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


#: a run elsewhere whose heartbeat is older than this is dead (registry.runs)
LEASE_S = 60.0


class StoreBase:
    def __init__(self, url: str, *, lease_s: float = LEASE_S):
        self.url = url
        self.lease_s = lease_s
        self.engine = (
            _sqlite_engine(url)
            if url.startswith("sqlite")
            else create_engine(url, pool_pre_ping=True)
        )
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def create_schema(self) -> None:
        """Bring the database to the latest schema with the Alembic migrations."""
        upgrade(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def _session(self) -> Iterator[Session]:
        with self._sessions.begin() as session:
            yield session

    def _retry(self, work: Callable[[Session], T], attempts: int = 20) -> T:
        for attempt in range(attempts):
            try:
                with self._session() as session:
                    return work(session)
            except (IntegrityError, OperationalError, DBAPIError) as exc:
                if attempt == attempts - 1 or not _retryable(exc):
                    raise
                time.sleep(0.01 * (attempt + 1))
        raise AssertionError("unreachable")

    def _locked_model(self, session: Session, name: str) -> Model:
        row = session.execute(
            select(Model).where(Model.name == name).with_for_update()
        ).scalar_one_or_none()
        if row is None:
            row = Model(name=name, last_version=0, created_at=utcnow())
            session.add(row)
            session.flush()  # a concurrent insert of the same name fails here -> retry
        return row

    def _audit(
        self,
        session: Session,
        *,
        actor: str,
        action: str,
        subject: str,
        detail: dict[str, Any],
        rollback: dict[str, Any] | None = None,
    ) -> None:
        session.add(
            AuditEntry(
                actor=actor,
                action=action,
                subject=subject,
                detail=detail,
                rollback=rollback,
                at=utcnow(),
                request_id=request_of(detail),
            )
        )


def version_row(session: Session, model: str, version: int, lock: bool = False) -> ModelVersion:
    query = select(ModelVersion).where(ModelVersion.model == model, ModelVersion.version == version)
    row = session.execute(query.with_for_update() if lock else query).scalar_one_or_none()
    if row is None:
        raise NotFound(f"model '{model}' has no version {version}")
    return row


def not_servable(row: ModelVersion) -> str:
    why = (
        "its folder was never completed (status failed)"
        if row.status == "failed"
        else "its folder is not complete yet"
    )
    return f"model '{row.model}' version {row.version} is not servable: {why}"


MIGRATIONS = Path(__file__).parent / "migrations"


def alembic_config(engine: Engine) -> Any:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False))
    return config


def _at_head(engine: Engine) -> bool:
    heads = _migration_heads()
    if heads is None:
        return False
    try:
        with engine.connect() as connection:
            rows = connection.execute(sql_text("SELECT version_num FROM alembic_version"))
            current = {str(row[0]) for row in rows}
    except DBAPIError:  # no version table yet: a new database
        return False
    return current == heads


def upgrade(engine: Engine, revision: str = "head") -> None:
    if revision == "head" and _at_head(engine):
        return
    from alembic import command

    # Alembic runs SQLite's migrations one transaction each and reads the current revision
    # outside them: two processes upgrading a new database at once both ran 0004 ("table
    # rollouts already exists", seen with three `servo train` at once). One at a time, the
    # second finding the first's work done.
    with _migration_lock(engine):
        if revision == "head" and _at_head(engine):
            return
        _migrate(engine, lambda config: command.upgrade(config, revision))


#: pg_advisory_lock's key for the registry's migrations ("servo" + "mig", any fixed number)
_PG_MIGRATION_LOCK = 0x7365_7276_6F6D_6967


@contextmanager
def _migration_lock(engine: Engine) -> Iterator[None]:
    """Migrations of one database one process at a time: an flock on a file beside a
    SQLite database (none for an in-memory one), a session advisory lock on PostgreSQL."""
    if engine.dialect.name == "sqlite":
        database = engine.url.database
        if not database or database == ":memory:":
            yield
            return
        import fcntl

        with open(f"{database}.migrate.lock", "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        return
    if engine.dialect.name == "postgresql":
        with engine.connect() as connection:
            connection.execute(sql_text("SELECT pg_advisory_lock(:k)"), {"k": _PG_MIGRATION_LOCK})
            connection.commit()
            try:
                yield
            finally:
                connection.execute(
                    sql_text("SELECT pg_advisory_unlock(:k)"), {"k": _PG_MIGRATION_LOCK}
                )
                connection.commit()
        return
    yield


def downgrade(engine: Engine, revision: str) -> None:
    from alembic import command

    _migrate(engine, lambda config: command.downgrade(config, revision))


def _migrate(engine: Engine, step: Callable[[Any], None]) -> None:
    """Run an Alembic command on one connection. On SQLite, foreign keys are not enforced
    meanwhile (a batch operation copies a table, drops it and renames the copy: the drop
    would fail while other tables' rows refer to it) and are checked after."""
    config = alembic_config(engine)
    with engine.connect() as connection:
        sqlite = connection.dialect.name == "sqlite"
        raw: Any = connection.connection.driver_connection
        if sqlite:  # outside a transaction, or the pragma does nothing
            raw.execute("PRAGMA foreign_keys=OFF")
        try:
            config.attributes["connection"] = connection
            step(config)
            if connection.in_transaction():
                connection.commit()
            if sqlite:
                broken = raw.execute("PRAGMA foreign_key_check").fetchall()
                if broken:
                    raise RegistryError(f"the migration broke foreign keys: {broken[:5]}")
        finally:
            if sqlite:
                if connection.in_transaction():
                    connection.rollback()
                raw.execute("PRAGMA foreign_keys=ON")


def _retryable(exc: Exception) -> bool:
    text = str(exc).lower()
    return isinstance(exc, IntegrityError) or any(
        marker in text
        for marker in ("database is locked", "could not serialize", "deadlock", "busy")
    )
