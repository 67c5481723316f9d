"""A throwaway PostgreSQL cluster in a temp dir, run as a non-root user, for tests."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.servers import free_port

BIN_DIRS = [
    Path("/usr/local/bin"),
    *sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True),
]


def find_binary(name: str) -> str | None:
    for folder in BIN_DIRS:
        if (folder / name).exists():
            return str(folder / name)
    return shutil.which(name)


def _user() -> str:
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    raise RuntimeError("no non-root user to run PostgreSQL as")


@contextmanager
def postgres_cluster() -> Iterator[str]:
    """Yield a SQLAlchemy URL of a fresh cluster; stop it and delete it after."""
    initdb, pg_ctl = find_binary("initdb"), find_binary("pg_ctl")
    if initdb is None or pg_ctl is None:
        raise RuntimeError("PostgreSQL server binaries (initdb, pg_ctl) not found")
    user = _user()
    entry = pwd.getpwnam(user)
    root = Path(tempfile.mkdtemp(prefix="servo-pg-", dir="/tmp"))
    data, sockets = root / "data", root / "sock"
    sockets.mkdir()
    os.chmod(root, 0o755)
    for path in (root, sockets):
        os.chown(path, entry.pw_uid, entry.pw_gid)
    port = free_port()

    def run(*args: str) -> None:
        command = [*args] if os.geteuid() != 0 else ["runuser", "-u", user, "--", *args]
        subprocess.run(command, check=True, capture_output=True, timeout=120, cwd=root)

    run(initdb, "-D", str(data), "-A", "trust", "-U", "servo", "--no-sync")
    options = f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1 -c fsync=off"
    run(pg_ctl, "-D", str(data), "-o", options, "-l", str(root / "server.log"), "-w", "start")
    try:
        yield f"postgresql+psycopg://servo@127.0.0.1:{port}/postgres"
    finally:
        try:
            run(pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop")
        finally:
            shutil.rmtree(root, ignore_errors=True)
