"""
Framing: bytes on a TCP connection to JSON request objects and answers back to one line each.

A request is one JSON object, on one line or spread over several (the server reads on until the
object closes). Nothing here knows what a request means: objects go to the dispatcher, which
returns a Deferred answer; whatever cannot be read goes to the dispatcher as an error to answer.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from typing import Any, Protocol, cast

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet import protocol as twisted_protocol
from twisted.internet.interfaces import (
    IDelayedCall,
    IListeningPort,
    IPushProducer,
    IReactorTime,
    IStreamServerEndpoint,
)
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure

from measuring.errors import BadRequest, Busy, Internal, MeasuringError, Timeout, TooLarge

MAX_DEPTH = 32
#: Requests a connection may have waiting for their answers before it is no longer read.
MAX_PENDING = 64
PREFIX_CHECKS = 200
PREFIX_CHECK_BYTES = 64 * 1024
# What moves the framer: an escape (two characters, skipped whole), a quote, a bracket.
_TOKENS = re.compile(r'\\.|["{}\[\]]')

Answer = dict[str, Any]
Notify = Callable[[Answer], None]


class Dispatcher(Protocol):
    """What the framing hands requests to (``measuring.dispatch.Dispatcher``)."""

    def handle(
        self, request: dict[str, Any], notify: Notify, client: str = ...
    ) -> defer.Deferred[Answer]: ...

    def refuse(self, error: MeasuringError) -> Answer: ...


def json_type(value: object) -> str:
    """The JSON name of a value's type, for messages: ``an array``, ``a string``, ``null``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    names = {
        dict: "an object",
        list: "an array",
        str: "a string",
        int: "a number",
        float: "a number",
    }
    return names.get(type(value), type(value).__name__)


def _no_constants(name: str) -> Any:
    raise BadRequest(f"the request contains {name}, which is not valid JSON; send null instead")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise BadRequest(f"the request contains the number {text[:40]}, too large for a float")
    return value


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        duplicate = next(key for key, _ in pairs if key in seen or seen.add(key))  # type: ignore[func-returns-value]
        raise BadRequest(f"the request has the key {duplicate!r} more than once")
    return obj


def too_large(limit: int) -> TooLarge:
    return TooLarge(f"the request is longer than the limit of {limit} bytes")


def _invalid(error: json.JSONDecodeError) -> BadRequest:
    return BadRequest(
        f"the request is not valid JSON ({error.msg} at line {error.lineno} column {error.colno})"
    )


def parse(text: str) -> dict[str, Any]:
    """One request object from its text; raises BadRequest naming what is wrong."""
    try:
        value = json.loads(
            text,
            object_pairs_hook=_no_duplicates,
            parse_constant=_no_constants,
            parse_float=_finite,
        )
    except json.JSONDecodeError as e:
        raise _invalid(e) from None
    except ValueError as e:  # an integer of more digits than Python converts
        raise BadRequest(f"the request has a number that cannot be read: {e}") from None
    if not isinstance(value, dict):
        raise BadRequest(
            f"a request must be a JSON object such as "
            f'{{"Header":"Info","Request":"Status"}}, not {json_type(value)}'
        )
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(
            "the request has a \\u escape that is not a whole character (a lone surrogate)"
        ) from None
    return value


class Framer:
    """
    Collects lines until they hold one complete JSON value, tracking bracket depth outside strings.

    ``feed`` returns the text of a complete request, or None while one is still open; it raises
    TooLarge past ``max_bytes`` and BadRequest past ``MAX_DEPTH`` nested brackets.
    """

    def __init__(self, max_bytes: int) -> None:
        self._max_bytes = max_bytes
        self.reset()

    def reset(self) -> None:
        """Forget the request under way."""
        self._parts: list[str] = []
        self._size = 0
        self._depth = 0
        self._started = False

    @property
    def pending(self) -> bool:
        """True while part of a request has arrived."""
        return self._started

    def feed(self, line: str) -> str | None:
        self._size += len(line.encode("utf-8")) + 1
        if self._size > self._max_bytes:
            self.reset()
            raise too_large(self._max_bytes)
        self._parts.append(line)
        self._started = self._started or (line != "" and not line.isspace())
        in_string = False
        for token in _TOKENS.findall(line):
            if in_string:
                in_string = token != '"'
            elif token == '"':
                in_string = True
            elif token in "{[":
                self._depth += 1
                if self._depth > MAX_DEPTH:
                    self.reset()
                    raise BadRequest(f"the request nests deeper than {MAX_DEPTH} levels")
            elif token in "}]":
                self._depth -= 1
        if not self._started:
            self._parts = []
            self._size = 0
            return None
        if self._depth > 0 and not in_string:
            self._check_prefix()
            return None
        text = "\n".join(self._parts)
        self.reset()
        return text

    def _check_prefix(self) -> None:
        """
        Raise BadRequest now when an open request can no longer become valid JSON.

        The decoder stops at the first character that cannot continue valid JSON; when that is
        before the end of what has arrived, more lines cannot help. Checked for the first lines
        only, so that a request of many lines costs no more than reading it.
        """
        if len(self._parts) > PREFIX_CHECKS or self._size > PREFIX_CHECK_BYTES:
            return
        text = "\n".join(self._parts)
        try:
            json.loads(text)
        except json.JSONDecodeError as e:
            if e.pos < len(text.rstrip()):
                self.reset()
                raise _invalid(e) from None


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
        self._unsent = False
        self._reading = True
        self._clock = clock
        self._idle_timeout = idle_timeout
        self._idle: IDelayedCall | None = None
        self._client = "a client"
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
        self._pace()

    def stopProducing(self) -> None:
        pass

    def _pace(self) -> None:
        """Read from the client only while its answers are sent and not too many are awaited."""
        reading = not self._unsent and self._pending < MAX_PENDING
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
        if self._pending:
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
            self._rearm()
            request = parse(text)
        except UnicodeDecodeError:
            self._framer.reset()
            self._rearm()
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
            self._send({**answer, **marked})

        self._pending += 1
        self._pace()
        answered = self._dispatcher.handle(request, send, self._client).addCallback(send)
        answered.addBoth(self._answered)

    def _answered(self, _: object) -> None:
        self._pending -= 1
        self._pace()
        if self._pending == 0 and self.connected:
            self._rearm()

    def _send(self, answer: Answer) -> None:
        try:
            data = json.dumps(answer, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
            line = data.encode("utf-8")
        except ValueError:  # NaN, or a lone surrogate that UTF-8 cannot hold
            self._log.failure("answer could not be encoded: {answer!r}", answer=answer)
            refusal = self._dispatcher.refuse(Internal("the answer could not be encoded as JSON"))
            kept = {key: answer[key] for key in ("Header", "Id", "Job") if key in answer}
            # ensure_ascii escapes whatever UTF-8 could not hold
            line = json.dumps({**refusal, **kept}, allow_nan=False, separators=(",", ":")).encode()
        if self.transport is not None and self.connected:
            self.sendLine(line)


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


class ListeningService(Service):
    """
    Listens on every endpoint when the server starts and logs each real address.

    A failure to listen (port in use, permission denied) stops the start with one line and a
    non-zero exit, before any worker process is started.
    """

    _log = Logger()

    def __init__(
        self, endpoints: list[tuple[str, IStreamServerEndpoint]], factory: Factory
    ) -> None:
        self._endpoints = endpoints
        self._factory = factory
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
                "measuring listening on {address} ({description})",
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
