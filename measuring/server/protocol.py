"""
One client connection: bytes in, request objects to the dispatcher, one JSON line per answer out.

``framing`` cuts the lines into requests; nothing here knows what a request means: objects go to
the dispatcher, which returns a Deferred answer, and whatever cannot be read goes to it as an
error to answer. An answer may be ``Streamed``: its line is followed by raw bytes (an Arrow
stream), sent as the client reads them; lines of other answers wait until they are all sent.
The connection is paced (no reading while answers pile up), closed when it sends no request soon
after it opens and when it is idle. A client that half-closes (``nc -N``: it sends its requests,
then the end of its side) gets every answer, then the connection closes. Lines that clients can
cause go through a ``throttle``. ``factory`` builds the connections and admits them
(``clients``); ``listening`` holds the services around it.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any, Protocol, cast

from twisted.internet import defer
from twisted.internet.interfaces import (
    IDelayedCall,
    IHalfCloseableProtocol,
    IPushProducer,
    IReactorTime,
)
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from measuring.errors import BadRequest, Busy, Internal, MeasuringError, Timeout, TooLarge
from measuring.server.clients import Connections, client_host
from measuring.server.framing import Framer, parse, too_large
from measuring.server.throttle import Throttle

#: Requests a connection may have waiting for their answers before it is no longer read.
MAX_PENDING = 64
#: Requests without a valid token after which a connection is closed.
MAX_UNAUTHORIZED = 3
#: Error Codes of requests that do not count as activity for the idle timeout.
UNREAD = ("BadRequest", "TooLarge", "Unauthorized")
#: The kinds of log lines clients can cause, each held to a rate (``throttle``).
CLOSED_UNAUTHORIZED = "connections closed for requests without a valid token"
CLOSED_QUIET = "connections closed for sending no request"
REFUSED = "connections refused"

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


@implementer(IHalfCloseableProtocol)
class RequestProtocol(LineReceiver):
    """One client connection: lines in, one answer line out per request (with its ``Id``)."""

    delimiter = b"\n"
    _log = Logger()

    def __init__(
        self,
        dispatcher: Dispatcher,
        max_request_bytes: int,
        connections: Connections[RequestProtocol] | None = None,
        clock: IReactorTime | None = None,
        idle_timeout: float | None = None,
        *,
        first_request_timeout: float | None = None,
        trust_tokens: bool = False,
        throttle: Throttle | None = None,
    ) -> None:
        self._dispatcher = dispatcher
        self._connections = Connections() if connections is None else connections
        self._framer = Framer(max_request_bytes)
        self._max_request_bytes = max_request_bytes
        self._pending = 0
        self._unauthorized = 0
        self._seen_request = False
        self._unsent = False
        self._reading = True
        self._read_closed = False
        self._clock = clock
        self._idle_timeout = idle_timeout
        self._idle: IDelayedCall | None = None
        self._first_request_timeout = first_request_timeout
        self._first: IDelayedCall | None = None
        #: Whether the server has acted on a request of this connection (not refused it).
        self._acted = False
        # With tokens, a request that is not refused Unauthorized carried a valid one.
        self._trust_tokens = trust_tokens
        self._throttle = throttle or Throttle(None)
        self._client = "a client"
        #: The address the connection comes from, or None for a Unix socket (``clients``).
        self.client_host: str | None = None
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
        if self.transport is not None:
            peer = self.transport.getPeer()
            self.client_host = client_host(peer)
            self._client = f"{getattr(peer, 'host', peer)}:{getattr(peer, 'port', '')}"
            # The transport pauses us when answers pile up unsent (a client that does not read).
            self.transport.registerProducer(self, True)  # type: ignore[attr-defined]
        self._connections.add(self)
        self._rearm()
        if self._clock is not None and self._first_request_timeout is not None:
            self._first = self._clock.callLater(self._first_request_timeout, self._first_expired)

    @property
    def unused(self) -> bool:
        """True while no request of this connection was acted on, nor waits for its answer."""
        return not self._acted and self._pending == 0 and bool(self.connected)

    def make_room(self) -> None:
        """Close this unused connection: its place goes to a new one (``clients``)."""
        self._close(
            Busy(
                "the server has as many connections open as it takes (--max-connections); "
                "this one had sent no request, and its place went to a new connection"
            ),
            CLOSED_QUIET,
            "closing {client} to make room: it had sent no request",
        )

    def _close(self, error: MeasuringError, kind: str, line: str) -> None:
        """Send ``error``, log ``line`` (a line of ``kind``, held to a rate), close."""
        self._throttle.info(kind, line, client=self._client)
        self._send(self._dispatcher.refuse(error))
        if self.transport is not None:
            self.transport.loseConnection()

    def _first_expired(self) -> None:
        if self._acted or self._pending:
            return
        self._close(
            Timeout(
                f"no request came within {self._first_request_timeout:g} s of connecting "
                f"(--first-request-timeout); the connection is closed"
            ),
            CLOSED_QUIET,
            "closing {client}: no request within the first-request timeout",
        )

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
        if self.transport is not None and self.connected and not self._read_closed:
            producer = cast(IPushProducer, self.transport)
            if reading:
                producer.resumeProducing()
            else:
                producer.pauseProducing()
        if reading:
            self.dataReceived(b"")  # the lines that arrived in the meantime
            self._close_if_answered()

    # IHalfCloseableProtocol: the client has sent everything it will send.
    def readConnectionLost(self) -> None:
        """Answer every request already received (the last needs no newline), then close."""
        if self._read_closed:
            return
        self._read_closed = True
        if self._buffer and not self._buffer.endswith(self.delimiter):
            self.dataReceived(self.delimiter)
        self._close_if_answered()

    def writeConnectionLost(self) -> None:
        """The client reads no more: nothing more to say."""
        if self.transport is not None:
            self.transport.loseConnection()

    def _close_if_answered(self) -> None:
        """After the client's end: close once every request it sent has its answer, sent."""
        sending = self._streaming is not None or bool(self._outgoing)
        if not self._read_closed or self._pending or self._buffer or sending:
            return
        if self.transport is None:
            return
        if self._framer.pending:
            self._framer.reset()
            self._refuse(BadRequest("the connection ended in the middle of a request"))
        # Done with: its place is free now, not once the close is through.
        self._connections.discard(self)
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.connected = False
        for timer in (self._idle, self._first):
            if timer is not None and timer.active():
                timer.cancel()
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
        self._close(
            Timeout(
                f"no request came for {self._idle_timeout:g} s (--idle-timeout); "
                f"the connection is closed"
            ),
            CLOSED_QUIET,
            "closing the idle connection of {client}",
        )

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
                self._throttle.warn(
                    CLOSED_UNAUTHORIZED,
                    "closing {client}: too many requests without a valid token",
                    client=self._client,
                )
                self.transport.loseConnection()
        else:
            if self._trust_tokens:
                self._connections.trust(self)
            if code not in UNREAD:
                self._seen_request = self._acted = True
                if self._first is not None and self._first.active():
                    self._first.cancel()
        if self._pending == 0 and self.connected and self._seen_request:
            self._seen_request = False
            self._rearm()
        self._close_if_answered()

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
        self._close_if_answered()

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
