"""
The JSON API under ``/api/``: each HTTP request becomes the protocol request that asks the same
thing, the dispatcher answers it, and the answer goes back as it is, with an HTTP status that
fits its Code (``STATUSES``, the one table).

So an answer here is the TCP protocol's answer by construction: same validation, same tokens
check, same errors. Nothing here reads a file or looks inside a job: the dispatcher does (its
blocking reads go through the server's thread runner).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from measuring.errors import BadRequest, MeasuringError, NotFound
from measuring.server.protocol import Answer, Dispatcher, encode
from measuring.wire import CODES, INFO_REQUESTS

#: The HTTP status of an answer, by its Code. (Timeout, Cancelled, MemoryLimit, JobFailed and
#: Unavailable are the Codes of a job's end, which only Dask answers carry; the HTTP API runs no
#: jobs.)
STATUSES: dict[str, int] = {
    "OK": http.OK,
    "BadRequest": http.BAD_REQUEST,
    "TooLarge": http.REQUEST_ENTITY_TOO_LARGE,
    "Unauthorized": http.UNAUTHORIZED,
    "Forbidden": http.FORBIDDEN,
    "NotFound": http.NOT_FOUND,
    "Busy": http.SERVICE_UNAVAILABLE,
    "Timeout": http.GATEWAY_TIMEOUT,
    "Cancelled": http.CONFLICT,
    "MemoryLimit": 422,
    "JobFailed": 422,
    "Unavailable": http.SERVICE_UNAVAILABLE,
    "Internal": http.INTERNAL_SERVER_ERROR,
}
assert set(STATUSES) == {"OK", *CODES}, "every Code needs an HTTP status"

JSON = b"application/json; charset=utf-8"


def slug(name: str) -> str:
    """An Info request's name in a path: ``All statistic`` is ``all-statistic``."""
    return name.lower().replace(" ", "-")


INFO = {slug(name): name for name in INFO_REQUESTS}
#: Query parameters and the request keys they stand for.
QUERY = {"state": "State", "limit": "Limit", "offset": "Offset"}


@dataclass(frozen=True)
class Route:
    """One kind of API path: its method, the query parameters it takes, its request."""

    pattern: re.Pattern[str]
    method: bytes
    query: tuple[str, ...]
    request: Callable[[re.Match[str]], dict[str, Any]]


def _job(name: str) -> Callable[[re.Match[str]], dict[str, Any]]:
    return lambda match: {"Header": "Job", "Request": name, "Job": match["job"]}


ROUTES = (
    Route(
        re.compile(r"info/(?P<name>[^/]+)"),
        b"GET",
        (),
        lambda match: {"Header": "Info", "Request": INFO.get(match["name"], match["name"])},
    ),
    Route(re.compile(r"jobs"), b"GET", ("state", "limit"), lambda _: {"Header": "Job",
                                                                      "Request": "List"}),
    Route(re.compile(r"jobs/(?P<job>[^/]+)"), b"GET", (), _job("Status")),
    Route(re.compile(r"jobs/(?P<job>[^/]+)/log"), b"GET", (), _job("Log")),
    Route(
        re.compile(r"jobs/(?P<job>[^/]+)/results/(?P<name>[^/]+)"),
        b"GET",
        ("offset", "limit"),
        lambda match: {**_job("Result")(match), "Name": match["name"]},
    ),
    Route(re.compile(r"jobs/(?P<job>[^/]+)/cancel"), b"POST", (), _job("Cancel")),
)  # fmt: skip


class WrongMethod(BadRequest):
    """A known path asked with the wrong method: answered 405 with an ``Allow`` header."""

    def __init__(self, message: str, allowed: bytes) -> None:
        super().__init__(message)
        self.allowed = allowed


def _query_value(text: str) -> int | str:
    # Numbers as numbers: the dispatcher checks their range and says so.
    return int(text) if re.fullmatch(r"-?\d{1,18}", text) else text


def protocol_request(method: bytes, path: str, query: dict[str, list[str]]) -> dict[str, Any]:
    """
    The protocol request for an API path (below ``/api/``, decoded) and its query parameters.
    Raises NotFound for a path the API does not have, BadRequest for a wrong query parameter,
    WrongMethod for a wrong method.
    """
    for route in ROUTES:
        match = route.pattern.fullmatch(path)
        if match is None:
            continue
        if method not in (route.method, b"HEAD" if route.method == b"GET" else route.method):
            asked = method.decode("ascii", "replace")
            raise WrongMethod(
                f"/api/{path} takes {route.method.decode()}, not {asked}", route.method
            )
        request = route.request(match)
        for name, values in query.items():
            if name not in route.query:
                accepted = ", ".join(route.query) or "none"
                raise BadRequest(
                    f"/api/{path} has no query parameter {name!r} (it takes: {accepted})"
                )
            if len(values) != 1:
                raise BadRequest(f"give the query parameter {name!r} once")
            request[QUERY[name]] = _query_value(values[0])
        return request
    raise NotFound(f"the HTTP API has no /api/{path} (docs/protocol.md lists its paths)")


def client_of(request: Request) -> str:
    """Who sent an HTTP request, for the log."""
    peer = request.getClientAddress()
    where = f"{peer.host}:{peer.port}" if hasattr(peer, "port") else str(peer)
    return f"{where} (HTTP)"


def respond(
    request: Request, answer: Answer, dispatcher: Dispatcher, status: int | None = None
) -> None:
    """Send ``answer`` as the response's JSON body, with the status of its Code."""
    error = answer.get("Error")
    code = error.get("Code", "Internal") if isinstance(error, dict) else "OK"
    request.setResponseCode(status or STATUSES.get(code, http.INTERNAL_SERVER_ERROR))
    request.setHeader(b"content-type", JSON)
    request.setHeader(b"cache-control", b"no-store")
    request.write(encode(answer, dispatcher))
    request.finish()


class ApiResource(Resource):
    """``/api/...``: protocol requests to the dispatcher, their answers back as JSON."""

    isLeaf = True

    def __init__(self, dispatcher: Dispatcher, credential: Callable[[Request], str | None]) -> None:
        super().__init__()
        self._dispatcher = dispatcher
        self._credential = credential

    def render(self, request: Request) -> int:
        path = "/".join(part.decode("utf-8", "replace") for part in request.postpath or [])
        path = path.removesuffix("/")
        query = {
            key.decode("utf-8", "replace"): [value.decode("utf-8", "replace") for value in values]
            for key, values in (request.args or {}).items()
        }
        try:
            assert request.method is not None
            asked = protocol_request(request.method, path, query)
        except MeasuringError as e:
            status = None
            if isinstance(e, WrongMethod):
                request.setHeader(b"allow", e.allowed)
                status = http.NOT_ALLOWED
            respond(request, self._dispatcher.refuse(e), self._dispatcher, status)
            return NOT_DONE_YET
        token = self._credential(request)
        if token is not None:
            asked["Token"] = token
        gone: list[Failure] = []
        request.notifyFinish().addErrback(gone.append)

        def answered(answer: Answer) -> None:
            if not gone:
                respond(request, answer, self._dispatcher)

        # Progress and Accepted lines only come to Dask requests, which the API does not make.
        answer: defer.Deferred[Answer] = self._dispatcher.handle(
            asked, lambda line: None, client_of(request)
        )
        answer.addCallback(answered)
        return NOT_DONE_YET
