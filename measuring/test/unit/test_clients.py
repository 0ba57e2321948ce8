"""
Tests for who may connect and for how long without a request: ``measuring.server.clients`` (the
bounds in all and per client address, and whose place a new connection takes) through the real
``RequestFactory``, the first-request timeout of ``RequestProtocol``, and the ``throttle`` that
holds what clients can make the server log to a rate.

Connections run over ``StringTransport`` with the real ``Dispatcher`` (the fakes of
``test_dispatch``) and a ``task.Clock``.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogEvent, capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from measuring.server.access import Tokens
from measuring.server.dispatch import Dispatcher
from measuring.server.factory import RequestFactory
from measuring.server.throttle import BURST, PERIOD, Throttle
from measuring.test.unit.test_dispatch import Harness
from measuring.test.unit.test_dispatch_tokens import TOKEN, WRONG
from measuring.test.unit.test_protocol import LIMIT, STATUS, STATUS_ANSWER

FIRST = 5.0
IDLE = 300.0
FLOODER = "192.0.2.66"


def answers(transport: StringTransport) -> list[dict[str, Any]]:
    return [json.loads(line) for line in transport.value().splitlines()]


def texts(events: list[LogEvent]) -> list[str]:
    return [formatEvent(event) for event in events]


class FactoryTestCase(SynchronousTestCase):
    """Connections made through a RequestFactory, as the reactor makes them."""

    def setUp(self) -> None:
        self.harness = Harness(self)
        self.clock = Clock()

    def factory(self, dispatcher: Dispatcher | None = None, **bounds: Any) -> RequestFactory:
        self.made = RequestFactory(
            dispatcher or self.harness.dispatcher,
            LIMIT,
            self.clock,
            IDLE,
            first_request_timeout=FIRST,
            **bounds,
        )
        return self.made

    def connect(self, address: object) -> tuple[Protocol, StringTransport]:
        protocol = self.made.buildProtocol(address)
        transport = StringTransport(peerAddress=address)
        protocol.makeConnection(transport)
        return protocol, transport

    def tcp(self, host: str, port: int = 40000) -> tuple[Protocol, StringTransport]:
        return self.connect(IPv4Address("TCP", host, port))

    def assertServed(self, protocol: Protocol, transport: StringTransport) -> None:
        transport.clear()
        protocol.dataReceived(STATUS + b"\n")
        self.assertEqual(answers(transport), [STATUS_ANSWER])
        self.assertFalse(transport.disconnecting)

    def assertClosedWith(self, transport: StringTransport, code: str, *words: str) -> None:
        """The last line is an error ``code`` whose Message has ``words``; then the close."""
        last = answers(transport)[-1]
        self.assertEqual(last["Error"]["Code"], code, last)
        for word in words:
            self.assertIn(word, last["Error"]["Message"])
        self.assertTrue(transport.disconnecting)


class MakingRoomTests(FactoryTestCase):
    """When the server is full, a new connection takes the place of one that sent nothing."""

    def test_unusedConnectionMakesRoom(self) -> None:
        """The oldest connection that sent no request is closed, saying why; the new one works."""
        self.factory(max_connections=2)
        _, idle = self.tcp("192.0.2.1")
        used = self.tcp("192.0.2.2")
        self.assertServed(*used)
        newcomer = self.tcp("192.0.2.3")
        self.assertClosedWith(idle, "Busy", "--max-connections", "had sent no request")
        self.assertServed(*newcomer)
        self.assertServed(*used)

    def test_busiestAddressGivesWay(self) -> None:
        """Of the unused connections, one of the address holding the most goes first."""
        self.factory(max_connections=3)
        _, lone = self.tcp("192.0.2.1")
        _, flood_one = self.tcp(FLOODER, 1)
        _, flood_two = self.tcp(FLOODER, 2)
        self.tcp("192.0.2.4")
        self.assertEqual(answers(lone), [])
        self.assertClosedWith(flood_one, "Busy")
        self.assertFalse(flood_two.disconnecting)

    def test_endedConnectionLeavesAtOnce(self) -> None:
        """A client's end frees its place at once, before its close is through."""
        self.factory(max_connections=1)
        protocol, transport = self.tcp("192.0.2.1")
        self.assertServed(protocol, transport)
        protocol.readConnectionLost()  # type: ignore[attr-defined]
        self.assertEqual(len(self.made.connections), 0)
        self.assertServed(*self.tcp("192.0.2.2"))

    def test_waitingConnectionKeepsItsPlace(self) -> None:
        """A connection waiting for its first answer is in use: the newcomer is refused."""
        self.harness.info.hold = True
        self.factory(max_connections=1)
        protocol, waiting = self.tcp("192.0.2.1")
        protocol.dataReceived(STATUS + b"\n")
        _, refused = self.tcp("192.0.2.2")
        self.assertClosedWith(refused, "Busy", "1 connections open", "each busy with a request")
        self.assertFalse(waiting.disconnecting)

    def test_unauthorizedIsNotUse(self) -> None:
        """Requests refused Unauthorized do not make a connection in use."""
        dispatcher = Dispatcher(
            self.harness.info,
            self.harness.jobs,
            self.harness.queries,
            self.harness.stats,
            ("/",),
            tokens=Tokens((TOKEN,)),
        )
        self.factory(dispatcher, max_connections=1)
        protocol, refused = self.tcp("192.0.2.1")
        protocol.dataReceived(json.dumps({"Header": "Info", "Token": WRONG}).encode() + b"\n")
        self.tcp("192.0.2.2")
        self.assertClosedWith(refused, "Busy", "had sent no request")


class PerClientTests(FactoryTestCase):
    """One client address holds at most max_client_connections."""

    def test_boundPerAddress(self) -> None:
        """A third connection from one address is refused, naming it; other addresses come in."""
        self.factory(max_client_connections=2)
        self.tcp(FLOODER, 1)
        self.tcp(FLOODER, 2)
        _, third = self.tcp(FLOODER, 3)
        self.assertClosedWith(third, "Busy", FLOODER, "--max-client-connections")
        self.assertServed(*self.tcp("192.0.2.7"))
        self.assertEqual(self.made.connections.from_client(FLOODER), 2)

    def test_closedConnectionFreesItsPlace(self) -> None:
        """Once one of its connections closes, the address may open another."""
        self.factory(max_client_connections=1)
        protocol, _ = self.tcp(FLOODER, 1)
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertServed(*self.tcp(FLOODER, 2))

    def test_loopbackAndUnixNotBounded(self) -> None:
        """Loopback addresses (IPv4, IPv6) and Unix sockets are bounded by max_connections only."""
        self.factory(max_client_connections=1)
        for make in (
            lambda n: self.tcp("127.0.0.1", n),
            lambda n: self.connect(IPv6Address("TCP", "::1", n)),
            lambda n: self.connect(UNIXAddress(None)),
        ):
            for n in range(3):
                self.assertServed(*make(n))

    def test_tokenHoldersNoLongerCount(self) -> None:
        """A connection that has shown a valid token leaves its place to the address's next."""
        dispatcher = Dispatcher(
            self.harness.info,
            self.harness.jobs,
            self.harness.queries,
            self.harness.stats,
            ("/",),
            tokens=Tokens((TOKEN,)),
        )
        self.factory(dispatcher, max_client_connections=1, trust_tokens=True)
        protocol, transport = self.tcp(FLOODER, 1)
        protocol.dataReceived(json.dumps({**json.loads(STATUS), "Token": TOKEN}).encode() + b"\n")
        self.assertEqual(answers(transport)[0]["Status"], "OK")
        _, second = self.tcp(FLOODER, 2)
        self.assertFalse(second.disconnecting, answers(second))
        _, third = self.tcp(FLOODER, 3)
        self.assertClosedWith(third, "Busy", "--max-client-connections")

    def test_refusalsLoggedAtARate(self) -> None:
        """However many connections are refused, the log gets BURST lines, then a count."""
        self.factory(max_client_connections=1, throttle=Throttle(self.clock))
        self.assertServed(*self.tcp(FLOODER, 0))
        with capturedLogs() as events:
            for n in range(1, 200):
                self.tcp(FLOODER, n)
            self.clock.advance(PERIOD)
        lines = texts(list(events))
        self.assertEqual(len(lines), BURST + 1, lines)
        self.assertIn(f"{199 - BURST} more connections refused", lines[-1])
        self.assertEqual(self.harness.stats.errors["Busy"], 199)


class FirstRequestTimeoutTests(FactoryTestCase):
    """A connection that sends no request soon after it opens is closed."""

    def setUp(self) -> None:
        super().setUp()
        self.factory()

    def test_silentConnectionClosed(self) -> None:
        """Nothing within the first-request timeout: Timeout naming the setting, then the close."""
        _, transport = self.tcp("192.0.2.1")
        self.clock.advance(FIRST - 0.01)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.01)
        self.assertClosedWith(
            transport, "Timeout", f"within {FIRST:g} s", "--first-request-timeout"
        )

    def test_requestKeepsConnection(self) -> None:
        """A connection that has had a request answered is bound by the idle timeout only."""
        protocol, transport = self.tcp("192.0.2.1")
        self.assertServed(protocol, transport)
        self.clock.advance(FIRST * 10)
        self.assertFalse(transport.disconnecting)

    def test_firstAnswerAwaitedKeepsConnection(self) -> None:
        """A first request still being answered (a job) keeps the connection past the timeout."""
        self.harness.info.hold = True
        protocol, transport = self.tcp("192.0.2.1")
        protocol.dataReceived(STATUS + b"\n")
        self.clock.advance(FIRST * 2)
        self.assertFalse(transport.disconnecting)
        self.harness.info.held[0].callback({"Asked": "Status"})
        self.assertEqual(answers(transport), [STATUS_ANSWER])

    def test_unreadableRequestsDoNotCount(self) -> None:
        """Lines that are no request do not keep a new connection open."""
        protocol, transport = self.tcp("192.0.2.1")
        for _ in range(3):
            protocol.dataReceived(b"not json\n")
            self.clock.advance(FIRST / 4)
        self.clock.advance(FIRST / 4)
        self.assertClosedWith(transport, "Timeout", "--first-request-timeout")

    def test_noTimerAfterClose(self) -> None:
        """A connection lost before the timeout leaves no timer behind."""
        protocol, _ = self.tcp("192.0.2.1")
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.clock.getDelayedCalls(), [])


class ThrottleTests(SynchronousTestCase):
    """Warnings of a kind: BURST as they come in each period, then one line with the count."""

    def test_burstThenCount(self) -> None:
        """Of 100 warnings in a period, BURST are logged, then one line counts the rest."""
        clock = Clock()
        throttle = Throttle(clock)
        with capturedLogs() as events:
            for n in range(100):
                throttle.warn("things", "thing {n}", n=n)
            self.assertEqual(len(events), BURST)
            clock.advance(PERIOD)
        lines = texts(list(events))
        self.assertEqual(lines[:BURST], [f"thing {n}" for n in range(BURST)])
        self.assertEqual(lines[BURST:], [f"{100 - BURST} more things in the last 60 s "
                                         "(not logged one by one)"])  # fmt: skip

    def test_newPeriodLogsAgain(self) -> None:
        """After a period, the next warnings are logged one by one again; nothing to count."""
        clock = Clock()
        throttle = Throttle(clock)
        with capturedLogs() as events:
            throttle.warn("things", "first")
            clock.advance(PERIOD)
            throttle.warn("things", "second")
            clock.advance(PERIOD)
        self.assertEqual(texts(list(events)), ["first", "second"])
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_kindsApart(self) -> None:
        """Each kind has its own burst."""
        clock = Clock()
        throttle = Throttle(clock, burst=1)
        with capturedLogs() as events:
            throttle.warn("a", "a")
            throttle.warn("b", "b")
            throttle.warn("a", "a again")
        self.assertEqual(texts(list(events)), ["a", "b"])


class UnauthorizedWarningTests(SynchronousTestCase):
    """Requests without a valid token: the log is held to a rate, the counters stay exact."""

    def test_floodOfUnauthorized(self) -> None:
        """1000 refused requests: BURST warnings and one count in the log, 1000 in the stats."""
        harness = Harness(self)
        clock = Clock()
        dispatcher = Dispatcher(
            harness.info, harness.jobs, harness.queries, harness.stats, ("/",),
            tokens=Tokens((TOKEN,)), throttle=Throttle(clock),
        )  # fmt: skip
        with capturedLogs() as events:
            for n in range(1000):
                dispatcher.handle({"Header": "Info", "Request": "Status"}, print, f"x:{n}")
            clock.advance(PERIOD)
        lines = texts(list(events))
        self.assertEqual(len(lines), BURST + 1, lines)
        self.assertIn(f"{1000 - BURST} more requests without a valid token", lines[-1])
        self.assertEqual(harness.stats.errors["Unauthorized"], 1000)
        self.assertEqual(harness.stats.requests["Info"], 0)
