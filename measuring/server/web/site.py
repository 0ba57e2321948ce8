"""
The HTTP side put together: the dashboard's files, ``/api/``, ``/metrics`` and the login pages
below the ``Gate``, in a ``twisted.web`` Site.

The dashboard's files (``static/``: its page, script and styles, and the chart library
vendored with its licence) are read once, when the site is built; a request for them reads no
file. The Site writes no access log (the dashboard asks several times a second; refusals are
logged where they happen).
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Iterator
from importlib.abc import Traversable
from string import Template
from typing import Any

from twisted.web import server, static
from twisted.web.resource import Resource

from measuring.server.protocol import Dispatcher
from measuring.server.web.access import Gate, Login, Logout, Sessions
from measuring.server.web.api import ApiResource, client_of
from measuring.server.web.metrics import MetricsPage

#: The largest request body taken (the API takes none; the login form, a token).
MAX_BODY = 64 * 1024
TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".md": "text/plain; charset=utf-8",
    ".LICENSE": "text/plain; charset=utf-8",
}
PACKAGE = importlib.resources.files("measuring.server.web")


def _files(folder: Traversable, prefix: str = "") -> Iterator[tuple[str, Traversable]]:
    for entry in sorted(folder.iterdir(), key=lambda entry: entry.name):
        if entry.is_dir():
            yield from _files(entry, f"{prefix}{entry.name}/")
        elif not entry.name.startswith("."):
            yield f"{prefix}{entry.name}", entry


def static_tree() -> Resource:
    """``static/``, every file read into memory, with its content type."""
    top = Resource()
    for path, entry in _files(PACKAGE / "static"):
        kind = next((t for ending, t in TYPES.items() if entry.name.endswith(ending)), None)
        if kind is None:
            raise ValueError(f"static/{path} has no content type (add its ending to TYPES)")
        *folders, name = path.split("/")
        parent = top
        for folder in folders:
            child = parent.children.get(folder.encode())
            if child is None:
                child = Resource()
                parent.putChild(folder.encode(), child)
            parent = child
        parent.putChild(name.encode(), static.Data(entry.read_bytes(), kind))
    return top


class LimitedRequest(server.Request):
    """A request whose body may be at most ``MAX_BODY`` bytes; beyond, the connection is closed."""

    _received = 0

    def handleContentChunk(self, data: bytes) -> None:
        self._received += len(data)
        if self._received > MAX_BODY:
            if self.channel is not None and self.channel.transport is not None:
                self.channel.transport.loseConnection()
            return
        super().handleContentChunk(data)


class QuietSite(server.Site):
    """A Site without an access log."""

    requestFactory = LimitedRequest

    def log(self, request: Any) -> None:
        pass


def site(
    dispatcher: Dispatcher,
    metrics: MetricsPage,
    tokens: tuple[str, ...],
    loopback_only: bool,
    reactor: Any,
) -> server.Site:
    """
    The HTTP side. ``loopback_only``: the endpoint listens on loopback only, so a server without
    tokens answers only requests addressed to a loopback name.
    """
    sessions = Sessions(tokens)
    pages = Resource()
    pages.putChild(b"", static.Data((PACKAGE / "index.html").read_bytes(), TYPES[".html"]))
    pages.putChild(b"static", static_tree())
    pages.putChild(b"api", ApiResource(dispatcher, sessions.credential))
    pages.putChild(b"metrics", metrics)
    form = Template((PACKAGE / "login.html").read_text(encoding="utf-8"))
    pages.putChild(b"login", Login(sessions, form, client_of))
    pages.putChild(b"logout", Logout(sessions))
    root = Gate(pages, sessions, dispatcher, client_of, loopback_only)
    return QuietSite(root, reactor=reactor)
