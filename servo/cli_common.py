"""What the `servo` commands share: the registry option, opening the store, JSON output.
Only click at import time (see servo.cli)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click


def open_store(url: str) -> Any:
    from registry.store import RegistryStore

    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    store = RegistryStore(url)
    store.create_schema()
    return store


registry_option = click.option(
    "--registry",
    "registry_url",
    envvar="SERVO_REGISTRY_URL",
    default="sqlite:///.servo/registry.db",
    show_default=True,
    help="SQLAlchemy URL of the registry (SQLite file or PostgreSQL)",
)


def echo_json(doc: Any) -> None:
    click.echo(json.dumps(doc, indent=2, default=str))
