"""The console's sessions: a login with an admin token opens one, kept in this process's
memory only (a restart logs everyone out; nothing secret is written anywhere).

A session id is 32 random bytes (URL-safe), sent back in the `servo_console` cookie
(HttpOnly, SameSite=Strict, Path=/console, Secure over https). The server keeps, per id,
the token (to re-check it against the registry on every request: a revoked token ends its
session at once), the identity it had at login, the session's CSRF token and its expiry
(8 h after login). Ids and CSRF tokens are compared in constant time.
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from servo.auth import Authenticator

if TYPE_CHECKING:
    from registry.store import Identity

COOKIE = "servo_console"
#: the login form's own double-submit cookie (a login CSRF guard: no session exists yet)
LOGIN_COOKIE = "servo_console_login"
SESSION_S = 8 * 3600.0
#: at most this many live sessions (the oldest goes first)
MAX_SESSIONS = 4096


@dataclass(frozen=True, slots=True)
class Session:
    id: str
    token: str
    identity: Identity
    csrf: str
    expires: float

    @property
    def roles(self) -> frozenset[str]:
        return self.identity.roles


class Sessions:
    """Console sessions by id; `current` re-checks the token every time."""

    def __init__(
        self,
        authenticator: Authenticator,
        lifetime_s: float = SESSION_S,
        *,
        max_sessions: int = MAX_SESSIONS,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.auth = authenticator
        self.lifetime_s = lifetime_s
        self.max_sessions = max_sessions
        self._clock = clock
        self._lock = threading.Lock()
        self._sessions: OrderedDict[str, Session] = OrderedDict()

    def login(self, token: str) -> Session | None:
        """A new session for a valid token; None for an unknown, revoked or malformed one."""
        identity = self.auth.identify(f"Bearer {token}", fresh=True)
        if identity is None:
            return None
        session = Session(
            id=secrets.token_urlsafe(32),
            token=token,
            identity=identity,
            csrf=secrets.token_urlsafe(32),
            expires=self._clock() + self.lifetime_s,
        )
        with self._lock:
            self._sessions[session.id] = session
            while len(self._sessions) > self.max_sessions:
                self._sessions.popitem(last=False)
        return session

    def current(self, session_id: str | None) -> Session | None:
        """The live session of `session_id`: None when there is none, it expired, or its
        token is no longer valid (revoked, or given another role): then it is ended."""
        if not session_id:
            return None
        with self._lock:
            session = self._sessions.get(session_id)
        if session is None or not hmac.compare_digest(session.id, session_id):
            return None
        if session.expires <= self._clock():
            self.logout(session_id)
            return None
        identity = self.auth.identify(f"Bearer {session.token}", fresh=True)
        if identity != session.identity:
            self.logout(session_id)
            return None
        return session

    def logout(self, session_id: str) -> None:
        with self._lock:
            self._sessions.pop(session_id, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)


def same_secret(given: str | None, expected: str) -> bool:
    """Whether a submitted CSRF (or login) token is the expected one, in constant time."""
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


def cookie_header(name: str, value: str, *, secure: bool, max_age: int) -> tuple[bytes, bytes]:
    """A `Set-Cookie` header scoped to the console (max_age 0: delete it)."""
    flags = f"; Max-Age={max_age}; Path=/console; HttpOnly; SameSite=Strict"
    if secure:
        flags += "; Secure"
    return b"set-cookie", f"{name}={value}{flags}".encode()


def cookies(header: bytes | None) -> dict[str, str]:
    """The cookies of a `Cookie` header (the first of a repeated name wins)."""
    found: dict[str, str] = {}
    if header is None:
        return found
    for part in header.decode("latin-1").split(";"):
        name, sep, value = part.strip().partition("=")
        if sep and name and name not in found:
            found[name] = value.strip()
    return found
