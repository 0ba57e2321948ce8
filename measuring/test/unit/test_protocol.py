"""
Tests for ``measuring.server.protocol``: bytes on a connection to JSON requests, one answer line
back each.

``RequestProtocol`` runs over ``StringTransport`` and the real ``Dispatcher`` (with the fakes of
``test_dispatch``), so every answer line is built exactly as the server builds it.
"""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from measuring.errors import BadRequest, TooLarge
from measuring.server.framing import MAX_DEPTH, Framer
from measuring.server.jobs import records
from measuring.server.protocol import RequestProtocol
from measuring.test.support import write_formulas, write_parts
from measuring.test.unit.test_dispatch import Harness

LIMIT = 1024
STATUS = b'{"Header":"Info","Request":"Status"}'
STATUS_ANSWER = {
    "Header": "Info",
    "Request": "Status",
    "Status": "OK",
    "Response": {"Asked": "Status"},
}


def request(request_id: object, name: str = "Status") -> bytes:
    """An Info request line carrying ``Id``."""
    return json.dumps({"Header": "Info", "Request": name, "Id": request_id}).encode() + b"\n"


class RequestProtocolTests(SynchronousTestCase):
    """Framing, refusals and answer lines on one connection."""

    def setUp(self) -> None:
        self.connect()

    def connect(self, roots: tuple[str, ...] = ("/",)) -> None:
        """A fresh connection to a fresh dispatcher."""
        self.harness = Harness(self, roots)
        self.info = self.harness.info
        self.protocol = RequestProtocol(self.harness.dispatcher, LIMIT)
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)

    def answers(self) -> list[dict[str, Any]]:
        """Every answer written so far; each must be one whole line of JSON."""
        *lines, rest = self.transport.value().split(b"\n")
        self.assertEqual(rest, b"", "an answer does not end its line")
        return [json.loads(line) for line in lines]

    def assertRefusal(self, answer: dict[str, Any], code: str, *words: str) -> None:
        """``answer`` refuses an unreadable request with ``code``, its Message having ``words``."""
        self.assertEqual(set(answer), {"Header", "Status", "Error"})
        self.assertEqual((answer["Header"], answer["Status"]), ("Error", "Error"))
        self.assertEqual(answer["Error"]["Code"], code, answer)
        for word in words:
            self.assertIn(word, answer["Error"]["Message"])

    def test_oneLine(self) -> None:
        """A request on one line gets one answer line."""
        self.protocol.dataReceived(STATUS + b"\n")
        self.assertEqual(self.answers(), [STATUS_ANSWER])
        self.assertEqual(self.transport.value().count(b"\n"), 1)

    def test_crlf(self) -> None:
        """Lines may end with CRLF."""
        self.protocol.dataReceived(STATUS + b"\r\n" + STATUS + b"\r\n")
        self.assertEqual(self.answers(), [STATUS_ANSWER, STATUS_ANSWER])

    def test_inPieces(self) -> None:
        """A request arriving a few bytes at a time is answered once its line is complete."""
        data = STATUS + b"\n"
        for start in range(0, len(data), 5):
            self.assertEqual(self.answers(), [])
            self.protocol.dataReceived(data[start : start + 5])
        self.assertEqual(self.answers(), [STATUS_ANSWER])

    def test_multiLine(self) -> None:
        """A request spread over several lines is answered once its object closes."""
        lines = [b"{\r\n", b'  "Header": "Info",\n', b"\n", b'  "Request": "Status"\n', b"}\n"]
        for line in lines:
            self.assertEqual(self.answers(), [])
            self.protocol.dataReceived(line)
        self.assertEqual(self.answers(), [STATUS_ANSWER])

    def test_emptyLinesIgnored(self) -> None:
        """Empty and blank lines between requests are not answered."""
        self.protocol.dataReceived(b"\n\r\n   \n\t\r\n")
        self.assertEqual(self.answers(), [])
        self.protocol.dataReceived(STATUS + b"\n\n")
        self.assertEqual(self.answers(), [STATUS_ANSWER])

    def test_unreadable(self) -> None:
        """Each unreadable request is BadRequest saying why, and the connection goes on."""
        deep = b'{"a":' + b"[" * MAX_DEPTH + b"]" * MAX_DEPTH + b"}"
        cases = [
            (b"hello", ["not valid JSON", "line 1 column 1"]),
            (b'{"Header": "Info", "Request": }', ["not valid JSON"]),
            (b"}", ["not valid JSON"]),
            (b"[1, 2]", ["must be a JSON object", '{"Header":"Info","Request":"Status"}']),
            (b'"Status"', ["must be a JSON object"]),
            (b'{"Request": "\xff"}', ["not valid UTF-8"]),
            (b'{"Header":"Info","Header":"Dask"}', ["the key 'Header' more than once"]),
            (b'{"Header":"Info","Request":{"a":1,"a":2}}', ["the key 'a' more than once"]),
            (b'{"Header":"Info","Request":NaN}', ["NaN", "not valid JSON", "null"]),
            (b'{"Header":"Info","Request":-Infinity}', ["-Infinity", "not valid JSON"]),
            (deep, [f"deeper than {MAX_DEPTH} levels"]),
        ]
        for line, words in cases:
            self.transport.clear()
            self.protocol.dataReceived(line + b"\n" + STATUS + b"\n")
            refusal, answer = self.answers()
            self.assertRefusal(refusal, "BadRequest", *words)
            self.assertEqual(answer, STATUS_ANSWER, line)
            self.assertFalse(self.transport.disconnecting)

    def test_nonObjectInJsonTerms(self) -> None:
        """A request that is not an object is refused naming its JSON type, not a Python one."""
        for line, name in [
            (b"[1]", "array"),
            (b"null", "null"),
            (b'"x"', "string"),
            (b"3", "number"),
        ]:
            self.transport.clear()
            self.protocol.dataReceived(line + b"\n")
            [refusal] = self.answers()
            self.assertRefusal(refusal, "BadRequest", "must be a JSON object")
            self.assertTrue(refusal["Error"]["Message"].endswith(name), refusal)

    def test_deepestNesting(self) -> None:
        """A request nested exactly as deep as allowed is answered."""
        nested: Any = []
        for _ in range(MAX_DEPTH - 2):
            nested = [nested]
        self.protocol.dataReceived(request(nested))
        self.assertEqual(self.answers(), [{**STATUS_ANSWER, "Id": nested}])

    def test_faultInsideMultiLineRequest(self) -> None:
        """A fault in a line of a multi-line request refuses it and runs none of it.

        What follows the faulty line is read as new requests (which may be refused in turn),
        and the next good request is answered.
        """
        for lines in [
            [b"{", b'"Header": "Info",', b'"Id": "\xff",', b'"Request": "Status"}'],
            [b'{"Header": "Info", "Request": "Status", "Id":', b"[" * 40, b"]" * 40 + b"}"],
        ]:
            self.transport.clear()
            asked = len(self.harness.info.asked)
            self.protocol.dataReceived(b"\n".join([*lines, STATUS, b""]))
            refusal, *rest, answer = self.answers()
            self.assertRefusal(refusal, "BadRequest")
            for other in rest:
                self.assertRefusal(other, "BadRequest")
            self.assertEqual(answer, STATUS_ANSWER)
            self.assertEqual(len(self.harness.info.asked), asked + 1)

    def test_lineOverLimit(self) -> None:
        """A line longer than the limit is answered TooLarge and the connection is closed."""
        for data in [b"x" * (LIMIT + 1) + b"\n" + STATUS + b"\n", b"{" + b" " * (LIMIT + 1)]:
            self.connect()
            self.protocol.dataReceived(data)
            [refusal] = self.answers()
            self.assertRefusal(refusal, "TooLarge", f"longer than the limit of {LIMIT} bytes")
            self.assertTrue(self.transport.disconnecting)
            self.assertEqual(self.harness.info.asked, [])

    def test_multiLineOverLimit(self) -> None:
        """Short lines that together pass the limit are TooLarge, and the connection closes."""
        lines = [b'{"Header": "Info",'] + [b'"Pad%d": "%s",' % (i, b"y" * 200) for i in range(5)]
        self.protocol.dataReceived(b"\n".join([*lines, b'"Request": "Status"}', STATUS, b""]))
        [refusal] = self.answers()
        self.assertRefusal(refusal, "TooLarge", f"longer than the limit of {LIMIT} bytes")
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.harness.info.asked, [])

    def test_idEchoed(self) -> None:
        """Every answer to a request with an Id, OK or error, carries that Id."""
        self.protocol.dataReceived(request("first") + request({"n": [1, 2]}, "Nope"))
        ok, error = self.answers()
        self.assertEqual(ok, {**STATUS_ANSWER, "Id": "first"})
        self.assertEqual((error["Id"], error["Header"]), ({"n": [1, 2]}, "Info"))
        self.assertEqual(error["Error"]["Code"], "BadRequest")

    def test_outOfOrder(self) -> None:
        """Answers go out as they are ready, each with its own request's Id."""
        self.info.hold = True
        self.protocol.dataReceived(request(1, "Status") + request(2, "All statistic"))
        self.assertEqual(self.answers(), [])
        slow, fast = self.info.held
        fast.callback({"Cpu": 3})
        slow.callback({"State": "running"})
        self.assertEqual(
            [(answer["Id"], answer["Request"], answer["Response"]) for answer in self.answers()],
            [(2, "All statistic", {"Cpu": 3}), (1, "Status", {"State": "running"})],
        )

    def test_progressLinesCarryId(self) -> None:
        """Progress lines, and the job's answer after them, each carry the request's Id."""
        root = os.path.realpath(self.mktemp())
        write_parts(root)
        write_formulas(root)
        self.connect((root,))
        fields = {"Directory": ".", "Base": "data.parquet", "File": "work.py", "Progress": True}
        self.protocol.dataReceived(
            json.dumps({"Header": "Dask", "Request": fields, "Id": 7}).encode() + b"\n"
        )
        [job] = self.harness.pool.runs
        job.progress(1, 2)
        job.succeed()
        progress, answer = self.answers()
        self.assertEqual(
            progress, {"Header": "Progress", "Job": job.job, "Done": 1, "Total": 2, "Id": 7}
        )
        self.assertEqual((answer["Header"], answer["Status"], answer["Id"]), ("Dask", "OK", 7))

    def test_noProgressWhilePaused(self) -> None:
        """While the transport pauses the protocol, Progress lines are dropped, not the answer."""
        self.patch(records, "PROGRESS_EVERY", 0.0)  # no throttling
        root = os.path.realpath(self.mktemp())
        write_parts(root)
        write_formulas(root)
        self.connect((root,))
        fields = {"Directory": ".", "Base": "data.parquet", "File": "work.py", "Progress": True}
        self.protocol.dataReceived(
            json.dumps({"Header": "Dask", "Request": fields}).encode() + b"\n"
        )
        [job] = self.harness.pool.runs
        job.progress(1, 4)
        self.protocol.pauseProducing()  # as the transport does when answers pile up unsent
        job.progress(2, 4)
        job.progress(4, 4)
        self.protocol.resumeProducing()
        job.progress(3, 4)
        self.protocol.pauseProducing()
        job.progress(4, 4)
        job.succeed()
        *progress, answer = self.answers()
        self.assertEqual([(line["Done"], line["Total"]) for line in progress], [(1, 4), (3, 4)])
        self.assertEqual(
            (answer["Header"], answer["Status"], answer["Job"]), ("Dask", "OK", job.job)
        )

    def test_noWriteAfterConnectionLost(self) -> None:
        """An answer that is ready after its connection is gone is not written."""
        self.info.hold = True
        self.protocol.dataReceived(request(1))
        self.protocol.connectionLost(Failure(ConnectionDone()))
        self.info.held[0].callback({"State": "running"})
        self.assertEqual(self.transport.value(), b"")

    def test_unencodableAnswer(self) -> None:
        """An answer that cannot be JSON is logged and becomes Internal, keeping Header and Id."""
        self.info.hold = True
        self.protocol.dataReceived(request("n"))
        self.info.held[0].callback({"Load": float("nan")})
        [answer] = self.answers()
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        self.assertEqual(
            (answer["Header"], answer["Status"], answer.get("Id")), ("Info", "Error", "n")
        )
        self.assertEqual(answer["Error"]["Code"], "Internal")


class FramerTests(SynchronousTestCase):
    """``Framer`` finds where a request ends without parsing it."""

    def test_bracketsInStrings(self) -> None:
        """Brackets, quotes and escapes inside strings do not open or close the request."""
        for line in [
            r'{"a": "}"}',
            r'{"a": "{[{["}',
            r'{"a": "\"{", "b": "]"}',
            r'{"a": "\\"}',
            r'{"a": "\\\"}\\", "b": ["}"]}',
            r'{"a": "\u007b"}',
        ]:
            json.loads(line)
            self.assertEqual(Framer(LIMIT).feed(line), line)

    def test_acrossLines(self) -> None:
        """Lines are collected until the object closes; then the whole text comes back."""
        framer = Framer(LIMIT)
        self.assertFalse(framer.pending)
        self.assertIsNone(framer.feed('{"a": "{",'))
        self.assertTrue(framer.pending)
        self.assertIsNone(framer.feed('  "b": [1,'))
        self.assertEqual(framer.feed("2]}"), '{"a": "{",\n  "b": [1,\n2]}')
        self.assertFalse(framer.pending)

    def test_blankLines(self) -> None:
        """Blank lines before a request are dropped and do not count toward its size."""
        framer = Framer(100)
        for _ in range(5):
            self.assertIsNone(framer.feed(" " * 60))
            self.assertFalse(framer.pending)
        self.assertEqual(framer.feed("{}"), "{}")

    def test_brokenLineEndsRequest(self) -> None:
        """A line that cannot open an object ends the request, so it is refused at once."""
        for line in ["]", '{"a": "unterminated', "not json"]:
            self.assertEqual(Framer(LIMIT).feed(line), line)

    def test_depth(self) -> None:
        """Nesting past MAX_DEPTH is BadRequest and the framer starts afresh."""
        framer = Framer(LIMIT)
        self.assertIsNone(framer.feed("[" * MAX_DEPTH))
        error = self.assertRaises(BadRequest, framer.feed, "[")
        self.assertIn(f"deeper than {MAX_DEPTH}", error.message)
        self.assertFalse(framer.pending)
        self.assertEqual(framer.feed("{}"), "{}")

    def test_size(self) -> None:
        """A request past the byte limit, counted over all its lines, is TooLarge."""
        framer = Framer(50)
        self.assertIsNone(framer.feed('{"a": "' + "é" * 10 + '",'))
        error = self.assertRaises(TooLarge, framer.feed, '"b": "' + "x" * 20 + '"}')
        self.assertEqual(error.message, "the request is longer than the limit of 50 bytes")
        self.assertFalse(framer.pending)
        self.assertEqual(framer.feed("{}"), "{}")
