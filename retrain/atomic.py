"""Folders that appear whole or not at all: fsync the contents, then one rename."""

from __future__ import annotations

import errno
import os
from pathlib import Path


def fsync_tree(folder: Path) -> None:
    """Flush a folder's files and the folder itself to disk (before renaming it in)."""
    for path in folder.iterdir():
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
    fsync_dir(folder)


def fsync_dir(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def rename_into_place(source: Path, target: Path) -> bool:
    """Atomically rename the complete folder `source` to `target`; False if `target`
    already exists (and is not empty): someone else published it first."""
    try:
        source.rename(target)
    except OSError as exc:
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
            return False
        raise
    fsync_dir(target.parent)
    return True
