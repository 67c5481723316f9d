"""Alembic environment: the registry's tables, on the connection the store passes in."""

from __future__ import annotations

from alembic import context

from registry.models import Base

connection = context.config.attributes.get("connection")
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection is not None and connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
