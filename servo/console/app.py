"""The ops console: server-rendered HTML pages under `/console` on the admin port.

`console_routes(api)` gives the routes the admin app serves next to `/admin`: the login
flow (`GET`/`POST /console/login`, `POST /console/logout`), the stylesheet, and each page
module's routes (`routes(console)` of every module in `_page_modules()`). Pages read with
any role; actions need the role the admin API asks for and go through the admin API's own
code (`AdminApi.decide`), so the registry's rules (separation of duties, the evidence hash)
hold alike.

Every answer carries the console's security headers (`SECURITY_HEADERS`: a CSP without
inline scripts or styles, nosniff, no referrer, no caching). Templates are Jinja2 with
autoescape on for every template, whatever its name. A page without a live session
redirects (303) to the login page; a POST without the session's CSRF token, or by a role
that may not act, is refused (403) and audited like the admin API's refusals.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from importlib import resources
from typing import TYPE_CHECKING, Any, NoReturn
from urllib.parse import parse_qsl

import jinja2

from registry.store import RegistryError
from serving.http import Handler, Request, Response, Route
from servo.admin_wire import ApiError, status_of
from servo.console.auth import (
    COOKIE,
    LOGIN_COOKIE,
    SESSION_S,
    Session,
    Sessions,
    cookie_header,
    cookies,
    same_secret,
)

if TYPE_CHECKING:
    from registry.store import RegistryStore
    from servo.admin import AdminApi

log = logging.getLogger("servo.console")

HTML = b"text/html; charset=utf-8"
CSP = (
    "default-src 'none'; style-src 'self'; img-src 'self' data:; script-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = (
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
)
LOGIN = "/console/login"
HOME = "/console/models"
#: the links of every page's header: (label, path); page modules' own pages
NAV = (
    ("Models", "/console/models"),
    ("Runs", "/console/runs"),
    ("Promotions", "/console/promotions"),
    ("Rollouts", "/console/rollouts"),
    ("Monitors", "/console/monitors"),
)
#: a console form has few fields
MAX_FIELDS = 16
LOGIN_NONCE_S = 600


class ConsoleError(Exception):
    """An answer other than the page: its HTTP status and a message shown as text."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = int(status)
        self.message = message


@dataclass(frozen=True, slots=True)
class Visit:
    """One request of a logged-in user to a page or an action."""

    console: Console
    request: Request
    session: Session
    form: dict[str, str]

    @property
    def store(self) -> RegistryStore:
        return self.console.store

    def render(self, template: str, status: int = 200, **context: Any) -> Response:
        """The page `template` for this user (their name, role and CSRF token given)."""
        return self.console.render(template, status, session=self.session, **context)

    def param(self, name: str) -> str:
        return self.request.params[name]


View = Callable[[Visit], Response]


def redirect(location: str, status: int = HTTPStatus.SEE_OTHER) -> Response:
    return Response(int(status), b"", HTML, [(b"location", location.encode())])


def parse_form(body: bytes) -> dict[str, str]:
    """An `application/x-www-form-urlencoded` body; a repeated or unparsable one is a 400."""
    if not body:
        return {}
    try:
        pairs = parse_qsl(
            body.decode("utf-8"),
            keep_blank_values=True,
            strict_parsing=True,
            max_num_fields=MAX_FIELDS,
        )
    except (UnicodeDecodeError, ValueError) as exc:
        raise ConsoleError(HTTPStatus.BAD_REQUEST, f"not a form body: {exc}") from None
    form: dict[str, str] = {}
    for name, value in pairs:
        if name in form:
            raise ConsoleError(HTTPStatus.BAD_REQUEST, f"the field {name!r} is repeated")
        form[name] = value
    return form


def positive_id(text: str, what: str) -> int:
    """A path's id; anything but a plain positive number is not found (404)."""
    if not (text.isascii() and text.isdigit() and 0 < len(text) <= 18) or int(text) == 0:
        raise ConsoleError(HTTPStatus.NOT_FOUND, f"no {what} {text[:32]!r}")
    return int(text)


class Console:
    def __init__(self, api: AdminApi, *, secure: bool = False, sessions: Sessions | None = None):
        self.api = api
        self.store = api.store
        self.secure = secure
        self.sessions = sessions if sessions is not None else Sessions(api.auth)
        self.env = jinja2.Environment(
            loader=jinja2.PackageLoader("servo.console", "templates"),
            autoescape=True,  # every template, whatever its name
            undefined=jinja2.ChainableUndefined,  # evidence parts may be missing
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.globals["nav"] = NAV
        self.stylesheet = (resources.files("servo.console") / "static" / "console.css").read_bytes()

    # rendering

    def render(self, template: str, status: int = 200, **context: Any) -> Response:
        """`template` rendered with `context` (escaped) as an HTML response."""
        context.setdefault("session", None)
        html = self.env.get_template(template).render(**context)
        return Response(int(status), html.encode(), HTML)

    def error_page(self, status: int, message: str, session: Session | None = None) -> Response:
        title = f"{int(status)} {HTTPStatus(status).phrase}"
        return self.render("error.html", status, title=title, message=message, session=session)

    # the frames of every handler

    def page(self, view: View) -> Handler:
        """A GET page: a live session or a redirect to the login page."""

        async def handler(request: Request) -> Response:
            return await asyncio.to_thread(self._serve, request, view, None, None)

        return handler

    def action(self, view: View, action: str, role: str | None = None) -> Handler:
        """A POST form: a live session, the session's CSRF token and `role` (if any), or a
        403 audited as a refused attempt to `action`."""

        async def handler(request: Request) -> Response:
            return await asyncio.to_thread(self._serve, request, view, action, role)

        return handler

    def plain(self, view: Callable[[Request], Response]) -> Handler:
        """A handler needing no session (login, stylesheet), with the security headers."""

        async def handler(request: Request) -> Response:
            return secured(await asyncio.to_thread(view, request))

        return handler

    def session_of(self, request: Request) -> Session | None:
        return self.sessions.current(cookies(request.header(b"cookie")).get(COOKIE))

    def _serve(
        self, request: Request, view: View, action: str | None, role: str | None
    ) -> Response:
        session = None
        try:
            session = self.session_of(request)
            if action is None:
                if session is None:
                    return secured(redirect(LOGIN))
                return secured(view(Visit(self, request, session, {})))
            form = parse_form(request.body)
            if session is None:
                self._refuse(
                    "(no console session)",
                    action,
                    request,
                    HTTPStatus.FORBIDDEN,
                    "no live console session (log in again)",
                    anonymous=True,
                )
            if not same_secret(form.get("csrf"), session.csrf):
                self._refuse(
                    session.identity.name,
                    action,
                    request,
                    HTTPStatus.FORBIDDEN,
                    "the form's CSRF token is missing or not this session's",
                )
            if role is not None and role not in session.roles:
                self._refuse(
                    session.identity.name,
                    action,
                    request,
                    HTTPStatus.FORBIDDEN,
                    f"token '{session.identity.name}' (role {session.identity.role}) may not"
                    f" {action} (needs role {role})",
                )
            try:
                return secured(view(Visit(self, request, session, form)))
            except (ApiError, ConsoleError, RegistryError) as exc:
                code = status_of(exc) if isinstance(exc, RegistryError) else exc.status
                message = str(exc) if isinstance(exc, RegistryError) else exc.message
                self._refuse(session.identity.name, action, request, code, message)
        except ConsoleError as exc:
            return secured(self.error_page(exc.status, exc.message, session))
        except ApiError as exc:
            return secured(self.error_page(exc.status, exc.message, session))
        except RegistryError as exc:
            return secured(self.error_page(status_of(exc), str(exc), session))
        except Exception:
            log.exception("console error on %s %s", request.method, request.path)
            return secured(self.error_page(500, "internal error (see the server's log)", session))

    def _refuse(
        self,
        actor: str,
        action: str,
        request: Request,
        status: int,
        message: str,
        *,
        anonymous: bool = False,
    ) -> NoReturn:
        """Audit a refused attempt (an anonymous one within the admin API's budget) and
        end the request with `status`."""
        if not anonymous or self.api.anonymous_attempts.take():
            self.api.attempt(actor, f"console {action}", request, status, message)
        raise ConsoleError(status, message)

    # the login flow

    def login_form(self, request: Request) -> Response:
        if self.session_of(request) is not None:
            return redirect(HOME)
        return self._login_page(200, "")

    def _login_page(self, status: int, error: str) -> Response:
        nonce = _nonce()
        response = self.render("login.html", status, error=error, nonce=nonce)
        response.headers.append(
            cookie_header(LOGIN_COOKIE, nonce, secure=self.secure, max_age=LOGIN_NONCE_S)
        )
        return response

    def login(self, request: Request) -> Response:
        try:
            form = parse_form(request.body)
        except ConsoleError as exc:
            return self._login_page(exc.status, exc.message)
        nonce = cookies(request.header(b"cookie")).get(LOGIN_COOKIE)
        if nonce is None or not same_secret(form.get("nonce"), nonce):
            return self._login_page(HTTPStatus.FORBIDDEN, "the login form expired: try again")
        session = self.sessions.login(form.get("token", "").strip())
        if session is None:
            message = "unknown, revoked or malformed token"
            if self.api.anonymous_attempts.take():
                self.api.attempt("(unknown token)", "console login", request, 401, message)
            return self._login_page(HTTPStatus.UNAUTHORIZED, message)
        log.info("console login by %s (%s)", session.identity.name, session.identity.role)
        response = redirect(HOME)
        response.headers += [
            cookie_header(COOKIE, session.id, secure=self.secure, max_age=int(SESSION_S)),
            cookie_header(LOGIN_COOKIE, "", secure=self.secure, max_age=0),
        ]
        return response

    def logout(self, visit: Visit) -> Response:
        self.sessions.logout(visit.session.id)
        response = redirect(LOGIN)
        response.headers.append(cookie_header(COOKIE, "", secure=self.secure, max_age=0))
        return response

    def css(self, request: Request) -> Response:
        return Response(200, self.stylesheet, b"text/css; charset=utf-8")

    def routes(self) -> list[Route]:
        routes = [
            Route("GET", "/console", self.plain(lambda request: redirect(HOME))),
            Route("GET", LOGIN, self.plain(self.login_form)),
            Route("POST", LOGIN, self.plain(self.login)),
            Route("POST", "/console/logout", self.action(self.logout, "logout")),
            Route("GET", "/console/static/console.css", self.plain(self.css)),
        ]
        for module in _page_modules():
            routes += module.routes(self)
        # last: any other console path is a page that does not exist (HTML, headers)
        missing = self.page(self.missing)
        routes += [Route("GET", "/console" + "/{p}" * depth, missing) for depth in (1, 2, 3)]
        return routes

    def missing(self, visit: Visit) -> Response:
        raise ConsoleError(HTTPStatus.NOT_FOUND, f"no console page {visit.request.path[:128]}")


def secured(response: Response) -> Response:
    """`response` with the console's security headers."""
    response.headers.extend(SECURITY_HEADERS)
    return response


def _nonce() -> str:
    return secrets.token_urlsafe(24)


def _page_modules() -> list[Any]:
    """The page modules (imported here: they import this module)."""
    from servo.console import (
        pages_models,
        pages_monitors,
        pages_promotions,
        pages_rollouts,
        pages_runs,
    )

    return [pages_models, pages_runs, pages_promotions, pages_rollouts, pages_monitors]


def console_routes(api: AdminApi, *, secure: bool = False) -> list[Route]:
    """The console's routes on the admin app of `api` (`secure`: served over https, the
    cookies say `Secure`)."""
    return Console(api, secure=secure).routes()
