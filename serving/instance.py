"""Which payload-log writer a file belongs to, and whether that writer still runs, on a
folder that gateway pods and the controller share (a volume mounted by many hosts).

Every writer (one `PayloadLog`) is an instance: `<host>.<pid>.<token>`, the host name (its
characters outside [A-Za-z0-9-] made "-"), the pid and a random token drawn at start, so
two pods whose servers are both pid 1 never share a name, and a restarted container never
takes its predecessor's. Every file a writer creates (data files, id indexes, their
temporary names, label journals) carries its instance in its name (`owner_of`).

A running writer holds an exclusive `flock` on its own lock file
`<root>/_writers/<instance>.lock` from before its first file until it stops; the kernel
releases it when the process dies, kill -9 included. A writer is dead when that lock can
be taken, or the lock file is gone (`alive`); a dead writer never comes back (a new start
is a new instance), so its leftovers can be cleaned up or replayed. flock works across
hosts on NFS (Linux maps it to NFS byte-range locks) and on CephFS or any filesystem with
coherent locks; the pid alone proves nothing there.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import secrets
import socket
import threading
from pathlib import Path

log = logging.getLogger("servo.serving")

WRITERS_DIR = "_writers"
_LOCK = ".lock"
_ID = r"[A-Za-z0-9-]{1,63}\.[0-9]{1,10}\.[0-9a-f]{16}"
#: a file name that carries its writer: "<stem>.<instance>.<ext>", maybe as a temporary
#: ".<name>.tmp"; the stem is "part-<ns>-<n>" (data file), "_part-<ns>-<n>" (its index)
#: or "labels-<ns>" (a label journal)
_OWNED = re.compile(rf"[._]*[a-z]+-[0-9-]+\.(?P<owner>{_ID})\.[a-z]+(?:\.tmp)?")
_LOCK_NAME = re.compile(rf"(?P<owner>{_ID})\.lock")

#: instances whose lock this process holds (checked before any lock file: on NFS a lock
#: is the process's, and closing another descriptor of the same file would drop it)
_held: set[str] = set()
_held_guard = threading.Lock()


def host_name(host: str | None = None) -> str:
    """`host` (default: this machine's name) as an instance's first field."""
    name = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname() if host is None else host)
    return name[:63] or "host"


def new_instance_id(host: str | None = None) -> str:
    return f"{host_name(host)}.{os.getpid()}.{secrets.token_hex(8)}"


def owner_of(name: str) -> str | None:
    """The instance in a file name written by a writer of this format, or None (a name
    from before instances, or not one of ours)."""
    match = _OWNED.fullmatch(name)
    return match["owner"] if match else None


def writer_alive(root: Path, name: str, me: Instance | None = None) -> bool | None:
    """Whether the writer of the file `name` in the log at `root` still runs, or None when
    the name is not one of ours. A name from before instances ("part-<ns>-<pid>-<n>",
    "journal-<pid>-<ns>") tells only a pid: judged on this host, as it was then."""
    owner = owner_of(name)
    if owner is not None:
        return me.alive(owner) if me is not None else alive(root, owner)
    pid = _legacy_pid(name)
    return None if pid is None else running_elsewhere(pid)


def _legacy_pid(name: str) -> int | None:
    fields = name.lstrip("._").split("-")
    at = {"part": 2, "journal": 1}.get(fields[0])
    try:
        return int(fields[at]) if at is not None else None
    except (IndexError, ValueError):
        return None


def running_elsewhere(pid: int) -> bool:
    """Whether `pid` is another process that is still running, on this host."""
    if pid == os.getpid():
        return False  # an earlier process with our pid (a restarted container's pid 1)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, another user's
    except (OverflowError, ValueError):
        return False  # not a pid
    return True


def lock_path(root: Path, instance: str) -> Path:
    return Path(root) / WRITERS_DIR / f"{instance}{_LOCK}"


def alive(root: Path, instance: str) -> bool:
    """Whether the writer `instance` still runs: this process holds its lock, or another
    process does. When that cannot be told (the lock file unreadable), it counts as
    running: its files are kept."""
    with _held_guard:
        if instance in _held:
            return True
    try:
        fd = os.open(lock_path(root, instance), os.O_RDONLY)
    except FileNotFoundError:
        return False  # removed once its writer was dead (a writer locks before writing)
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True  # held (EWOULDBLOCK), or cannot tell
    finally:
        os.close(fd)
    return False


class Instance:
    """This writer: its id and the lock that says it runs. `hold()` before creating a
    file; `release()` once nothing of it writes any more."""

    def __init__(self, root: Path, host: str | None = None):
        self.root = Path(root)
        self.id = new_instance_id(host)
        self._fd: int | None = None
        self._guard = threading.Lock()

    @property
    def held(self) -> bool:
        return self._fd is not None

    def hold(self) -> None:
        """Take the lock, unless held; raises OSError when the folder cannot hold it (the
        write that needed it fails, and is retried, like any write)."""
        with self._guard:
            if self._fd is None:
                self._fd = _lock(lock_path(self.root, self.id))
                with _held_guard:
                    _held.add(self.id)

    def release(self) -> None:
        """Remove the lock file, then let the lock go: this writer is dead to others."""
        with self._guard:
            if self._fd is None:
                return
            with contextlib.suppress(OSError):
                lock_path(self.root, self.id).unlink()
            os.close(self._fd)
            self._fd = None
            with _held_guard:
                _held.discard(self.id)

    def alive(self, instance: str) -> bool:
        return instance == self.id or alive(self.root, instance)

    def sweep_locks(self) -> int:
        """Remove the lock files of dead writers (kill -9 leaves them); returns how many."""
        try:
            names = [e.name for e in os.scandir(self.root / WRITERS_DIR)]
        except OSError:
            return 0
        removed = 0
        for name in names:
            match = _LOCK_NAME.fullmatch(name)
            if match and not self.alive(match["owner"]):
                removed += _remove_dead(self.root / WRITERS_DIR / name)
        return removed


def _lock(path: Path) -> int:
    """Create and lock `path`; again if a sweeper removed it before the lock was taken
    (it removes only files it could lock)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        # not inherited (Python's default): a child process never keeps a dead writer alive
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # a checker holds it an instant at most
            if _same_file(fd, path):
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


def _remove_dead(path: Path) -> int:
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return 0
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if not _same_file(fd, path):
            return 0
        path.unlink()
        return 1
    except OSError as exc:
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.ENOENT):
            log.warning("payload log: lock file %s not removed: %s", path, exc)
        return 0
    finally:
        os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


#: replays in this process take turns first (on NFS a lock is the process's, not a thread's)
_replaying = threading.Lock()


class ReplayLock:
    """A lock over the whole folder, held while dead writers' journals are replayed, so
    that writers starting together replay each journal once. Without `wait`, entering
    raises BlockingIOError when another writer holds it."""

    def __init__(self, root: Path, *, wait: bool = True):
        self.path = Path(root) / WRITERS_DIR / "replay.lock"
        self.wait = wait
        self._fd: int | None = None

    def __enter__(self) -> ReplayLock:
        if not _replaying.acquire(blocking=self.wait):
            raise BlockingIOError(errno.EWOULDBLOCK, "a replay runs in this process")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if self.wait else fcntl.LOCK_NB))
            except BaseException:
                os.close(fd)
                raise
        except BaseException:
            _replaying.release()
            raise
        self._fd = fd
        return self

    def __exit__(self, *_: object) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            _replaying.release()
