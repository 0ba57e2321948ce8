"""
Tests for the token check of ``measuring.server.dispatch``: with a token file, a request without one
of its tokens is answered ``Unauthorized``, the same way whatever it lacks, and nothing else is done
with it; the log names the client and never a token.

The dispatcher runs over the fakes of ``test_dispatch`` (real Scheduler and Stats); the last
tests go through ``RequestProtocol`` on a ``StringTransport``, as a client sees it.
"""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.logger import LogEvent, capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from measuring.server.access import Tokens
from measuring.server.dispatch import Dispatcher
from measuring.server.protocol import RequestProtocol
from measuring.test.support import write_formulas, write_parts
from measuring.test.unit.test_dispatch import Harness

TOKEN = "the-right-secret-0123456789"
ROTATED = "the-next-secret-abcdefghij"
WRONG = "a-wrong-secret-9876543210xyz"
CLIENT = "192.0.2.7:5555"
MESSAGE = 'this server needs a valid "Token" in every request'
#: A request of each Header (and one of an unknown Header and one without any), each valid.
REQUESTS: list[dict[str, Any]] = [
    {"Header": "Info", "Request": "Status"},
    {"Header": "Job", "Request": "List"},
    {"Header": "Dask", "Request": {"Directory": ".", "Base": "data.parquet", "File": "work.py"}},
    {"Header": "Nope", "Request": "Status"},
    {"Request": "Status"},
]
#: What a request may carry instead of a valid Token (absent: no Token key at all).
NOT_TOKENS: list[object] = [
    "absent",
    WRONG,
    "",
    None,
    TOKEN.upper(),
    TOKEN + " ",
    12345678901234567890,
    True,
    [TOKEN],
    {"Token": TOKEN},
]


def carrying(request: dict[str, Any], token: object) -> dict[str, Any]:
    """``request`` with ``Token`` set to ``token`` (or without it for ``"absent"``)."""
    return request if token == "absent" else {**request, "Token": token}


def texts(events: list[LogEvent]) -> list[str]:
    """Each log event as text, followed by everything it carries."""
    return [formatEvent(event) + " " + repr(event) for event in events]


class TokenTests(SynchronousTestCase):
    """A dispatcher of a server with two tokens (one being rotated in)."""

    def setUp(self) -> None:
        self.root = os.path.realpath(self.mktemp())
        write_parts(self.root)
        write_formulas(self.root)
        self.harness = Harness(self, (self.root,))
        self.dispatcher = Dispatcher(
            self.harness.info,
            self.harness.jobs,
            self.harness.queries,
            self.harness.stats,
            (self.root,),
            tokens=Tokens((TOKEN, ROTATED)),
        )

    def answer(self, request: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self.successResultOf(
            self.dispatcher.handle(request, lambda answer: None, CLIENT)
        )
        return result

    def assertNothingDone(self) -> None:
        """No Info was asked, no job started, no request counted."""
        self.assertEqual(self.harness.info.asked, [])
        self.assertEqual(self.harness.pool.runs, [])
        self.assertEqual(sum(self.harness.stats.requests.values()), 0)

    def test_refusedForEveryHeader(self) -> None:
        """Without a valid Token every request, of any Header, is Unauthorized, the same way."""
        for request in REQUESTS:
            header = request.get("Header", "Error")
            for token in NOT_TOKENS:
                self.assertEqual(
                    self.answer(carrying(request, token)),
                    {
                        "Header": header,
                        "Status": "Error",
                        "Error": {"Code": "Unauthorized", "Message": MESSAGE},
                    },
                    (request, token),
                )
        self.assertNothingDone()

    def test_countedAsErrors(self) -> None:
        """Each refused request is counted under Unauthorized in the error counters."""
        for token in NOT_TOKENS:
            self.answer(carrying(REQUESTS[0], token))
        self.assertEqual(
            self.harness.stats.snapshot()["Errors"],
            {"Total": len(NOT_TOKENS), "Unauthorized": len(NOT_TOKENS)},
        )

    def test_checkedBeforeAnythingElse(self) -> None:
        """A malformed request without a valid Token is Unauthorized, never BadRequest."""
        requests: list[dict[str, Any]] = [
            {"Header": "Info", "Request": "Nope", "Extra": 1},
            {"Header": "Dask", "Request": {"Directory": "/etc", "Base": "..", "File": "x"}},
            {"Header": "Job", "Request": "Status"},
            {},
        ]
        for request in requests:
            self.assertEqual(self.answer(request)["Error"]["Code"], "Unauthorized", request)
        self.assertNothingDone()

    def test_rightTokenAnswered(self) -> None:
        """With either token, requests of each Header are answered as without tokens."""
        for token in (TOKEN, ROTATED):
            self.assertEqual(
                self.answer({"Header": "Info", "Request": "Status", "Token": token}),
                {
                    "Header": "Info",
                    "Request": "Status",
                    "Status": "OK",
                    "Response": {"Asked": "Status"},
                },
            )
            listed = self.answer({"Header": "Job", "Request": "List", "Token": token})
            self.assertEqual((listed["Header"], listed["Status"]), ("Job", "OK"))
        started = self.dispatcher.handle(carrying(REQUESTS[2], TOKEN), lambda answer: None)
        [job] = self.harness.pool.runs
        job.succeed()
        self.assertEqual(self.successResultOf(started)["Status"], "OK")

    def test_rightTokenStillValidated(self) -> None:
        """With the right token a bad request is BadRequest, as without tokens."""
        answer = self.answer({"Header": "Nope", "Token": TOKEN})
        self.assertEqual(answer["Error"]["Code"], "BadRequest")
        self.assertIn("unknown Header 'Nope'", answer["Error"]["Message"])

    def test_logNamesClientNotToken(self) -> None:
        """A refusal is logged as a warning naming the client, without the token sent or known."""
        with capturedLogs() as events:
            self.answer(carrying(REQUESTS[0], WRONG))
            self.answer(carrying(REQUESTS[0], TOKEN[:-1]))
        self.assertEqual(len(events), 2)
        for event, text in zip(events, texts(list(events)), strict=True):
            self.assertEqual(event["log_level"].name, "warn")
            self.assertIn(CLIENT, text)
            self.assertIn("token", formatEvent(event))
            for secret in (WRONG, TOKEN, TOKEN[:-1], ROTATED):
                self.assertNotIn(secret, text)

    def test_rightTokenNotLogged(self) -> None:
        """An answered request logs nothing that carries its token."""
        with capturedLogs() as events:
            self.answer({"Header": "Info", "Request": "Status", "Token": TOKEN})
            self.answer({"Header": "Info", "Request": "Nope", "Token": TOKEN})
        for text in texts(list(events)):
            self.assertNotIn(TOKEN, text)


class NoTokensTests(SynchronousTestCase):
    """Without a token file, Token is allowed in every request, and not checked."""

    def test_tokenKeyAccepted(self) -> None:
        """A Token, of any value, is accepted beside every Header's own keys."""
        harness = Harness(self)
        requests: list[dict[str, Any]] = [
            {"Header": "Info", "Request": "Status", "Token": "anything"},
            {"Header": "Job", "Request": "List", "Token": 5},
        ]
        for request in requests:
            answer = self.successResultOf(harness.dispatcher.handle(request, lambda answer: None))
            self.assertEqual(answer["Status"], "OK", answer)


class TokenOverConnectionTests(SynchronousTestCase):
    """What a client sees on its connection to a server with tokens."""

    def setUp(self) -> None:
        harness = Harness(self)
        self.info = harness.info
        dispatcher = Dispatcher(
            harness.info,
            harness.jobs,
            harness.queries,
            harness.stats,
            ("/",),
            tokens=Tokens((TOKEN,)),
        )
        self.protocol = RequestProtocol(dispatcher, 4096)
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 5555))
        self.protocol.makeConnection(self.transport)

    def send(self, request: dict[str, Any]) -> None:
        self.protocol.dataReceived(json.dumps(request).encode() + b"\n")

    def answers(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.transport.value().splitlines()]

    def test_refusedWithItsId(self) -> None:
        """The Unauthorized answer carries the request's Id; the connection stays open."""
        self.send({"Header": "Info", "Request": "Status", "Id": 1, "Token": WRONG})
        self.send({"Header": "Info", "Request": "Status", "Id": 2, "Token": TOKEN})
        refused, answered = self.answers()
        self.assertEqual((refused["Id"], refused["Error"]["Code"]), (1, "Unauthorized"))
        self.assertEqual((answered["Id"], answered["Status"]), (2, "OK"))
        self.assertFalse(self.transport.disconnecting)
        self.assertEqual(self.info.asked, ["Status"])

    def test_logNamesPeer(self) -> None:
        """The log line names the client's address and port, and not the token it sent."""
        with capturedLogs() as events:
            self.send({"Header": "Info", "Request": "Status", "Token": WRONG})
        [text] = texts(list(events))
        self.assertIn(CLIENT, text)
        self.assertNotIn(WRONG, text)

    def test_unencodableTokenAnswered(self) -> None:
        """A Token holding an escaped lone surrogate is refused unread, and the connection lives."""
        self.protocol.dataReceived(b'{"Header":"Info","Request":"Status","Token":"\\ud800"}\n')
        [refused] = self.answers()
        self.assertEqual(refused["Error"]["Code"], "BadRequest")
        self.assertIn("lone surrogate", refused["Error"]["Message"])
        self.assertFalse(self.transport.disconnecting)
