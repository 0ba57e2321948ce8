"""
The factory of client connections: a ``RequestProtocol`` for each, all sharing one dispatcher;
a new connection admitted or refused (one ``Busy`` line, then closed) as ``clients.Connections``
says; every connection closed, once its last answers are sent, when the server stops.
"""

from __future__ import annotations

import json

from twisted.internet import defer
from twisted.internet import protocol as twisted_protocol
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory

from measuring.server.clients import Connections, client_host
from measuring.server.protocol import REFUSED, Answer, Dispatcher, RequestProtocol
from measuring.server.throttle import Throttle


class _Refusal(twisted_protocol.Protocol):
    """A connection beyond ``--max-connections``: one error line, then closed."""

    def __init__(self, answer: Answer) -> None:
        self._answer = answer

    def connectionMade(self) -> None:
        line = json.dumps(self._answer, separators=(",", ":")).encode("utf-8") + b"\n"
        if self.transport is not None:
            self.transport.write(line)
            self.transport.loseConnection()


class RequestFactory(Factory):
    """
    Builds a RequestProtocol per connection, all sharing one dispatcher; knows them all, and
    admits or refuses each new one as ``clients.Connections`` says.
    """

    def __init__(
        self,
        dispatcher: Dispatcher,
        max_request_bytes: int,
        clock: IReactorTime | None = None,
        idle_timeout: float | None = None,
        max_connections: int | None = None,
        *,
        max_client_connections: int | None = None,
        first_request_timeout: float | None = None,
        trust_tokens: bool = False,
        throttle: Throttle | None = None,
    ) -> None:
        self._dispatcher = dispatcher
        self._max_request_bytes = max_request_bytes
        self._clock = clock
        self._idle_timeout = idle_timeout
        self._first_request_timeout = first_request_timeout
        self._trust_tokens = trust_tokens
        self._throttle = throttle or Throttle(None)
        self.connections: Connections[RequestProtocol] = Connections(
            max_connections, max_client_connections
        )

    def close_all(self, clock: IReactorTime, patience: float = 5.0) -> defer.Deferred[None]:
        """
        Close every connection once what was written to it is sent (within ``patience``
        seconds, then at once); fires when all are closed.
        """
        connections = list(self.connections)
        for connection in connections:
            if connection.transport is not None:
                connection.transport.loseConnection()

        def abort() -> None:
            for connection in connections:
                if connection.connected and connection.transport is not None:
                    connection.transport.abortConnection()  # type: ignore[attr-defined]

        timer = clock.callLater(patience, abort)
        closed = defer.DeferredList([c.closed for c in connections])
        return closed.addCallback(lambda _: timer.cancel() if timer.active() else None)

    def buildProtocol(self, addr: object) -> twisted_protocol.Protocol:
        host = client_host(addr)
        refusal = self.connections.refusal(host)
        if refusal is not None:
            self._throttle.warn(REFUSED, "refused a connection: {why}", why=refusal.message)
            return _Refusal(self._dispatcher.refuse(refusal))
        protocol = RequestProtocol(
            self._dispatcher,
            self._max_request_bytes,
            self.connections,
            self._clock,
            self._idle_timeout,
            first_request_timeout=self._first_request_timeout,
            trust_tokens=self._trust_tokens,
            throttle=self._throttle,
        )
        protocol.factory = self
        return protocol
