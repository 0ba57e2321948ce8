"""
Tests for the end of a connection in ``measuring.server.protocol``: a client that half-closes (it
sends its requests, then the end of its side, as ``nc -N`` does) gets every answer, then the
connection closes.

Over ``StringTransport`` with the real ``Dispatcher`` (the fakes of ``test_dispatch``); the end
of the client's side is ``readConnectionLost``, as Twisted's TCP and Unix transports call it.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from measuring.server.protocol import MAX_PENDING, RequestProtocol
from measuring.test.unit.test_dispatch import Harness
from measuring.test.unit.test_protocol import LIMIT, STATUS, STATUS_ANSWER, request


class HalfCloseTests(SynchronousTestCase):
    """After the client's end, what it sent is answered, then the connection closes."""

    def setUp(self) -> None:
        self.harness = Harness(self)
        self.protocol = RequestProtocol(self.harness.dispatcher, LIMIT)
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)

    def answers(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.transport.value().splitlines()]

    def test_providesTheInterface(self) -> None:
        """Twisted tells the protocol of a half-close only when it provides the interface."""
        self.assertTrue(IHalfCloseableProtocol.providedBy(self.protocol))

    def test_answeredThenClosed(self) -> None:
        """Requests sent before the end are answered; then the connection closes."""
        self.protocol.dataReceived(STATUS + b"\n" + request(7))
        self.protocol.readConnectionLost()
        self.assertEqual(self.answers(), [STATUS_ANSWER, {**STATUS_ANSWER, "Id": 7}])
        self.assertTrue(self.transport.disconnecting)

    def test_lastRequestWithoutNewline(self) -> None:
        """The last request needs no newline: the end of the input ends it."""
        self.protocol.dataReceived(STATUS)
        self.assertEqual(self.answers(), [])
        self.protocol.readConnectionLost()
        self.assertEqual(self.answers(), [STATUS_ANSWER])
        self.assertTrue(self.transport.disconnecting)

    def test_waitsForALateAnswer(self) -> None:
        """An answer that takes a while (a job's) is sent before the connection closes."""
        self.harness.info.hold = True
        self.protocol.dataReceived(STATUS + b"\n")
        self.protocol.readConnectionLost()
        self.assertFalse(self.transport.disconnecting, "closed before the answer")
        self.harness.info.held[0].callback({"Asked": "Status"})
        self.assertEqual(self.answers(), [STATUS_ANSWER])
        self.assertTrue(self.transport.disconnecting)

    def test_badRequestAnswered(self) -> None:
        """A request that is not JSON gets its BadRequest before the close."""
        self.protocol.dataReceived(b"not json\n")
        self.protocol.readConnectionLost()
        [answer] = self.answers()
        self.assertEqual(answer["Error"]["Code"], "BadRequest")
        self.assertTrue(self.transport.disconnecting)

    def test_unfinishedRequestRefused(self) -> None:
        """A request cut off by the end is refused, saying so, and the connection closes."""
        self.protocol.dataReceived(b'{"Header": "Info",\n"Request":')
        self.protocol.readConnectionLost()
        [answer] = self.answers()
        self.assertEqual(answer["Error"]["Code"], "BadRequest")
        self.assertIn("ended in the middle of a request", answer["Error"]["Message"])
        self.assertTrue(self.transport.disconnecting)

    def test_manyRequestsAllAnswered(self) -> None:
        """More requests than are answered at once: the paced ones are answered too."""
        self.harness.info.hold = True
        count = MAX_PENDING + 10
        self.protocol.dataReceived(b"".join(request(n) for n in range(count)))
        self.protocol.readConnectionLost()
        while self.harness.info.held:
            self.harness.info.held.pop(0).callback({"Asked": "Status"})
        self.assertEqual([answer["Id"] for answer in self.answers()], list(range(count)))
        self.assertTrue(self.transport.disconnecting)

    def test_endTwice(self) -> None:
        """A second end (a transport that reads again) changes nothing."""
        self.protocol.dataReceived(STATUS)
        self.protocol.readConnectionLost()
        self.protocol.readConnectionLost()
        self.assertEqual(self.answers(), [STATUS_ANSWER])
