"""The admin API's wire format: request bodies (pydantic, extra keys refused), query
strings, path parameters, and the one mapping from registry errors to HTTP statuses.

Every refusal is an `ApiError` with a precise status and message, answered as
`{"error": "..."}`; nothing from a request is echoed unbounded or unescaped."""

from __future__ import annotations

import threading
import time
from http import HTTPStatus
from typing import Any, TypeVar
from urllib.parse import parse_qsl

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from registry.store import Conflict, Invalid, NotFound, PermissionDenied, RegistryError
from serving.model_folder import NAME_RULE, valid_name

#: the longest reason a decision or an action may carry (the registry's own limit)
MAX_REASON = 4096
#: request ids and versions: positive integers of at most this many digits
MAX_DIGITS = 18

B = TypeVar("B", bound=BaseModel)


class ApiError(Exception):
    """A refused admin request: its status and the message answered as {"error": ...}."""

    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def shown(text: str, limit: int = 64) -> str:
    """Text from a request, safe to put in an error message or the audit log."""
    return repr(text[:limit]) + ("..." if len(text) > limit else "")


def status_of(exc: RegistryError) -> HTTPStatus:
    """The registry's refusals as HTTP statuses (once, here)."""
    if isinstance(exc, NotFound):
        return HTTPStatus.NOT_FOUND
    if isinstance(exc, PermissionDenied):
        return HTTPStatus.FORBIDDEN
    if isinstance(exc, Invalid):
        return HTTPStatus.BAD_REQUEST
    if isinstance(exc, Conflict):
        return HTTPStatus.CONFLICT
    return HTTPStatus.CONFLICT  # any other refusal is about the registry's state


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ReasonBody(_Body):
    reason: str = Field("", max_length=MAX_REASON)


class DecisionBody(ReasonBody):
    #: the sha256 of the evidence the approver saw; another one is a 409
    evidence_hash: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")


class RolloutRollbackBody(_Body):
    #: required: an operator ending a rollout says why (the audit keeps it)
    reason: str = Field(min_length=1, max_length=MAX_REASON)


class RollbackBody(ReasonBody):
    #: the version to go back to (None: the previous champion)
    to: int | None = Field(None, ge=1, lt=10**MAX_DIGITS)


def parse_body(body: bytes, model: type[B]) -> B:
    """A JSON object body (empty: {}) as `model`; 400 naming the bad field."""
    doc: Any = {}
    if body.strip():
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"the body is not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise ApiError(HTTPStatus.BAD_REQUEST, "the body must be a JSON object")
    try:
        return model.model_validate(doc)
    except ValidationError as exc:
        raise ApiError(HTTPStatus.BAD_REQUEST, validation_message(exc)) from None


def validation_message(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors()[:3]:
        where = ".".join(str(p) for p in error["loc"]) or "body"
        if error["type"] == "extra_forbidden":
            parts.append(f"unknown field {shown(where)}")
        elif error["type"] == "string_too_long":
            parts.append(f"field '{where}': longer than {MAX_REASON} characters")
        else:
            parts.append(f"field '{where}': {error['msg']}")
    return "; ".join(parts)


def parse_query(query: bytes, allowed: tuple[str, ...]) -> dict[str, str]:
    """A query string's parameters (each at most once, only `allowed` ones)."""
    if len(query) > 2048:
        raise ApiError(HTTPStatus.BAD_REQUEST, "the query string is longer than 2048 bytes")
    try:
        pairs = parse_qsl(query.decode("latin-1"), keep_blank_values=True, strict_parsing=False)
    except ValueError as exc:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"invalid query string ({exc})") from None
    params: dict[str, str] = {}
    for key, value in pairs:
        if key not in allowed:
            takes = ", ".join(allowed) or "no parameters"
            raise ApiError(
                HTTPStatus.BAD_REQUEST, f"unknown query parameter {shown(key)} (takes {takes})"
            )
        if key in params:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"query parameter '{key}' given twice")
        params[key] = value
    return params


def positive_int(text: str, what: str, minimum: int = 1) -> int:
    """An integer >= `minimum` (1 or 0) from a path or query (digits only, bounded)."""
    digits = text.isascii() and text.isdigit() and len(text) <= MAX_DIGITS
    if not digits or int(text) < minimum:
        kind = "a positive integer" if minimum >= 1 else "an integer >= 0"
        raise ApiError(HTTPStatus.BAD_REQUEST, f"{what} must be {kind}, got {shown(text)}")
    return int(text)


def one_of(text: str | None, known: tuple[str, ...], what: str) -> str | None:
    if text is not None and text not in known:
        known_list = ", ".join(known)
        raise ApiError(
            HTTPStatus.BAD_REQUEST, f"unknown {what} {shown(text)} (known: {known_list})"
        )
    return text


def model_name(text: str) -> str:
    """A model name from the path: 400 unless it follows the naming rule (never a path)."""
    if not valid_name(text):
        raise ApiError(HTTPStatus.BAD_REQUEST, f"invalid model name {shown(text)} ({NAME_RULE})")
    return text


class AttemptBudget:
    """Refused attempts by callers without a valid token are audited, but at most `burst`
    of them at once and `per_s` a second afterwards, so a flood cannot grow the audit log
    without bound; the rest are counted in `dropped`."""

    def __init__(self, per_s: float = 1.0, burst: float = 60.0):
        self.per_s = per_s
        self.burst = burst
        self._level = burst
        self._at = time.monotonic()
        self._lock = threading.Lock()
        self.dropped = 0

    def take(self) -> bool:
        with self._lock:
            now = time.monotonic()
            self._level = min(self.burst, self._level + (now - self._at) * self.per_s)
            self._at = now
            if self._level >= 1:
                self._level -= 1
                return True
            self.dropped += 1
            return False
