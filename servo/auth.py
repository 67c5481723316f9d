"""Who is calling: the bearer tokens of the registry (stored there as sha256 hashes only),
looked up through a small cache so feedback does not ask the database per request.

`Authenticator.identify` reads an `Authorization: Bearer <token>` header. Answers are
cached for `cache_s` seconds (by the token's sha256, never the token itself), so a token
revoked elsewhere stops working on the cached path within `cache_s`; the admin API asks
with `fresh=True` and sees a revocation at once. `tokens_required()` (any active token)
is cached the same way: feedback closes within `cache_s` of the first token's creation.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from serving.feedback import LABELER, Caller

if TYPE_CHECKING:
    from registry.store import Identity

#: RFC 6750's b64token, bounded (a servo token is "servo_" + 43 URL-safe characters)
_TOKEN = re.compile(r"[A-Za-z0-9._~+/-]{1,256}=*")
#: while no token exists, feedback is open: everyone may write labels
OPEN_CALLER = Caller(None, frozenset({LABELER}))


class TokenStore(Protocol):
    def authenticate(self, token: str) -> Identity | None: ...

    def has_tokens(self) -> bool: ...


def bearer_token(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header; None if there is none or
    the header is not of that form."""
    if header is None:
        return None
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not _TOKEN.fullmatch(token):
        return None
    return token


class Authenticator:
    def __init__(
        self,
        store: TokenStore,
        cache_s: float = 5.0,
        *,
        max_cached: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.store = store
        self.cache_s = cache_s
        self.max_cached = max_cached
        self._clock = clock
        self._lock = threading.Lock()
        #: sha256(token) -> (valid until, identity or None for an unknown/revoked token)
        self._identities: OrderedDict[str, tuple[float, Identity | None]] = OrderedDict()
        self._required: tuple[float, bool] | None = None

    def identify(self, authorization_header: str | None, *, fresh: bool = False) -> Identity | None:
        """The identity of the request's bearer token; None for none, a malformed header,
        an unknown or a revoked token. `fresh`: ask the registry, not the cache."""
        token = bearer_token(authorization_header)
        if token is None:
            return None
        key = hashlib.sha256(token.encode()).hexdigest()
        now = self._clock()
        if not fresh and self.cache_s > 0:
            with self._lock:
                hit = self._identities.get(key)
                if hit is not None and hit[0] > now:
                    return hit[1]
        identity = self.store.authenticate(token)
        if self.cache_s > 0:
            with self._lock:
                cache = self._identities
                cache[key] = (now + self.cache_s, identity)
                cache.move_to_end(key)
                while len(cache) > self.max_cached:
                    cache.popitem(last=False)
        return identity

    def tokens_required(self) -> bool:
        """Whether any active token exists (then feedback needs a labeler's)."""
        now = self._clock()
        with self._lock:
            cached = self._required
            if cached is not None and cached[0] > now:
                return cached[1]
        required = self.store.has_tokens()
        with self._lock:
            self._required = (now + self.cache_s, required)
        return required

    def forget(self) -> None:
        """Drop every cached answer (after this process created or revoked a token)."""
        with self._lock:
            self._identities.clear()
            self._required = None

    def feedback_caller(self, authorization_header: str | None) -> Caller | None:
        """The `serving.feedback.Authenticate` hook: open (a labeler for everyone) while no
        token exists; then the token's name and roles, or None (401)."""
        if not self.tokens_required():
            return OPEN_CALLER
        identity = self.identify(authorization_header)
        if identity is None:
            return None
        return Caller(identity.name, frozenset(identity.roles))
