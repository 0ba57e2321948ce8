"""
Tests for the bounds ``measuring.server.protocol`` puts on connections: the idle timeout of a
connection (``--idle-timeout``), which only requests the server acts on put off, the requests
without a valid token it takes, and the number of connections open at once (``--max-connections``).

Connections run over ``StringTransport`` with the real ``Dispatcher`` (the fakes of
``test_dispatch``) and a ``task.Clock``, so time passes only when the test says.
"""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from measuring.server.access import Tokens
from measuring.server.dispatch import Dispatcher
from measuring.server.protocol import RequestFactory, RequestProtocol
from measuring.test.support import write_formulas, write_parts
from measuring.test.unit.test_dispatch import Harness
from measuring.test.unit.test_dispatch_tokens import TOKEN, WRONG
from measuring.test.unit.test_protocol import LIMIT, STATUS, STATUS_ANSWER, request

IDLE = 10.0


def answers(transport: StringTransport) -> list[dict[str, Any]]:
    """Every line written to ``transport``, as JSON."""
    return [json.loads(line) for line in transport.value().splitlines()]


class TimedConnectionTestCase(SynchronousTestCase):
    """A connection closed after ``IDLE`` seconds without a request, and how to tell it was."""

    def setUp(self) -> None:
        self.harness = Harness(self)
        self.setUpConnection()

    def setUpConnection(self, dispatcher: Dispatcher | None = None) -> None:
        """A connection to ``dispatcher`` (``self.harness``'s), timed by a clock of its own."""
        self.clock = Clock()
        self.protocol = RequestProtocol(
            dispatcher or self.harness.dispatcher, LIMIT, clock=self.clock, idle_timeout=IDLE
        )
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)

    def assertOpen(self) -> None:
        self.assertFalse(self.transport.disconnecting, answers(self.transport))

    def assertTimedOut(self) -> None:
        """The last line is the Timeout refusal, the one such line, and the connection closes."""
        written = answers(self.transport)
        codes = [answer.get("Error", {}).get("Code") for answer in written]
        self.assertEqual(codes.count("Timeout"), 1)
        self.assertEqual(
            written[-1],
            {
                "Header": "Error",
                "Status": "Error",
                "Error": {
                    "Code": "Timeout",
                    "Message": (
                        "no request came for 10 s (--idle-timeout); the connection is closed"
                    ),
                },
            },
        )
        self.assertTrue(self.transport.disconnecting)


class IdleTimeoutTests(TimedConnectionTestCase):
    """A connection without a complete request for ``IDLE`` seconds is told so and closed."""

    def test_idleConnectionClosed(self) -> None:
        """With no request at all, the connection is closed exactly IDLE seconds after it opened."""
        self.clock.advance(IDLE - 0.001)
        self.assertEqual(self.transport.value(), b"")
        self.assertOpen()
        self.clock.advance(0.001)
        self.assertTimedOut()
        self.assertEqual(self.harness.stats.errors["Timeout"], 1)
        self.clock.advance(10 * IDLE)
        self.assertEqual(len(answers(self.transport)), 1)

    def test_requestRearms(self) -> None:
        """Each complete request starts the IDLE seconds afresh."""
        for _ in range(3):
            self.clock.advance(IDLE - 1)
            self.protocol.dataReceived(STATUS + b"\n")
        self.assertEqual(answers(self.transport), [STATUS_ANSWER] * 3)
        self.clock.advance(IDLE - 0.001)
        self.assertOpen()
        self.clock.advance(0.001)
        self.assertTimedOut()

    def test_refusedRequestsDoNotRearm(self) -> None:
        """Requests answered BadRequest (unreadable, or an unknown Request) do not count."""
        self.clock.advance(IDLE / 3)
        self.protocol.dataReceived(b"hello\n")
        self.clock.advance(IDLE / 3)
        self.protocol.dataReceived(request(1, "Uptime"))
        self.clock.advance(IDLE / 3 - 0.001)
        self.assertOpen()
        self.clock.advance(0.001)
        self.assertTimedOut()
        codes = [answer["Error"]["Code"] for answer in answers(self.transport)]
        self.assertEqual(codes, ["BadRequest", "BadRequest", "Timeout"])

    def test_servedErrorRearms(self) -> None:
        """A request the server acts on counts though its answer is an error (NotFound)."""
        self.clock.advance(IDLE - 1)
        self.protocol.dataReceived(b'{"Header":"Job","Request":"Status","Job":"nope"}\n')
        self.assertEqual(answers(self.transport)[0]["Error"]["Code"], "NotFound")
        self.clock.advance(IDLE - 0.001)
        self.assertOpen()
        self.clock.advance(0.001)
        self.assertTimedOut()

    def test_tricklingBytesDoNotRearm(self) -> None:
        """A request arriving a byte at a time (slowloris) is closed IDLE seconds in."""
        data = STATUS + b"\n"
        for byte in range(int(IDLE) - 1):
            self.protocol.dataReceived(data[byte : byte + 1])
            self.clock.advance(1)
        self.assertOpen()
        self.clock.advance(1)
        self.assertTimedOut()

    def test_tricklingLinesDoNotRearm(self) -> None:
        """Lines of a request that never closes, and blank lines, do not count either."""
        for line in [b"{\n", b'"Header": "Info",\n', b"\n", b"   \n", b'"Pad": [\n']:
            self.protocol.dataReceived(line)
            self.clock.advance(IDLE / 5 - 0.001)
        self.assertOpen()
        self.clock.advance(0.005)
        self.assertTimedOut()

    def test_waitingForAnswerNotClosed(self) -> None:
        """While a request waits for its answer (a long job) the connection is never closed."""
        self.harness.info.hold = True
        self.protocol.dataReceived(request(1))
        self.clock.pump([IDLE] * 30)
        self.assertEqual(self.transport.value(), b"")
        self.assertOpen()
        self.harness.info.held[0].callback({"State": "running"})
        self.assertEqual(answers(self.transport)[0]["Id"], 1)
        self.assertOpen()

    def test_closedIdleAfterAnswer(self) -> None:
        """Once the awaited answer is sent, the client has IDLE seconds for its next request."""
        self.harness.info.hold = True
        self.protocol.dataReceived(request(1))
        self.clock.pump([IDLE / 20] * 50)  # as a reactor's time passes: in small steps
        self.harness.info.held[0].callback({"State": "running"})
        self.clock.advance(IDLE - 0.001)
        self.assertOpen()
        self.clock.advance(0.001)
        self.assertTimedOut()

    def test_asyncProgressJobKeepsConnection(self) -> None:
        """A connection that asked for an Async job's Progress and answer stays open for them."""
        root = os.path.realpath(self.mktemp())
        write_parts(root)
        write_formulas(root)
        self.harness = Harness(self, (root,))
        self.setUpConnection()
        fields = {"Directory": ".", "Base": "data.parquet", "File": "work.py"}
        self.protocol.dataReceived(
            json.dumps(
                {"Header": "Dask", "Request": {**fields, "Async": True, "Progress": True}}
            ).encode()
            + b"\n"
        )
        [job] = self.harness.pool.runs
        self.clock.pump([IDLE / 2] * 6)
        job.progress(1, 2)
        self.clock.pump([IDLE / 2] * 6)
        self.assertOpen()
        job.succeed()
        accepted, progress, answer = answers(self.transport)
        self.assertEqual(
            (accepted["Status"], progress["Header"], answer["Status"]),
            ("Accepted", "Progress", "OK"),
        )

    def test_lostConnectionLeavesNoTimer(self) -> None:
        """A connection that is gone leaves no timer behind."""
        self.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.clock.getDelayedCalls(), [])


class UnauthorizedTests(TimedConnectionTestCase):
    """A connection to a server with a token file, getting requests without a valid token."""

    def setUp(self) -> None:
        self.harness = Harness(self)
        harness = self.harness
        tokens = Tokens((TOKEN,))
        self.setUpConnection(
            Dispatcher(
                harness.info, harness.jobs, harness.queries, harness.stats, ("/",), tokens=tokens
            )
        )

    def send(self, token: str) -> None:
        self.protocol.dataReceived(
            json.dumps({"Header": "Info", "Request": "Status", "Token": token}).encode() + b"\n"
        )

    def codes(self) -> list[str | None]:
        return [answer.get("Error", {}).get("Code") for answer in answers(self.transport)]

    def test_unauthorizedDoNotRearm(self) -> None:
        """Requests without a valid token every IDLE/2 s do not keep the connection open."""
        for _ in range(2):
            self.clock.advance(IDLE / 2 - 0.001)
            self.send(WRONG)
        self.assertOpen()
        self.clock.advance(0.002)
        self.assertTimedOut()
        self.assertEqual(self.codes(), ["Unauthorized", "Unauthorized", "Timeout"])

    def test_authorizedRearm(self) -> None:
        """With the right token, the same requests keep the connection open."""
        for _ in range(4):
            self.clock.advance(IDLE / 2)
            self.send(TOKEN)
        self.assertOpen()
        self.assertEqual(self.codes(), [None] * 4)

    def test_closedAfterThree(self) -> None:
        """The third request without a valid token is answered, then the connection closes."""
        for token in (WRONG, TOKEN, "", TOKEN):
            self.send(token)
        self.assertOpen()
        self.send(WRONG)
        self.assertEqual(self.codes(), ["Unauthorized", None, "Unauthorized", None, "Unauthorized"])
        self.assertTrue(self.transport.disconnecting)


class MaxConnectionsTests(SynchronousTestCase):
    """``RequestFactory`` with ``max_connections=2``."""

    def setUp(self) -> None:
        self.harness = Harness(self)
        self.clock = Clock()
        self.factory = RequestFactory(
            self.harness.dispatcher, LIMIT, self.clock, IDLE, max_connections=2
        )

    def connect(self) -> tuple[Protocol, StringTransport]:
        """A new connection, as the reactor makes one: build its protocol, then connect it."""
        address = IPv4Address("TCP", "192.0.2.9", 40000)
        protocol = self.factory.buildProtocol(address)
        transport = StringTransport(peerAddress=address)
        protocol.makeConnection(transport)
        return protocol, transport

    def assertRefused(self, transport: StringTransport) -> None:
        """One Busy line naming the limit was written, and the connection closes."""
        [refusal] = answers(transport)
        self.assertEqual((refusal["Header"], refusal["Status"]), ("Error", "Error"))
        self.assertEqual(refusal["Error"]["Code"], "Busy")
        self.assertIn("2 connections open", refusal["Error"]["Message"])
        self.assertIn("--max-connections", refusal["Error"]["Message"])
        self.assertTrue(transport.disconnecting)

    def assertServed(self, protocol: Protocol, transport: StringTransport) -> None:
        """The connection is answered."""
        transport.clear()
        protocol.dataReceived(STATUS + b"\n")
        self.assertEqual(answers(transport), [STATUS_ANSWER])
        self.assertFalse(transport.disconnecting)

    def test_thirdConnectionRefused(self) -> None:
        """Two connections are served; the third gets one Busy line and is closed."""
        first, second = self.connect(), self.connect()
        _, third = self.connect()
        self.assertRefused(third)
        self.assertServed(*first)
        self.assertServed(*second)
        self.assertEqual(len(self.factory.connections), 2)
        self.assertEqual(self.harness.stats.errors["Busy"], 1)

    def test_refusedConnectionTakesNoSlot(self) -> None:
        """A refused connection, open or closed, leaves the slots as they were."""
        self.connect()
        self.connect()
        refused, transport = self.connect()
        refused.connectionLost(Failure(ConnectionDone()))
        self.assertRefused(self.connect()[1])
        self.assertRefused(transport)

    def test_lostConnectionFreesSlot(self) -> None:
        """When a connection is lost, the next one is served."""
        first, _ = self.connect()
        self.connect()
        first.connectionLost(Failure(ConnectionDone()))
        self.assertServed(*self.connect())
        self.assertRefused(self.connect()[1])

    def test_idleTimeoutPassedOn(self) -> None:
        """The factory's connections close after its idle timeout, freeing their slots."""
        protocol, transport = self.connect()
        self.clock.advance(IDLE)
        self.assertEqual(answers(transport)[0]["Error"]["Code"], "Timeout")
        self.assertTrue(transport.disconnecting)
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.factory.connections, set())
