"""
The TCP side's services: listening on the endpoints at start, closing connections at stop.

``ListeningService`` listens on every ``--port`` endpoint (failing the start with one line when it
cannot) and logs each real address; ``ClosingService`` closes the clients' connections once their
last answers are sent, when the server stops.
"""

from __future__ import annotations

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocolFactory,
    IReactorTime,
    IStreamServerEndpoint,
)
from twisted.logger import Logger
from twisted.python.failure import Failure

from measuring.server.protocol import RequestFactory


class ClosingService(Service):
    """On stop, closes the clients' connections once their last answers are sent."""

    def __init__(self, factory: RequestFactory, clock: IReactorTime) -> None:
        self._factory = factory
        self._clock = clock

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        return self._factory.close_all(self._clock)


def describe(port: IListeningPort) -> str:
    """Where a listening port listens, as a user would type it."""
    host = port.getHost()
    if hasattr(host, "port"):
        return f"{getattr(host, 'host', '')}:{host.port}"
    return str(getattr(host, "name", host))


def url(port: IListeningPort, description: str) -> str | None:
    """The address of an HTTP port, ``http://127.0.0.1:8766/`` (https for ssl:); None on unix:."""
    host = port.getHost()
    if not hasattr(host, "port"):
        return None
    name = getattr(host, "host", "")
    name = f"[{name}]" if ":" in name else name
    scheme = "https" if description.split(":", 1)[0].lower() == "ssl" else "http"
    return f"{scheme}://{name}:{host.port}/"


class ListeningService(Service):
    """
    Listens on every endpoint when the server starts and logs each real address.

    A failure to listen (port in use, permission denied) stops the start with one line and a
    non-zero exit, before any worker process is started.
    """

    _log = Logger()

    def __init__(
        self,
        endpoints: list[tuple[str, IStreamServerEndpoint]],
        factory: IProtocolFactory,
        what: str = "measuring listening on",
    ) -> None:
        self._endpoints = endpoints
        self._factory = factory
        self._what = what
        self.ports: list[IListeningPort] = []
        self._listening = False

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._listening = True
        for description, endpoint in self._endpoints:
            outcome: list[IListeningPort | Failure] = []
            endpoint.listen(self._factory).addBoth(outcome.append)
            if not outcome:
                raise SystemExit(
                    f"measuring: {description} did not listen at once; "
                    f"endpoints that listen later are not supported"
                )
            if isinstance(outcome[0], Failure):
                raise SystemExit(
                    f"measuring: cannot listen on {description}: {outcome[0].getErrorMessage()}"
                )
            self.ports.append(outcome[0])
            self._log.info(
                "{what} {address} ({description})",
                what=self._what,
                address=describe(outcome[0]),
                description=description,
            )

    def startService(self) -> None:
        if not self._listening:
            self.privilegedStartService()
        super().startService()

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        self._listening = False
        ports, self.ports = self.ports, []
        stopping = [defer.maybeDeferred(port.stopListening) for port in ports]
        return defer.gatherResults(stopping).addCallback(lambda _: None)
