"""
One client connection: bytes in, request objects to the dispatcher, one JSON line per answer out.

``framing`` cuts the lines into requests; nothing here knows what a request means: objects go to
the dispatcher, which returns a Deferred answer, and whatever cannot be read goes to it as an
error to answer. An answer may be ``Streamed``: its line is followed by raw bytes (an Arrow
stream), sent as the client reads them; lines of other answers wait until they are all sent.
The connection is paced (no reading while answers pile up), closed when idle, and the factory
refuses connections beyond a limit. ``listening`` holds the services around it.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any, Protocol, cast

from twisted.internet import defer
from twisted.internet import protocol as twisted_protocol
from twisted.internet.interfaces import (
    IDelayedCall,
    IPushProducer,
    IReactorTime,
)
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure

from measuring.errors import BadRequest, Busy, Internal, MeasuringError, Timeout, TooLarge
from measuring.server.framing import Framer, parse, too_large

#: Requests a connection may have waiting for their answers before it is no longer read.
MAX_PENDING = 64
#: Requests without a valid token after which a connection is closed.
MAX_UNAUTHORIZED = 3
#: Error Codes of requests that do not count as activity for the idle timeout.
UNREAD = ("BadRequest", "TooLarge", "Unauthorized")

#: Raw bytes written to the transport at a time, while the client reads them.
CHUNK = 256 * 1024

Answer = dict[str, Any]
Notify = Callable[[Answer], None]


@dataclass(frozen=True)
class Streamed:
    """An answer whose line is followed by ``size`` raw bytes read from ``body`` (then closed)."""

    answer: Answer
    body: IO[bytes]
    size: int


class Dispatcher(Protocol):
    """What the framing hands requests to (``measuring.server.dispatch.Dispatcher``)."""

    def handle(
        self, request: dict[str, Any], notify: Notify, client: str = ...
    ) -> defer.Deferred[Any]:
        """Fires with the answer: an ``Answer``, or a ``Streamed`` one."""

    def refuse(self, error: MeasuringError) -> Answer: ...


_log = Logger()


def encode(answer: Answer, dispatcher: Dispatcher) -> bytes:
    """
    An answer as UTF-8 JSON (no newline); one that cannot be (NaN, a lone surrogate) becomes
    the dispatcher's Internal error answer, keeping its Header, Id and Job.
    """
    try:
        data = json.dumps(answer, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        return data.encode("utf-8")
    except ValueError:
        _log.failure("answer could not be encoded: {answer!r}", answer=answer)
        refusal = dispatcher.refuse(Internal("the answer could not be encoded as JSON"))
        kept = {key: answer[key] for key in ("Header", "Id", "Job") if key in answer}
        # ensure_ascii escapes whatever UTF-8 could not hold
        return json.dumps({**refusal, **kept}, allow_nan=False, separators=(",", ":")).encode()


class RequestProtocol(LineReceiver):
    """One client connection: lines in, one answer line out per request (with its ``Id``)."""

    delimiter = b"\n"
    _log = Logger()

    def __init__(
        self,
        dispatcher: Dispatcher,
        max_request_bytes: int,
        connections: set[RequestProtocol] | None = None,
        clock: IReactorTime | None = None,
        idle_timeout: float | None = None,
    ) -> None:
        self._dispatcher = dispatcher
        self._connections = set() if connections is None else connections
        self._framer = Framer(max_request_bytes)
        self._max_request_bytes = max_request_bytes
        self._pending = 0
        self._unauthorized = 0
        self._seen_request = False
        self._unsent = False
        self._reading = True
        self._clock = clock
        self._idle_timeout = idle_timeout
        self._idle: IDelayedCall | None = None
        self._client = "a client"
        # What waits to be written behind a Streamed answer's bytes: lines, and further bodies.
        self._outgoing: deque[bytes | Streamed] = deque()
        self._streaming: Streamed | None = None
        self._left = 0
        self._pumping = False
        self.closed: defer.Deferred[None] = defer.Deferred()
        # LineReceiver's limit is on a line without its "\n"; ours counts the "\n" too.
        self.MAX_LENGTH = max_request_bytes - 1

    def connectionMade(self) -> None:
        super().connectionMade()
        self._connections.add(self)
        if self.transport is not None:
            peer = self.transport.getPeer()
            self._client = f"{getattr(peer, 'host', peer)}:{getattr(peer, 'port', '')}"
            # The transport pauses us when answers pile up unsent (a client that does not read).
            self.transport.registerProducer(self, True)  # type: ignore[attr-defined]
        self._rearm()

    # IPushProducer, for the transport: answers wait to be sent, so read no more requests.
    def pauseProducing(self) -> None:
        self._unsent = True
        self._pace()

    def resumeProducing(self) -> None:
        self._unsent = False
        self._pump()

    def stopProducing(self) -> None:
        pass

    def _pace(self) -> None:
        """
        Read from the client only while its answers are sent (raw bytes included) and not too
        many are awaited.
        """
        sending = self._streaming is not None or bool(self._outgoing)
        reading = not self._unsent and not sending and self._pending < MAX_PENDING
        if reading == self._reading:
            return
        self._reading = reading
        self.paused = not reading  # LineReceiver takes no more lines from its buffer meanwhile
        if self.transport is not None and self.connected:
            producer = cast(IPushProducer, self.transport)
            if reading:
                producer.resumeProducing()
            else:
                producer.pauseProducing()
        if reading:
            self.dataReceived(b"")  # the lines that arrived in the meantime

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.connected = False
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        super().connectionLost(reason)
        self._drop_bodies()
        self._connections.discard(self)
        self.closed.callback(None)

    def _rearm(self) -> None:
        """(Re)start the idle timer: it runs from the last complete request."""
        if self._clock is None or self._idle_timeout is None:
            return
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        self._idle = self._clock.callLater(self._idle_timeout, self._idle_expired)

    def _idle_expired(self) -> None:
        if self._pending or self._streaming is not None:
            # A job this connection asked for still runs for it: keep waiting.
            self._rearm()
            return
        self._log.info("closing the idle connection of {client}", client=self._client)
        self._send(
            self._dispatcher.refuse(
                Timeout(
                    f"no request came for {self._idle_timeout:g} s (--idle-timeout); "
                    f"the connection is closed"
                )
            )
        )
        if self.transport is not None:
            self.transport.loseConnection()

    def lineReceived(self, line: bytes) -> None:
        try:
            text = self._framer.feed(line.decode("utf-8").removesuffix("\r"))
            if text is None:
                return
            request = parse(text)
        except UnicodeDecodeError:
            self._framer.reset()
            self._refuse(BadRequest("the request is not valid UTF-8"))
        except MeasuringError as e:
            self._refuse(e)
        else:
            self._handle(request)

    def lineLengthExceeded(self, line: bytes) -> None:
        self._refuse(too_large(self._max_request_bytes))

    def _refuse(self, error: MeasuringError) -> None:
        self._send(self._dispatcher.refuse(error))
        if isinstance(error, TooLarge) and self.transport is not None:
            self.transport.loseConnection()

    def _handle(self, request: dict[str, Any]) -> None:
        marked = {"Id": request["Id"]} if "Id" in request else {}

        def send(answer: Answer) -> None:
            if answer.get("Header") == "Progress" and self._unsent:
                return  # the client is not reading: no point queuing more progress for it
            self._send({**answer, **marked})

        def sent(answer: Answer | Streamed) -> str | None:
            if isinstance(answer, Streamed):
                send(answer.answer)
                self._stream(answer)
                return None
            send(answer)
            code: str | None = (answer.get("Error") or {}).get("Code")
            return code

        self._pending += 1
        self._pace()
        answered = self._dispatcher.handle(request, send, self._client).addCallback(sent)
        answered.addBoth(self._answered)

    def _answered(self, code: str | None) -> None:
        """
        A request has its answer. Only one the server could read and act on keeps the connection
        from being idle; after ``MAX_UNAUTHORIZED`` requests without a valid token it is closed.
        """
        self._pending -= 1
        self._pace()
        if code == "Unauthorized":
            self._unauthorized += 1
            if self._unauthorized >= MAX_UNAUTHORIZED and self.transport is not None:
                self._log.warn("closing {client}: too many requests without a valid token",
                               client=self._client)  # fmt: skip
                self.transport.loseConnection()
        elif code not in UNREAD:
            self._seen_request = True
        if self._pending == 0 and self.connected and self._seen_request:
            self._seen_request = False
            self._rearm()

    def _send(self, answer: Answer) -> None:
        self._write(encode(answer, self._dispatcher) + self.delimiter)

    def _write(self, data: bytes) -> None:
        """Write ``data`` now, or behind the raw bytes being sent."""
        if not (self.transport is not None and self.connected):
            return
        if self._streaming is not None or self._outgoing:
            self._outgoing.append(data)
        else:
            self.transport.write(data)

    def _stream(self, streamed: Streamed) -> None:
        """Send ``streamed``'s raw bytes after its line, as fast as the client reads them."""
        if not (self.transport is not None and self.connected):
            streamed.body.close()
            return
        self._outgoing.append(streamed)
        self._pump()

    def _pump(self) -> None:
        """Write what waits, in order, until the transport asks us to pause."""
        if self._pumping:
            return
        self._pumping = True
        try:
            self._write_waiting()
        finally:
            self._pumping = False
        self._pace()

    def _write_waiting(self) -> None:
        while not self._unsent and self.connected and self.transport is not None:
            if self._streaming is None:
                if not self._outgoing:
                    return
                item = self._outgoing.popleft()
                if isinstance(item, bytes):
                    self.transport.write(item)
                    continue
                self._streaming, self._left = item, item.size
            chunk = self._streaming.body.read(min(CHUNK, self._left))
            self._left -= len(chunk)
            if chunk:
                self.transport.write(chunk)
            if not chunk or not self._left:
                if self._left:  # the file is shorter than said: the stream cannot go on
                    self._log.error("a result stream ended {left} bytes early", left=self._left)
                    self.transport.loseConnection()
                self._streaming.body.close()
                self._streaming = None

    def _drop_bodies(self) -> None:
        for item in [self._streaming, *self._outgoing]:
            if isinstance(item, Streamed):
                item.body.close()
        self._streaming = None
        self._outgoing.clear()


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
    refuses connections beyond ``max_connections``.
    """

    _log = Logger()

    def __init__(
        self,
        dispatcher: Dispatcher,
        max_request_bytes: int,
        clock: IReactorTime | None = None,
        idle_timeout: float | None = None,
        max_connections: int | None = None,
    ) -> None:
        self._dispatcher = dispatcher
        self._max_request_bytes = max_request_bytes
        self._clock = clock
        self._idle_timeout = idle_timeout
        self._max_connections = max_connections
        self.connections: set[RequestProtocol] = set()

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
        if self._max_connections is not None and len(self.connections) >= self._max_connections:
            self._log.warn("refused a connection: {n} are open already", n=len(self.connections))
            busy = Busy(
                f"the server has {len(self.connections)} connections open, as many as it takes "
                f"(--max-connections); try again later"
            )
            return _Refusal(self._dispatcher.refuse(busy))
        protocol = RequestProtocol(
            self._dispatcher,
            self._max_request_bytes,
            self.connections,
            self._clock,
            self._idle_timeout,
        )
        protocol.factory = self
        return protocol
