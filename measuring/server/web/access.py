"""
Who may use the HTTP side, and from where. ``Gate`` is the root every HTTP request passes first.

- With a token file, every request but the login page and the static files needs a token: an
  ``Authorization: Bearer`` header, or the session cookie that the login form sets, as does
  opening any page with ``?token=<secret>`` (which then redirects to the same address without
  it, as Jupyter does). The cookie (``HttpOnly; SameSite=Strict``) holds a keyed hash of the
  token, not the token: the TCP protocol's secret never sits in the browser.
- A POST from a page of another site is refused (``Sec-Fetch-Site``, else ``Origin`` against
  ``Host``), so no page elsewhere can cancel a job through a logged-in browser.
- A server without tokens answers only requests addressed to a loopback name, so that a page
  elsewhere cannot reach it by pointing its own name at 127.0.0.1 (DNS rebinding).

Every response gets headers that keep it out of frames, off other sites' scripts and out of
Referer headers. Plain checks on the request: no I/O.
"""

from __future__ import annotations

import hashlib
import hmac
import html
import re
from collections.abc import Callable
from string import Template
from urllib.parse import urlencode, urlsplit

from twisted.logger import Logger
from twisted.web import http
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request

from measuring.errors import Forbidden, MeasuringError, Unauthorized
from measuring.server.access import Tokens, loopback
from measuring.server.protocol import Answer, Dispatcher
from measuring.server.web.api import respond

#: How long a login lasts in the browser, in seconds (then it asks for the token again).
SESSION_SECONDS = 7 * 86400
#: What the cookie's keyed hash is of: the name says what it is for.
_SESSION = b"measuring dashboard session"
#: Paths anyone may fetch: the page scripts and styles (public code), and the login form.
PUBLIC = (b"static", b"login", b"logout")
#: Paths whose refusals are JSON answers, as the protocol's are; other refusals go to the login.
MACHINE = (b"api", b"metrics")
HEADERS = {
    b"content-security-policy": b"default-src 'self'; img-src 'self' data:; "
    b"frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    b"x-content-type-options": b"nosniff",
    b"x-frame-options": b"DENY",
    b"referrer-policy": b"no-referrer",
}
UNAUTHORIZED = 'this server needs a token: "Authorization: Bearer <token>", or log in at /login'


class Sessions:
    """The tokens, and the browser sessions made from them."""

    def __init__(self, tokens: tuple[str, ...]) -> None:
        self.tokens = Tokens(tokens)
        self._cookies = [
            (hmac.new(token.encode(), _SESSION, hashlib.sha256).hexdigest().encode(), token)
            for token in tokens
        ]

    @staticmethod
    def cookie_name(request: Request) -> bytes:
        """One cookie per port: servers on one host do not log each other out."""
        port = getattr(request.getHost(), "port", "")
        return f"measuring-session-{port}".encode()

    def from_cookie(self, value: bytes | None) -> str | None:
        """The token a session cookie stands for (every one compared, in constant time)."""
        found = None
        for cookie, token in self._cookies:
            if hmac.compare_digest(value or b"", cookie):
                found = token
        return found if value else None

    def credential(self, request: Request) -> str | None:
        """The token a request carries, as a Bearer header or as a session cookie."""
        authorization = request.getHeader(b"authorization")
        if authorization is not None and authorization[:7].lower() == b"bearer ":
            return authorization[7:].strip().decode("utf-8", "replace")
        return self.from_cookie(request.getCookie(self.cookie_name(request)))

    def allowed(self, request: Request) -> bool:
        """True when the request may be served: no tokens, or one of them."""
        return not self.tokens.required or self.tokens.valid(self.credential(request))

    def log_in(self, request: Request, token: str) -> None:
        """Set the session cookie of ``token`` (a valid one)."""
        value = next(cookie for cookie, known in self._cookies if known == token)
        self._set(request, value, SESSION_SECONDS)

    def log_out(self, request: Request) -> None:
        self._set(request, b"", 0)

    def _set(self, request: Request, value: bytes, seconds: int) -> None:
        request.addCookie(
            self.cookie_name(request), value, path=b"/", max_age=str(seconds).encode(),
            httpOnly=True, sameSite="strict", secure=request.isSecure(),
        )  # fmt: skip


def cross_site(request: Request) -> bool:
    """
    True when a browser sent this request from a page of another site. (A request without
    either header does not come from a browser page, which sends ``Origin`` with every POST.)
    """
    fetched = request.getHeader(b"sec-fetch-site")
    if fetched is not None:
        return fetched not in (b"same-origin", b"none")
    origin = request.getHeader(b"origin")
    if origin is None:
        return False
    host = request.getHeader(b"host") or b""
    return urlsplit(origin.decode("latin-1")).netloc.lower() != host.decode("latin-1").lower()


def next_page(value: str | None) -> bytes:
    """Where to go after logging in: a page of the dashboard (``#/...``), nowhere else."""
    if value and re.fullmatch(r"#/[\w./%-]*", value):
        return b"./" + value.encode()
    return b"./"


def _redirect(request: Request, to: bytes) -> bytes:
    request.setResponseCode(http.SEE_OTHER)
    request.setHeader(b"location", to)
    request.setHeader(b"cache-control", b"no-store")
    return b""


def _without_token(request: Request) -> bytes:
    """The address of ``request`` without its ``token`` query parameter."""
    path = (request.path or b"/").split(b"?")[0]
    kept = [
        (key, value) for key, values in (request.args or {}).items() if key != b"token"
        for value in values
    ]  # fmt: skip
    return path + (b"?" + urlencode(kept).encode() if kept else b"")


class Refusal(Resource):
    """A refused request: the protocol's error answer as JSON, or for a page, plain text."""

    isLeaf = True

    def __init__(self, error: MeasuringError, dispatcher: Dispatcher, machine: bool) -> None:
        super().__init__()
        self._error = error
        self._dispatcher = dispatcher
        self._machine = machine

    def render(self, request: Request) -> bytes | int:
        answer: Answer = self._dispatcher.refuse(self._error)
        if self._machine:
            respond(request, answer, self._dispatcher)
            return NOT_DONE_YET
        request.setResponseCode(http.FORBIDDEN)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return f"{self._error.code}: {self._error.message}\n".encode()


class ToLogin(Resource):
    """A page asked for without a token: to the login form, and back here after it."""

    isLeaf = True

    def render(self, request: Request) -> bytes:
        return _redirect(request, b"/login")


class Login(Resource):
    """``/login``: the form (GET) and what it sends (POST): the token, checked, then a cookie."""

    isLeaf = True
    _log = Logger()

    def __init__(
        self, sessions: Sessions, form: Template, client: Callable[[Request], str]
    ) -> None:
        super().__init__()
        self._sessions = sessions
        self._form = form
        self._client = client

    def _page(self, request: Request, message: str, then: str) -> bytes:
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        return self._form.substitute(
            message=html.escape(message), next=html.escape(then, quote=True)
        ).encode()

    def _field(self, request: Request, name: bytes) -> str:
        values = (request.args or {}).get(name) or [b""]
        return values[0].decode("utf-8", "replace")

    def render_GET(self, request: Request) -> bytes:
        if not self._sessions.tokens.required:
            return _redirect(request, b"./")  # nothing to log in to
        return self._page(request, "", self._field(request, b"next"))

    def render_POST(self, request: Request) -> bytes:
        token, then = self._field(request, b"token").strip(), self._field(request, b"next")
        if not self._sessions.tokens.required:
            return _redirect(request, b"./")
        if not self._sessions.tokens.valid(token):
            self._log.warn("refused a login without a valid token from {client}",
                           client=self._client(request))  # fmt: skip
            request.setResponseCode(http.UNAUTHORIZED)
            return self._page(request, "That is not one of this server's tokens.", then)
        self._sessions.log_in(request, token)
        return _redirect(request, next_page(then))


class Logout(Resource):
    """``/logout``: forget the session cookie, then the login form."""

    isLeaf = True

    def __init__(self, sessions: Sessions) -> None:
        super().__init__()
        self._sessions = sessions

    def render_GET(self, request: Request) -> bytes:
        self._sessions.log_out(request)
        return _redirect(request, b"/login")

    render_POST = render_GET


class Gate(Resource):
    """The root of the HTTP side: checks each request, then hands it to ``pages``."""

    _log = Logger()

    def __init__(
        self,
        pages: Resource,
        sessions: Sessions,
        dispatcher: Dispatcher,
        client: Callable[[Request], str],
        loopback_only: bool,
    ) -> None:
        super().__init__()
        self._pages = pages
        self._sessions = sessions
        self._dispatcher = dispatcher
        self._client = client
        self._loopback_only = loopback_only

    def getChildWithDefault(self, path: bytes, request: Request) -> IResource:
        for name, value in HEADERS.items():
            request.setHeader(name, value)
        refusal = self._refusal(path, request)
        if refusal is not None:
            return refusal
        token = (request.args or {}).get(b"token")
        if token and request.method in (b"GET", b"HEAD"):
            given = token[0].decode("utf-8", "replace")
            if self._sessions.tokens.required and self._sessions.tokens.valid(given):
                self._sessions.log_in(request, given)
                return _Redirect(_without_token(request))
        if path not in PUBLIC and not self._sessions.allowed(request):
            self._log.warn("refused an HTTP request without a valid token from {client}",
                           client=self._client(request))  # fmt: skip
            if path in MACHINE:
                return Refusal(Unauthorized(UNAUTHORIZED), self._dispatcher, machine=True)
            return ToLogin()
        return self._pages.getChildWithDefault(path, request)

    def _refusal(self, path: bytes, request: Request) -> Resource | None:
        machine = path in MACHINE
        hostname = request.getRequestHostname().decode("ascii", "replace")
        if self._loopback_only and not self._sessions.tokens.required and not loopback(hostname):
            return Refusal(
                Forbidden(
                    f"this server has no token, so it answers only requests for localhost, "
                    f"not for {hostname!r}"
                ),
                self._dispatcher,
                machine,
            )
        if request.method == b"POST" and cross_site(request):
            self._log.warn("refused a POST from another site's page, from {client}",
                           client=self._client(request))  # fmt: skip
            return Refusal(
                Forbidden("a POST from a page of another site is refused"),
                self._dispatcher,
                machine,
            )
        return None

    def render(self, request: Request) -> bytes:
        # Only reached for a request without a path; every path goes through the children.
        return _redirect(request, b"/")


class _Redirect(Resource):
    isLeaf = True

    def __init__(self, to: bytes) -> None:
        super().__init__()
        self._to = to

    def render(self, request: Request) -> bytes:
        return _redirect(request, self._to)
