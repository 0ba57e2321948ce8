"""
End to end, hostile requests against the real ``twistd -n measuring``: unreadable, oversized,
trickling and piled-up requests, more connections than allowed, file descriptors run out, and
Directory, Base and File that lead out of the data roots.

Each test starts its own server in its own folder (``support.HostileTestCase``) and attacks it
over sockets. Each case checks the answer that docs/protocol.md promises and that the server still
answers Status; at cleanup, that the server's only descendant is its template process, that no
process carries the mark of any of its jobs, and that it stops cleanly taking every process with
it.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import resource
import select
import shutil
import socket
import threading
import time
from typing import Any

from twisted.trial.unittest import SkipTest

from measuring.test.support import STATUS, Connection, HostileTestCase, write_formulas

#: Descriptors this process needs for the 1000 connections test: its sockets and some to spare.
DESCRIPTORS = 2100


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    """Send ``data``, stopping quietly where the server closes the connection."""
    with contextlib.suppress(OSError):
        sock.sendall(data)


class FramingTests(HostileTestCase):
    """Bytes that are no request get BadRequest or TooLarge; the server reads on."""

    def test_unreadableRequests(self) -> None:
        """Each unreadable request gets BadRequest saying why; the connection stays usable."""
        server = self.start()
        cases = [
            (b'{"Header":"Info" "Request":"Status"}', "not valid JSON"),
            (b'{"Header":"Info","Request":"Status",}', "not valid JSON"),
            (b'{"Header":' + b"[" * 33 + b"]" * 33 + b"}", "nests deeper than 32 levels"),
            (b'{"Header":"Info","Request":"\xff\xfeStatus"}', "not valid UTF-8"),
            (b"\xc0\xaf", "not valid UTF-8"),
            (b'{"Header":"Info","Request":"Status","Id":NaN}', "NaN"),
            (b'{"Header":"Info","Request":"Status","Id":1e400}', "too large"),
            (b'{"Header":"Info","Request":"Status","Id":' + b"9" * 5000 + b"}", "cannot be read"),
            (b'{"Header":"Info","Header":"Info","Request":"Status"}', "more than once"),
            (b'[{"Header":"Info","Request":"Status"}]', "must be a JSON object"),
            (b'{"Header":"Info","Request":"Status","Extra":1}', "unknown key 'Extra'"),
        ]
        with server.connect() as connection:
            for number, (request, words) in enumerate(cases):
                answer = connection.ask(request)
                self.assertEqual(answer["Error"]["Code"], "BadRequest", (request[:60], answer))
                self.assertIn(words, answer["Error"]["Message"])
                status = connection.ask({**STATUS, "Id": number})
                self.assertEqual((status["Status"], status["Id"]), ("OK", number), status)
            # 32 levels deep is still read: the Id comes back as it was sent.
            deepest = json.loads("[" * 31 + "]" * 31)
            answer = connection.ask({**STATUS, "Id": deepest})
            self.assertEqual((answer["Status"], answer["Id"]), ("OK", deepest))
        self.assert_fine(server)

    def test_loneSurrogates(self) -> None:
        """A JSON escape of a lone surrogate (no UTF-8 text) anywhere gets BadRequest, at once."""
        server = self.start()
        surrogate = "\ud800"  # sent as the six characters \ud800: valid JSON, not valid Unicode
        requests: list[dict[str, Any]] = [
            {**STATUS, "Id": surrogate},
            {"Header": "Job", "Request": "Status", "Job": surrogate},
            self.dask("total", Directory=surrogate),
            self.dask("total", Base=surrogate),
        ]
        codes = []
        with server.connect() as connection:
            connection.socket.settimeout(10)
            for number, request in enumerate(requests):
                codes.append(self.answer_to(connection, request).get("Error", {}).get("Code"))
                status = self.answer_to(connection, {**STATUS, "Id": number})
                self.assertEqual((status["Status"], status["Id"]), ("OK", number))
        self.assertEqual(codes, ["BadRequest"] * len(requests))
        self.assert_fine(server)

    def test_binaryGarbage(self) -> None:
        """64 KiB of random bytes with newlines get only BadRequest answers; then Status works."""
        server = self.start()
        garbage = random.Random(7).randbytes(64 * 1024)
        self.assertGreater(garbage.count(b"\n"), 100)
        with server.connect() as connection:
            connection.send(garbage)
            # A lone quote ends whatever request the garbage left open, with one more BadRequest.
            connection.send(b'"')
            connection.send({**STATUS, "Id": "after"})
            answers = []
            while (answer := connection.receive()).get("Id") != "after":
                answers.append(answer)
        self.assertEqual(answer["Status"], "OK", answer)
        self.assertGreater(len(answers), 1)
        self.assertEqual(
            {(a["Header"], a["Error"]["Code"]) for a in answers}, {("Error", "BadRequest")}
        )
        self.assert_fine(server)

    def test_eightMebibyteLine(self) -> None:
        """An 8 MiB line gets TooLarge (the limit is 1 MiB) and its connection is closed."""
        server = self.start()
        line = b'{"Header":"Info","Request":"Status","Id":"' + b"x" * (8 * 2**20) + b'"}\n'
        with server.connect() as connection:
            sender = threading.Thread(target=_send_quietly, args=(connection.socket, line))
            sender.start()
            try:
                answer = connection.receive()
            finally:
                sender.join()
            self.assertEqual((answer["Header"], answer["Error"]["Code"]), ("Error", "TooLarge"))
            self.assertIn("longer than the limit of 1048576 bytes", answer["Error"]["Message"])
            self.assertRaises(ConnectionError, connection.receive)
        self.assert_fine(server)

    def test_requestByteByByte(self) -> None:
        """A request sent one byte per packet, over two CRLF lines, is answered once complete."""
        server = self.start()
        request = b'{"Header":"Info",\r\n "Request":"Status","Id":"split"}\r\n'
        with server.connect() as connection:
            connection.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for byte in request:
                connection.socket.sendall(bytes([byte]))
                time.sleep(0.002)
            answer = connection.receive()
        self.assertEqual((answer["Status"], answer["Id"]), ("OK", "split"), answer)
        self.assert_fine(server)


class ConnectionTests(HostileTestCase):
    """Many, idle, trickling and surplus connections, and descriptors run out."""

    def test_thousandConnections(self) -> None:
        """1000 connections open at once each get their Status; the 1001st gets Busy."""
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 4 * DESCRIPTORS)
        if wanted < DESCRIPTORS:
            raise SkipTest(
                f"RLIMIT_NOFILE allows {wanted} descriptors; the test needs {DESCRIPTORS}"
            )
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        self.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, (soft, hard))
        server = self.start()  # inherits the raised limit
        with contextlib.ExitStack() as stack:
            connections: list[Connection] = []
            # Opened 25 at a time, each answered once, so that no burst overflows the listen
            # backlog (a dropped SYN is retried a second later: slow, not wrong).
            while len(connections) < 1000:
                batch = [stack.enter_context(server.connect()) for _ in range(25)]
                for connection in batch:
                    self.assertEqual(connection.ask(STATUS)["Status"], "OK")
                connections += batch
            for number, connection in enumerate(connections):
                connection.send({**STATUS, "Id": number})
            answers = [connection.receive() for connection in connections]
            self.assertEqual([a["Id"] for a in answers], list(range(1000)))
            self.assertEqual({a["Status"] for a in answers}, {"OK"})
            with server.connect() as surplus:
                busy = surplus.receive()
                self.assertEqual(busy["Error"]["Code"], "Busy", busy)
                self.assertRaises(ConnectionError, surplus.receive)
        self.wait_for(lambda: self.serves(server), "Status after the connections closed")

    def test_clientThatDoesNotRead(self) -> None:
        """A client sending requests without reading the answers is no longer read from."""
        server = self.start()
        request = json.dumps({**STATUS, "Id": "x" * 1024}).encode() + b"\n"
        burst = request * 64
        with server.connect() as connection:
            connection.socket.settimeout(2)
            sent = 0
            with contextlib.suppress(TimeoutError):
                while sent < 64 * 2**20:
                    connection.socket.sendall(burst)
                    sent += len(burst)
            # Each answer is larger than its request: read on, the server would buffer without end.
            self.assertLess(sent, 64 * 2**20, "the server read 64 MiB of requests never answered")
        self.wait_for(lambda: self.serves(server), "Status on a new connection")

    def test_idleAndTricklingClosed(self) -> None:
        """--idle-timeout closes idle and trickling connections, not those waiting for their job."""
        server = self.start("--idle-timeout", "2")
        self.hold()
        self.addCleanup(self.unhold)
        with contextlib.ExitStack() as stack:
            waiting = stack.enter_context(server.connect())
            waiting.send({**self.dask("held"), "Id": "held"})
            following = stack.enter_context(server.connect())
            accepted = following.ask(
                {**self.dask("held", Async=True, Progress=True), "Id": "follow"}
            )
            self.assertEqual(accepted["Status"], "Accepted", accepted)
            self.wait_for(
                lambda: self.info(server, "Dask process")["Count"] == 2, "the held jobs running"
            )
            idle = stack.enter_context(server.connect())
            trickling = stack.enter_context(server.connect())
            trickling.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # An object that never closes, one byte every half second, with a newline now and then.
            never_done = iter(b'{\n"Header":"Info",\n"Pad":[\n' + b"1,\n" * 1000)
            deadline = time.monotonic() + 60
            while not select.select([trickling.socket], [], [], 0.5)[0]:
                if time.monotonic() > deadline:
                    self.fail("the trickling connection was still open after 60 s")
                _send_quietly(trickling.socket, bytes([next(never_done)]))
            for connection in (trickling, idle):
                closed = connection.receive()
                self.assertEqual((closed["Header"], closed["Error"]["Code"]), ("Error", "Timeout"))
                self.assertIn("(--idle-timeout)", closed["Error"]["Message"])
                self.assertRaises(ConnectionError, connection.receive)
            # Silent since before the idle one opened, the waiting connections outlived the bound.
            self.assertEqual(select.select([waiting.socket], [], [], 0)[0], [], "sync closed")
            self.assertEqual(select.select([following.socket], [], [], 0)[0], [], "async closed")
            self.release_all()
            answers = [waiting.receive()]
            answers.append(following.receive())
            while answers[-1]["Header"] == "Progress":
                answers.append(following.receive())
        for answer, id in zip((answers[0], answers[-1]), ("held", "follow"), strict=True):
            self.assertEqual((answer["Id"], answer["Header"], answer["Status"]), (id, "Dask", "OK"))
            self.assertEqual(answer["Response"]["Results"]["held"]["Value"], len(self.frame))
        self.assert_fine(server)

    def test_maxConnections(self) -> None:
        """With --max-connections 5 a sixth connection gets one Busy line; the five work on."""
        server = self.start("--max-connections", "5")
        with contextlib.ExitStack() as stack:
            five = [stack.enter_context(server.connect()) for _ in range(5)]
            for connection in five:
                self.assertEqual(connection.ask(STATUS)["Status"], "OK")
            with server.connect() as sixth:
                busy = sixth.receive()
                self.assertEqual((busy["Header"], busy["Error"]["Code"]), ("Error", "Busy"))
                self.assertIn("--max-connections", busy["Error"]["Message"])
                self.assertRaises(ConnectionError, sixth.receive)
            for connection in five:
                self.assertEqual(connection.ask(STATUS)["Status"], "OK")
            five.pop().close()
            # Once the server has seen that one close, a new connection is served again.
            self.wait_for(lambda: self.serves(server), "a place for a new connection")

    def test_outOfFileDescriptors(self) -> None:
        """Past its RLIMIT_NOFILE the server drops new connections; once they close it serves."""
        server = self.start()
        server.wait_until_ready()
        resource.prlimit(server.process.pid, resource.RLIMIT_NOFILE, (64, 64))
        dropped = False
        with contextlib.ExitStack() as stack:
            for _ in range(200):
                connection = stack.enter_context(Connection(server.port, timeout=30))
                try:
                    answer = connection.ask(STATUS)
                except ConnectionError:
                    dropped = True
                    break
                self.assertEqual(answer["Status"], "OK", answer)
        self.assertTrue(dropped, "200 connections were all served under a limit of 64 descriptors")
        self.wait_for(lambda: self.serves(server), "Status after the connections closed")
        answer = self.ask(server, self.dask("total"))
        self.assertAlmostEqual(
            answer["Response"]["Results"]["total"]["Value"], self.frame.value.sum()
        )


class PathTests(HostileTestCase):
    """Directory, Base and File that lead out of the data roots, or are no paths at all."""

    def test_pathEscapes(self) -> None:
        """Every escape is Forbidden, every non-path BadRequest; nothing is written anywhere."""
        outside = os.path.realpath(self.mktemp())
        os.makedirs(outside)
        write_formulas(outside)
        shutil.copy(os.path.join(self.folder, "time_series.parquet"), outside)
        links = {
            "elsewhere": outside,
            "leak.parquet": os.path.join(outside, "time_series.parquet"),
            "leak.py": os.path.join(outside, "work.py"),
        }
        for name, target_path in links.items():
            os.symlink(target_path, os.path.join(self.folder, name))
        trap = os.path.join(self.folder, "trap")  # its results/ leads outside
        os.makedirs(trap)
        write_formulas(trap)
        os.symlink(
            os.path.join(self.folder, "time_series.parquet"),
            os.path.join(trap, "time_series.parquet"),
        )
        os.symlink(outside, os.path.join(trap, "results"))
        before = sorted(os.listdir(outside))
        server = self.start()
        up = os.path.relpath(outside, self.folder)
        forbidden: list[tuple[dict[str, Any], str]] = [
            ({"Directory": ".."}, "outside the data roots"),
            ({"Directory": f"{self.folder}/../.."}, "outside the data roots"),
            ({"Directory": outside}, "outside the data roots"),
            ({"Directory": "/"}, "outside the data roots"),
            ({"Directory": "elsewhere"}, "outside the data roots"),
            ({"Directory": "elsewhere/.."}, "outside the data roots"),
            ({"Directory": ".measuring"}, "state directory"),
            ({"Directory": "trap"}, "leads outside its Directory"),
            ({"Base": f"{up}/time_series.parquet"}, "leads outside its Directory"),
            ({"Base": os.path.join(outside, "time_series.parquet")}, "leads outside"),
            ({"Base": "leak.parquet"}, "leads outside its Directory"),
            ({"Base": "elsewhere"}, "leads outside its Directory"),
            ({"Base": ".measuring/jobs.sqlite"}, "state directory"),
            ({"File": "../../../../../../../../etc/passwd"}, "leads outside its Directory"),
            ({"File": "/etc/passwd"}, "leads outside its Directory"),
            ({"File": "leak.py"}, "leads outside its Directory"),
            ({"File": "elsewhere/work.py"}, "leads outside its Directory"),
        ]
        bad: list[tuple[dict[str, Any], str]] = [
            ({"Directory": ""}, "Directory must not be empty"),
            ({"Base": ""}, "Base must not be empty"),
            ({"File": ""}, "File must not be empty"),
            ({"Directory": f"{self.folder}\0/etc"}, "Directory must not contain a NUL"),
            ({"File": "work.py\0../../etc/passwd"}, "File must not contain a NUL"),
            ({"Base": "time_series.parquet\0"}, "Base must not contain a NUL"),
        ]
        for field in ("Directory", "Base", "File"):
            for value, kind in (
                (5, "a number"),
                (None, "null"),
                ([], "an array"),
                ({}, "an object"),
                (True, "true/false"),
            ):
                bad.append(({field: value}, f'"{field}" must be a string, not {kind}'))
        with server.connect() as connection:
            for cases, code in ((forbidden, "Forbidden"), (bad, "BadRequest")):
                for fields, words in cases:
                    answer = connection.ask(self.dask("total", **fields))
                    self.assertEqual(
                        (answer["Header"], answer["Error"]["Code"]),
                        ("Dask", code),
                        (fields, answer),
                    )
                    self.assertIn(words, answer["Error"]["Message"], fields)
        self.assertEqual(sorted(os.listdir(outside)), before)
        self.assertFalse(os.path.exists(os.path.join(self.folder, "results")))
        self.assertEqual(
            self.ask(server, {"Header": "Job", "Request": "List"})["Response"]["Jobs"], []
        )
        self.assert_fine(server)
