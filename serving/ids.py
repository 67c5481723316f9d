"""Ids for requests that bring none.

An id is the 128-bit keyed BLAKE2b hash of a counter, the key drawn once per process from
the OS: without the key, ids seen in answers say nothing about the next one (so nobody can
label someone else's prediction first), and issuing one costs a hash, no system call.
"""

from __future__ import annotations

import hashlib
import itertools
import os


class RequestIds:
    def __init__(self, key: bytes | None = None) -> None:
        self._key = key if key is not None else os.urandom(32)
        self._counter = itertools.count(1)

    def next(self) -> str:
        data = next(self._counter).to_bytes(16, "little")
        return hashlib.blake2b(data, key=self._key, digest_size=16).hexdigest()
