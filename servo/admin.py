"""The admin API: promotions and their decisions, manual retrains, rollbacks, pausing the
loop, the audit log, on its own port (127.0.0.1 by default), JSON in and out.

Canary rollouts (registry.rollouts) are read with their judge's looks, and an operator
can roll a running one back (`POST /admin/rollouts/{id}/rollback`, a reason required).

Served by Servo's own HTTP server (`serving.httpserver.NativeHttpServer`) from the same
kind of route table as the data plane (`serving.http.AsgiApp`), on a thread and event loop
of its own, so an admin request never waits behind inference nor inference behind the
registry. Every request needs a bearer token (`servo tokens create`): 401 without a valid
one (with `WWW-Authenticate: Bearer`), 403 for a role that may not act, 404 for what does
not exist, 409 for a state that forbids it, 400 for a bad body or parameter, 413 for a body
over `max_body_bytes`. Every refused attempt to act is audited (`store.audit_attempt`).

Roles: every role reads; operator retrains, rolls back (a model, or a rollout), pauses and
resumes; approver
approves and rejects (and the registry enforces separation of duties and the evidence
hash). An approval starts the rollout (`retrain.rollout.Rollout`) at once.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from registry.store import PROMOTION_STATUSES, ROLLOUT_STATUSES, RegistryError
from retrain.rollout import Rollout
from serving.errors import ServingError
from serving.http import (
    AsgiApp,
    Handler,
    Request,
    Response,
    Route,
    error_response,
    json_response,
)
from serving.httplimits import HttpLimits
from serving.httpserver import NativeHttpServer
from serving.model_folder import valid_name
from servo.admin_wire import (
    MAX_DIGITS,
    ApiError,
    AttemptBudget,
    DecisionBody,
    ReasonBody,
    RollbackBody,
    RolloutRollbackBody,
    model_name,
    one_of,
    parse_body,
    parse_query,
    positive_int,
    shown,
    status_of,
)
from servo.auth import Authenticator
from servo.console.app import console_routes

if TYPE_CHECKING:
    from registry.store import Identity, RegistryStore

log = logging.getLogger("servo.admin")

CHALLENGE = (b"www-authenticate", b'Bearer realm="servo-admin"')
#: the admin port holds few clients: its own, smaller cap on open connections
ADMIN_LIMITS = HttpLimits(max_connections=64)


@dataclass(frozen=True, slots=True)
class Call:
    """One authenticated admin request."""

    request: Request
    identity: Identity

    @property
    def actor(self) -> str:
        return self.identity.name


Work = Callable[[Call], tuple[int, Any]]


class AdminApi:
    def __init__(
        self,
        store: RegistryStore,
        rollout: Rollout,
        authenticator: Authenticator,
        policy_for: Callable[[str], Any] | None = None,
    ):
        self.store = store
        self.rollout = rollout
        self.auth = authenticator
        self.policy_for = policy_for
        self.anonymous_attempts = AttemptBudget()

    # the frame of every endpoint: who, may they, then the work (off the event loop)

    def endpoint(self, work: Work, action: str | None = None, role: str | None = None) -> Handler:
        """An async handler running `work` in a thread for an identified caller.
        `action`: the request acts (its refusals are audited); `role`: it needs that role."""

        async def handler(request: Request) -> Response:
            return await asyncio.to_thread(self._handle, request, work, action, role)

        return handler

    def _handle(
        self, request: Request, work: Work, action: str | None, role: str | None
    ) -> Response:
        header = request.header(b"authorization")
        text = header.decode("latin-1") if header is not None else None
        identity = self.auth.identify(text, fresh=True)
        if identity is None:
            what = "missing" if header is None else "unknown, revoked or malformed"
            message = (
                f"a bearer token is needed (Authorization: Bearer <token>); this one is {what}"
            )
            if action is not None and self.anonymous_attempts.take():
                self.attempt(f"({what} token)", action, request, HTTPStatus.UNAUTHORIZED, message)
            response = error_response(HTTPStatus.UNAUTHORIZED, message)
            response.headers.append(CHALLENGE)
            return response
        call = Call(request, identity)
        try:
            if role is not None and role not in identity.roles:
                raise ApiError(
                    HTTPStatus.FORBIDDEN,
                    f"token '{identity.name}' (role {identity.role}) may not {action or 'do this'}"
                    f" (needs role {role})",
                )
            status, doc = work(call)
        except (ApiError, RegistryError) as exc:
            code = exc.status if isinstance(exc, ApiError) else status_of(exc)
            message = exc.message if isinstance(exc, ApiError) else str(exc)
            if action is not None:
                self.attempt(identity.name, action, request, code, message)
            return error_response(code, message)
        return json_response(status, doc)

    def attempt(self, actor: str, action: str, request: Request, status: int, message: str) -> None:
        """Audit a refused attempt to act; a failure to audit is logged, never raised."""
        params = request.params
        detail: dict[str, Any] = {"status": int(status), "error": message[:512]}
        if "id" in params:
            ident = params["id"]
            numeric = ident.isascii() and ident.isdigit() and len(ident) <= MAX_DIGITS
            subject = f"promotion/{ident if numeric else shown(ident, 32)}"
            if numeric:
                detail["request"] = int(ident)  # links it to the request's own audit
        elif "rollout" in params:
            ident = params["rollout"]
            numeric = ident.isascii() and ident.isdigit() and len(ident) <= MAX_DIGITS
            subject = f"rollout/{ident if numeric else shown(ident, 32)}"
        else:
            name = params.get("model", "")
            subject = name if valid_name(name) else shown(name)
        try:
            self.store.audit_attempt(actor, action, subject, detail)
        except Exception:
            log.exception("refused %s by %s not audited", action, actor)
        log.warning("refused %s %s by %s: %s %s", action, subject, actor, int(status), message)

    def refused(self, method: str, path: str, error: ServingError, params: dict[str, str]) -> None:
        """A POST refused before its body was read (413): audited as an attempt, off the
        event loop (the caller is not known: it is refused before its token is read)."""
        if method != "POST" or not self.anonymous_attempts.take():
            return
        action = path.rsplit("/", 1)[-1] if params else f"POST {path[:128]}"
        request = Request(method, path, params, [])
        loop = asyncio.get_running_loop()
        loop.run_in_executor(
            None, self.attempt, "(unread request)", action, request, error.status, error.message
        )

    # reads

    def promotions(self, call: Call) -> tuple[int, Any]:
        query = parse_query(call.request.query, ("status", "model"))
        model = query.get("model")
        if model is not None:
            model_name(model)
        status = one_of(query.get("status"), PROMOTION_STATUSES, "status")
        requests = self.store.promotions(model=model, status=status)
        return 200, {"promotions": requests}

    def promotion(self, call: Call) -> tuple[int, Any]:
        return 200, self.store.promotion(_request_id(call))

    def audit(self, call: Call) -> tuple[int, Any]:
        query = parse_query(call.request.query, ("limit", "since_id", "subject", "action"))
        limit = positive_int(query.get("limit", "100"), "limit")
        since = query.get("since_id")
        entries = self.store.audit(
            limit=min(limit, 1000),
            since_id=None if since is None else positive_int(since, "since_id", minimum=0),
            subject=query.get("subject"),
            action=query.get("action"),
        )
        return 200, {"entries": entries}

    def list_rollouts(self, call: Call) -> tuple[int, Any]:
        query = parse_query(call.request.query, ("model", "status", "limit"))
        model = query.get("model")
        if model is not None:
            model_name(model)
        status = one_of(query.get("status"), ROLLOUT_STATUSES, "status")
        limit = min(positive_int(query.get("limit", "100"), "limit"), 1000)
        return 200, {"rollouts": self.store.rollouts(model=model, status=status, limit=limit)}

    def show_rollout(self, call: Call) -> tuple[int, Any]:
        """A rollout and every look of its judge (counts and verdict), in order."""
        rollout_id = _rollout_id(call)
        doc = self.store.rollout(rollout_id)
        return 200, {"rollout": doc, "looks": self.store.rollout_looks(rollout_id)}

    def loop(self, call: Call) -> tuple[int, Any]:
        return 200, {"models": self.store.loop_states()}

    def tokens(self, call: Call) -> tuple[int, Any]:
        return 200, {"tokens": self.store.tokens()}  # names, roles and dates; never hashes

    def whoami(self, call: Call) -> tuple[int, Any]:
        identity = call.identity
        return 200, {"name": identity.name, "role": identity.role, "roles": sorted(identity.roles)}

    # decisions

    def approve(self, call: Call) -> tuple[int, Any]:
        return self._decide(call, "approved")

    def reject(self, call: Call) -> tuple[int, Any]:
        return self._decide(call, "rejected")

    def _decide(self, call: Call, decision: str) -> tuple[int, Any]:
        body = parse_body(call.request.body, DecisionBody)
        return 200, self.decide(_request_id(call), decision, call.identity, body)

    def decide(
        self, request_id: int, decision: str, identity: Identity, body: DecisionBody
    ) -> dict[str, Any]:
        """Approve or reject a request for `identity` (the admin API's and the console's
        one path): the registry checks roles, separation of duties and the evidence hash;
        an approval starts the rollout. Returns the request as it is now."""
        store = self.store
        doc = store.decide(
            request_id,
            decision,
            identity.name,
            set(identity.roles),
            body.reason,
            evidence_hash=body.evidence_hash,
            separation_of_duties=self._separation_of_duties(request_id),
        )
        if decision == "approved":
            status = self.rollout.start(doc, identity.name)
            log.info("promotion request %s approved by %s: %s", request_id, identity.name, status)
            doc = store.promotion(request_id)
        return doc

    def _separation_of_duties(self, request_id: int) -> bool:
        """The model's policy (approval.separation_of_duties), on unless it says off."""
        if self.policy_for is None:
            return True
        model = self.store.promotion(request_id)["model"]
        try:
            approval = getattr(self.policy_for(model), "approval", None)
        except Exception:
            log.exception("policy of %s not read; separation of duties stays on", model)
            return True
        return bool(getattr(approval, "separation_of_duties", True))

    # operations on a model

    def _registered(self, call: Call) -> str:
        name = model_name(call.request.params["model"])
        if name not in self.store.models():
            raise ApiError(HTTPStatus.NOT_FOUND, f"model '{name}' is not registered")
        return name

    def retrain(self, call: Call) -> tuple[int, Any]:
        name = self._registered(call)
        body = parse_body(call.request.body, ReasonBody)
        request = self.store.request_retrain(name, call.actor, body.reason)
        return 202, {"model": name, "request": request, "status": "queued"}

    def rollback(self, call: Call) -> tuple[int, Any]:
        name = self._registered(call)
        body = parse_body(call.request.body, RollbackBody)
        was = self.store.aliases(name).get("champion")
        champion = self.store.rollback(name, call.actor, body.reason, to=body.to)
        return 200, {"model": name, "champion": champion, "was": was}

    def rollback_rollout(self, call: Call) -> tuple[int, Any]:
        rollout_id = _rollout_id(call)
        body = parse_body(call.request.body, RolloutRollbackBody)
        self.store.rollback_rollout(rollout_id, call.actor, body.reason, None)
        log.warning("rollout %s rolled back by %s: %s", rollout_id, call.actor, body.reason)
        return 200, self.store.rollout(rollout_id)

    def pause(self, call: Call) -> tuple[int, Any]:
        name = self._registered(call)
        self.store.pause_loop(name, call.actor, parse_body(call.request.body, ReasonBody).reason)
        return 200, {"model": name, "paused": True}

    def resume(self, call: Call) -> tuple[int, Any]:
        name = self._registered(call)
        self.store.resume_loop(name, call.actor, parse_body(call.request.body, ReasonBody).reason)
        return 200, {"model": name, "paused": False}

    def routes(self) -> list[Route]:
        e = self.endpoint
        return [
            Route("GET", "/admin/promotions", e(self.promotions)),
            Route("GET", "/admin/promotions/{id}", e(self.promotion)),
            Route("POST", "/admin/promotions/{id}/approve", e(self.approve, "approve", "approver")),
            Route("POST", "/admin/promotions/{id}/reject", e(self.reject, "reject", "approver")),
            Route("POST", "/admin/models/{model}/retrain", e(self.retrain, "retrain", "operator")),
            Route(
                "POST", "/admin/models/{model}/rollback", e(self.rollback, "rollback", "operator")
            ),
            Route("POST", "/admin/models/{model}/pause", e(self.pause, "pause", "operator")),
            Route("POST", "/admin/models/{model}/resume", e(self.resume, "resume", "operator")),
            Route("GET", "/admin/rollouts", e(self.list_rollouts)),
            Route("GET", "/admin/rollouts/{rollout}", e(self.show_rollout)),
            Route(
                "POST",
                "/admin/rollouts/{rollout}/rollback",
                e(self.rollback_rollout, "rollback rollout", "operator"),
            ),
            Route("GET", "/admin/audit", e(self.audit)),
            Route("GET", "/admin/loop", e(self.loop)),
            Route("GET", "/admin/tokens", e(self.tokens)),
            Route("GET", "/admin/whoami", e(self.whoami)),
        ]


def _request_id(call: Call) -> int:
    return positive_int(call.request.params["id"], "a promotion request id")


def _rollout_id(call: Call) -> int:
    return positive_int(call.request.params["rollout"], "a rollout id")


def build_admin_app(
    store: RegistryStore,
    *,
    rollout: Rollout,
    authenticator: Authenticator,
    policy_for: Callable[[str], Any] | None = None,
    max_body_bytes: int = 65536,
    console: bool = True,
    console_secure: bool = False,
) -> AsgiApp:
    """The admin API as an app of Servo's HTTP layer (served by `AdminServer`, or by any
    ASGI server), with the ops console under `/console` unless `console` is off
    (`console_secure`: it is served over https, its cookies say `Secure`)."""
    api = AdminApi(store, rollout, authenticator, policy_for)
    routes = api.routes()
    if console:
        routes += console_routes(api, secure=console_secure)
    app = AsgiApp(routes, max_body_bytes)

    def refused(method: str, path: str, error: ServingError) -> None:
        api.refused(method, path, error, app.match(method, path)[1])

    app.on_refused = refused
    return app


class AdminServer:
    """The admin app on Servo's native HTTP server, on a thread with its own event loop.
    `start()` returns once it listens; `stop()` lets in-flight requests finish."""

    def __init__(self, app: AsgiApp, limits: HttpLimits = ADMIN_LIMITS):
        self.app = app
        self.limits = limits
        self.port: int | None = None
        self.host: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: NativeHttpServer | None = None

    def start(self, host: str = "127.0.0.1", port: int = 8082) -> int:
        if self._thread is not None:
            raise RuntimeError("the admin server is running already")
        if host not in ("127.0.0.1", "::1", "localhost"):
            log.warning("the admin API listens on %s: reachable beyond this machine", host)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            sock.close()
            raise
        self.host, self.port = host, sock.getsockname()[1]
        loop = asyncio.new_event_loop()
        started: Future[None] = Future()
        server = NativeHttpServer(self.app, self.app.max_body_bytes, self.limits)

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(server.start(sock))
            except BaseException as exc:
                started.set_exception(exc)
                loop.close()
                return
            started.set_result(None)
            loop.run_forever()
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()

        self._loop, self._server = loop, server
        self._thread = threading.Thread(target=run, name="servo-admin", daemon=True)
        self._thread.start()
        started.result(timeout=30)
        log.info("admin API on http://%s:%s/admin, console on /console", host, self.port)
        return self.port

    def stop(self, grace_s: float = 5.0) -> None:
        loop, server, thread = self._loop, self._server, self._thread
        if loop is None or server is None or thread is None:
            return
        if not loop.is_closed():
            stopping = asyncio.run_coroutine_threadsafe(server.stop(grace_s), loop)
            try:
                stopping.result(timeout=grace_s + 10)
            finally:
                loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=grace_s + 10)
        self._loop = self._server = self._thread = None


__all__ = ["AdminServer", "build_admin_app"]
