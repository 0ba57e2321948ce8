"""
End to end, connections as clients and attackers make them: a client that half-closes its side
(``nc -N``, ``ncat``, ``socat`` at the end of their input) still gets every answer; connections
that send nothing are closed soon; one address flooding the server with sockets does not shut
out a new client; a flood of requests without a token does not flood the log; the server starts
only with the file descriptors its ``--max-connections`` needs.

Each test starts the real ``twistd -n measuring`` (``support.ServerTestCase``) and speaks to it
over plain sockets.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import socket
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import psutil
from twisted.trial.unittest import SkipTest

from measuring.local import LISTENING, environment, twistd
from measuring.server.fdlimit import reserve
from measuring.server.throttle import BURST
from measuring.test.support import (
    PATIENCE,
    STATUS,
    TOKEN,
    Connection,
    Server,
    ServerTestCase,
    write_token_file,
)


def half_closed(server: Server, *requests: dict[str, Any] | bytes) -> list[dict[str, Any]]:
    """Send ``requests``, end the sending side at once, and read every answer until the close."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=PATIENCE) as connection:
        connection.sendall(
            b"".join(
                request if isinstance(request, bytes) else json.dumps(request).encode() + b"\n"
                for request in requests
            )
        )
        connection.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := connection.recv(65536):
            received += chunk
    return [json.loads(line) for line in received.splitlines()]


class HalfCloseTests(ServerTestCase):
    """A client that ends its side after its requests gets their answers, then the close."""

    def test_infoListAndBadJson(self) -> None:
        """Status, Job List and a line that is not JSON are each answered, every time."""
        server = self.start()
        listing = {"Header": "Job", "Request": "List", "Id": "list"}
        for _ in range(10):
            # Answers come as they are ready, not in order: the Id tells them apart.
            answers = half_closed(server, {**STATUS, "Id": "status"}, listing, b"{not json\n")
            by_id = {answer.get("Id"): answer for answer in answers}
            self.assertEqual(len(answers), 3, answers)
            self.assertEqual(by_id["status"]["Status"], "OK", answers)
            self.assertEqual(by_id["list"]["Status"], "OK", answers)
            self.assertEqual(by_id[None]["Error"]["Code"], "BadRequest", answers)

    def test_lastRequestWithoutNewline(self) -> None:
        """``printf '{...}' | nc -N``: a request without its newline is answered at the end."""
        server = self.start()
        [answer] = half_closed(server, json.dumps(STATUS).encode())
        self.assertEqual(answer["Status"], "OK", answer)

    def test_synchronousJobAnswered(self) -> None:
        """A Dask request's answer, sent when its job ends, reaches the half-closed client."""
        server = self.start()
        [answer] = half_closed(server, self.dask("mean_by_sensor"))
        self.assertEqual(answer["Status"], "OK", answer)
        self.assert_means(answer["Response"]["Results"])


def outside_address() -> str:
    """An address of this machine other than loopback, for a client that counts as remote."""
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family == socket.AF_INET and not address.address.startswith("127."):
                return str(address.address)
    raise SkipTest("this machine has no IPv4 address besides loopback")


def port_on(server: Server, host: str) -> int:
    """The port the server logged it listens on at ``host``."""
    found = re.search(rf"measuring listening on {re.escape(host)}:(\d+)", server.log())
    assert found is not None, server.log()
    return int(found.group(1))


def with_token(request: dict[str, Any]) -> dict[str, Any]:
    return {**request, "Token": TOKEN}


class FloodTests(ServerTestCase):
    """Sockets held open without requests; many requests without a token."""

    def test_silentConnectionClosedSoon(self) -> None:
        """A connection that sends nothing gets Timeout naming the setting, then the close."""
        server = self.start("--first-request-timeout", "1")
        with server.connect() as silent:
            started = time.monotonic()
            closed = silent.receive()
            self.assertLess(time.monotonic() - started, 10)
            self.assertEqual(closed["Error"]["Code"], "Timeout", closed)
            self.assertIn("--first-request-timeout", closed["Error"]["Message"])
            self.assertRaises(ConnectionError, silent.receive)

    def test_oneAddressFloods(self) -> None:
        """One remote address holding sockets gets Busy past its bound; a new client is served."""
        remote = outside_address()
        tokens = write_token_file(self.folder)
        server = self.start(
            "--port", f"tcp:0:interface={remote}", "--token-file", tokens,
            "--max-client-connections", "20", "--max-connections", "40",
        )  # fmt: skip
        port = port_on(server, remote)
        with contextlib.ExitStack() as stack:
            flood = [
                stack.enter_context(Connection(port, host=remote, timeout=PATIENCE))
                for _ in range(20)
            ]
            refused = stack.enter_context(Connection(port, host=remote, timeout=PATIENCE))
            busy = refused.receive()
            self.assertEqual(busy["Error"]["Code"], "Busy", busy)
            self.assertIn(f"{remote} has 20 connections open", busy["Error"]["Message"])
            self.assertIn("--max-client-connections", busy["Error"]["Message"])
            for _ in range(3):
                answer = server.ask(with_token(STATUS))
                self.assertEqual(answer["Status"], "OK", answer)
            # The flood's sockets still work: the bound refused only the ones past it.
            self.assertEqual(flood[0].ask(with_token(STATUS))["Status"], "OK")

    def test_fullServerMakesRoom(self) -> None:
        """With every place held by idle loopback sockets, a new client's Status is answered."""
        server = self.start("--max-connections", "30")
        with contextlib.ExitStack() as stack:
            idle = [stack.enter_context(server.connect()) for _ in range(30)]
            for _ in range(5):
                answer = server.ask(STATUS)
                self.assertEqual(answer["Status"], "OK", answer)
            made_room = idle[0].receive()
            self.assertEqual(made_room["Error"]["Code"], "Busy", made_room)
            self.assertIn("its place went to a new connection", made_room["Error"]["Message"])

    def test_unauthorizedFloodLoggedAtARate(self) -> None:
        """300 requests without a token on as many connections: few log lines, exact counters."""
        tokens = write_token_file(self.folder)
        server = self.start("--token-file", tokens)
        for _ in range(300):
            refused = server.ask(STATUS)
            self.assertEqual(refused["Error"]["Code"], "Unauthorized", refused)
        statistic = server.ask(with_token({"Header": "Info", "Request": "All statistic"}))
        self.assertEqual(statistic["Response"]["Errors"]["Unauthorized"], 300)
        warned = server.log().count("without a valid token")
        self.assertGreaterEqual(warned, 1)
        self.assertLessEqual(warned, BURST, server.log()[-4000:])


def soft_file_limit(pid: int) -> int:
    """The soft RLIMIT_NOFILE of process ``pid``."""
    return resource.prlimit(pid, resource.RLIMIT_NOFILE)[0]


@contextlib.contextmanager
def server_under(folder: str, nofile: tuple[int, int], *arguments: str) -> Iterator[str]:
    """
    ``twistd -n measuring arguments`` started with RLIMIT_NOFILE ``nofile``; gives its log once
    it listens (or has exited), and stops it at the end.
    """
    log_path = os.path.join(folder, "limited.log")
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [*twistd(), "-n", "--pidfile=", "measuring", "--port", "tcp:0:interface=127.0.0.1",
             "--state-dir", os.path.join(folder, ".measuring"), "--data-root", folder, *arguments],
            cwd=folder, env=environment(), stdout=log, stderr=subprocess.STDOUT,
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, nofile),
        )  # fmt: skip
    try:
        deadline = time.monotonic() + PATIENCE
        while time.monotonic() < deadline and process.poll() is None:
            with open(log_path, encoding="utf-8", errors="replace") as f:
                if LISTENING in f.read():
                    break
            time.sleep(0.05)
        with open(log_path, encoding="utf-8", errors="replace") as f:
            yield f"exit code {process.poll()}\n" + f.read()
    finally:
        process.terminate()
        process.wait(PATIENCE)


class FileLimitTests(ServerTestCase):
    """RLIMIT_NOFILE against --max-connections at start."""

    def test_softLimitRaised(self) -> None:
        """With a soft limit of 1024 below a hard one, 3000 connections raise the soft limit."""
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        needed = 3000 + reserve(2)
        if hard != resource.RLIM_INFINITY and hard < needed:
            raise SkipTest(f"the hard RLIMIT_NOFILE here is {hard}; the test needs {needed}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
        self.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, (soft, hard))
        server = self.start("--max-connections", "3000")  # inherits the soft limit of 1024
        self.assertGreaterEqual(soft_file_limit(server.process.pid), needed)
        self.assertEqual(server.ask(STATUS)["Status"], "OK")

    def test_givenValueRefused(self) -> None:
        """--max-connections 3000 under a hard limit of 1024: the start stops, saying why."""
        with server_under(self.folder, (1024, 1024), "--max-connections", "3000") as log:
            self.assertTrue(log.startswith("exit code 1"), log)
            self.assertIn("--max-connections 3000: 3000 connections need", log)
            self.assertIn(f"--max-connections {1024 - reserve(2)} or fewer", log)

    def test_defaultLowered(self) -> None:
        """The default 1000 under a hard limit of 1024 is lowered, the log says so, it serves."""
        with server_under(self.folder, (1024, 1024)) as log:
            self.assertTrue(log.startswith("exit code None"), log)
            self.assertIn(f"--max-connections lowered from 1000 to {1024 - reserve(2)}", log)
            found = re.search(r"measuring listening on 127\.0\.0\.1:(\d+)", log)
            assert found is not None, log
            port = int(found.group(1))
            with Connection(port, timeout=PATIENCE) as connection:
                self.assertEqual(connection.ask(STATUS)["Status"], "OK")
