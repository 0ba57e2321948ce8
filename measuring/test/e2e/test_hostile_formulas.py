"""
End to end, hostile formulas and the token they reach for: formulas that loop, hoard memory,
crash, leave processes behind, write outside their folder or look for the token; requests with a
wrong token; and listening beyond loopback without one.

Each test starts its own server in its own folder (``support.HostileTestCase``). Each case checks
the answer that docs/protocol.md and README.md's Security section promise and that the server
still answers Status; at cleanup, that the server's only descendant is its template process,
that no process carries the mark of any of its jobs, and that it stops cleanly taking every
process with it.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
from typing import Any

from twisted.trial.unittest import SkipTest

from measuring.test.support import (
    STATUS,
    Connection,
    HostileTestCase,
    Server,
    alive,
    bwrap_missing,
    carrying,
    end,
    run_twistd,
    write_formulas,
    write_token_file,
)

#: Formulas reaching for what is outside their folder; OUTSIDE, TOKEN and TOKEN_FILE are appended.
REACHING = '''
import json
import os


def _read(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


def _parent(pid):
    stat = _read(f"/proc/{pid}/stat").decode()
    return int(stat.rsplit(")", 1)[1].split()[1]) if stat else 0


def snoop(df):
    """Looks for TOKEN in every environment it can read and in every token file it finds named."""
    ancestors, pid = [], os.getppid()
    while pid > 1:
        ancestors.append(pid)
        pid = _parent(pid)
    environs = [_read(f"/proc/{name}/environ") for name in os.listdir("/proc") if name.isdigit()]
    files = {TOKEN_FILE}
    for pid in ancestors:
        words = _read(f"/proc/{pid}/cmdline").decode().split("\\0")
        files.update(path for flag, path in zip(words, words[1:]) if flag == "--token-file")
    return json.dumps({
        "Environment": sorted(os.environ),
        "Ancestors": ancestors,
        "EnvironsRead": sum(1 for environ in environs if environ),
        "InEnviron": any(TOKEN.encode() in environ for environ in environs),
        "Files": sorted(files),
        "InFile": any(TOKEN.encode() in _read(path) for path in files),
    })


def write_outside(df):
    with open(os.path.join(OUTSIDE, "written.txt"), "w") as f:
        f.write("escaped")
    return "written"
'''

#: Formulas that start "sleep 300" with no environment (so without the worker's mark) in a session
#: of its own (so outside the worker's process group), note its pid, then loop deaf to SIGTERM
#: (so the worker outlives its children by a second), or exit.
ORPHANS = """
import os
import signal
import subprocess


def _sleep():
    sleeper = subprocess.Popen(["sleep", "300"], env={}, start_new_session=True)
    with open("sleep.pid.new", "w") as f:
        f.write(str(sleeper.pid))
    os.replace("sleep.pid.new", "sleep.pid")


def loop(df):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _sleep()
    while True:
        pass


def leave(df):
    _sleep()
    os._exit(3)
"""


class TokenTests(HostileTestCase):
    """With --token-file, only a request carrying one of its tokens is served."""

    def start_with_token(self) -> tuple[Server, str]:
        """A server with a token file of a new token (after a comment); returns it and the token."""
        self.token = secrets.token_urlsafe(32)  # also for the checks at cleanup
        folder = os.path.realpath(self.mktemp())
        os.makedirs(folder)
        path = write_token_file(folder, "# measuring tokens", self.token)
        return self.start("--token-file", path), self.token

    def test_onlyTheRightToken(self) -> None:
        """Missing, wrong and ill-typed tokens all get one Unauthorized; the right one is served."""
        server, token = self.start_with_token()
        wrong: list[dict[str, Any]] = [
            STATUS,
            {**STATUS, "Token": secrets.token_urlsafe(32)},
            {**STATUS, "Token": token + " "},
            {**STATUS, "Token": token[:-1]},
            {**STATUS, "Token": 12345},
            {**STATUS, "Token": [token]},
            {**STATUS, "Token": None},
            {"Header": "Nope", "Token": token[::-1]},
            self.dask("total"),
        ]
        errors = []
        for request in wrong:
            with server.connect() as connection:
                connection.socket.settimeout(10)
                answer = self.answer_to(connection, request)
            self.assertEqual(answer["Status"], "Error", (request, answer))
            errors.append(answer["Error"])
        self.assertEqual(errors, [errors[0]] * len(wrong))
        self.assertEqual(errors[0]["Code"], "Unauthorized")
        with server.connect() as connection:
            connection.socket.settimeout(10)
            # A lone surrogate is no text at all: refused like any unreadable request, or
            # like a wrong token, but answered and never served.
            answer = self.answer_to(connection, {**STATUS, "Token": "\udfff"})
            self.assertIn(answer["Error"]["Code"], ("BadRequest", "Unauthorized"), answer)
            refused = len(wrong) + (answer["Error"]["Code"] == "Unauthorized")
            self.assertEqual(connection.ask({**STATUS, "Token": token})["Status"], "OK")
        statistic = self.ask(server, {"Header": "Info", "Request": "All statistic"})["Response"]
        self.assertEqual(statistic["Errors"]["Unauthorized"], refused)
        self.assertEqual(
            self.ask(server, {"Header": "Job", "Request": "List"})["Response"]["Jobs"], []
        )
        self.assertIn("without a valid token", server.log())
        self.assertNotIn(token, server.log())
        self.assertNotIn(token[:-1], server.log())

    def test_closedAfterThreeRefusals(self) -> None:
        """A connection is answered three times without a valid token, then closed."""
        server, token = self.start_with_token()
        with server.connect() as connection:
            connection.socket.settimeout(10)
            for _ in range(3):
                connection.send({**STATUS, "Token": token[::-1]})
            codes = [connection.receive()["Error"]["Code"] for _ in range(3)]
            self.assertEqual(codes, ["Unauthorized"] * 3)
            self.assertRaises(ConnectionError, connection.ask, {**STATUS, "Token": token})
        self.assertIn("too many requests without a valid token", server.log())


class FormulaTests(HostileTestCase):
    """Formulas that loop, hoard, exit, crash or leave processes fail their own job only."""

    def test_runawayFormulas(self) -> None:
        """A loop ends Timeout, endless memory MemoryLimit, os._exit and a segfault JobFailed."""
        server = self.start("--job-memory", "300MB")
        expected = [
            (self.hostile("loop", Timeout=2), "Timeout", "limit of 2 s"),
            (self.dask("hog"), "MemoryLimit", "(--job-memory)"),
            (self.hostile("leave"), "JobFailed", "exited with code 7"),
            (self.hostile("segfault"), "JobFailed", "was killed by signal 11 (SIGSEGV)"),
        ]
        for request, code, words in expected:
            answer = server.ask(request)
            self.assertEqual(answer["Error"]["Code"], code, answer)
            self.assertIn(words, answer["Error"]["Message"])
            self.assertEqual(carrying(answer["Job"]), [])
            self.assert_fine(server)
        self.assertEqual(self.info(server, "Dask process")["Count"], 0)

    def test_outlivingProcessesEnd(self) -> None:
        """A forked child in its own session and a spawned "sleep 600" end with their job."""
        server = self.start()
        answer = server.ask(self.hostile("outlive"))
        self.assertEqual(answer["Status"], "OK", answer)
        pids = [int(pid) for pid in answer["Response"]["Results"]["outlive"]["Value"].split()]
        self.assertEqual(len(pids), 2)
        self.wait_for(lambda: not alive(pids), "the formula's processes ending")
        self.assertEqual(carrying(answer["Job"]), [])
        self.assert_fine(server)

    def sleeper(self) -> int:
        """The pid of the "sleep 300" of ORPHANS, once noted; ended after the test."""
        path = os.path.join(self.folder, "sleep.pid")
        self.wait_for(lambda: os.path.exists(path), "the formula to start its sleep")
        with open(path) as f:
            pid = int(f.read())
        self.addCleanup(end, pid)
        return pid

    def test_timeoutEndsTheWholeTree(self) -> None:
        """A timed-out job's worker is ended with every process below it, marked or not."""
        write_formulas(self.folder, ORPHANS, name="orphans.py")
        server = self.start()
        # The job's time counts while it waits for the template: on a busy machine, wait for it.
        self.wait_for(
            lambda: self.ask(server, STATUS)["Response"]["Workers"]["Template"] == "ready",
            "a ready template",
        )
        job = self.submit(server, "loop", File="orphans.py", Timeout=2)
        pid = self.sleeper()
        self.assertEqual(alive([pid]), [pid])
        status = self.wait_for_job(server, job, "timeout")
        self.assertIn("limit of 2 s", status["Error"]["Message"])
        self.wait_for(lambda: not alive([pid]), f"the end of the formula's sleep {pid}", 10)
        self.wait_for(
            lambda: pid not in server.descendants(), f"the server to reap the ended sleep {pid}", 10
        )
        self.assert_fine(server)

    def test_deadWorkersOrphansEnd(self) -> None:
        """What a worker that died (os._exit) left running, unmarked, is ended by the server."""
        write_formulas(self.folder, ORPHANS, name="orphans.py")
        server = self.start()
        answer = server.ask(self.dask("leave", File="orphans.py"))
        self.assertEqual(answer["Error"]["Code"], "JobFailed", answer)
        self.assertIn("exited with code 3", answer["Error"]["Message"])
        pid = self.sleeper()
        self.wait_for(lambda: not alive([pid]), f"the end of the formula's sleep {pid}", 10)
        self.wait_for(
            lambda: pid not in server.descendants(), f"the server to reap the ended sleep {pid}", 10
        )
        self.assert_fine(server)


class SecretTests(HostileTestCase):
    """What a formula can reach of the token and of folders outside its own."""

    def write_reaching(self) -> tuple[str, str]:
        """A token file, a folder outside the data root, and reaching.py; returns the first two."""
        self.token = secrets.token_urlsafe(32)
        token_file = os.path.realpath(self.mktemp())
        with open(token_file, "w") as f:
            f.write(self.token + "\n")
        os.chmod(token_file, 0o600)
        outside = os.path.realpath(self.mktemp())
        os.makedirs(outside)
        constants = f"OUTSIDE = {outside!r}\nTOKEN = {self.token!r}\nTOKEN_FILE = {token_file!r}\n"
        write_formulas(self.folder, REACHING + constants, name="reaching.py")
        return token_file, outside

    def snoop(self, server: Server) -> dict[str, Any]:
        answer = self.ask(server, self.dask("snoop", File="reaching.py"))
        self.assertEqual(answer["Status"], "OK", answer)
        found: dict[str, Any] = json.loads(answer["Response"]["Results"]["snoop"]["Value"])
        return found

    def test_tokenInNoEnvironment(self) -> None:
        """Without a sandbox the token is in no process environment a formula can read."""
        token_file, _ = self.write_reaching()
        server = self.start("--token-file", token_file)
        found = self.snoop(server)
        self.assertIn(server.process.pid, found["Ancestors"])
        self.assertIn(token_file, found["Files"])  # named on the server's command line
        self.assertGreater(found["EnvironsRead"], 0)
        self.assertIs(found["InEnviron"], False)
        # A minimal environment: nothing of the server's own beyond what Python needs, and
        # OpenBLAS kept at one thread (as in Dask's workers).
        minimal = re.compile(
            r"(PATH|LANG|HOME|TMPDIR|TZ|PYTHON[A-Z]*|MEASURING_[A-Z]+|OPENBLAS_NUM_THREADS)"
        )
        self.assertEqual([name for name in found["Environment"] if not minimal.fullmatch(name)], [])
        self.assert_fine(server)

    def test_sandboxedFormulaReachesNothing(self) -> None:
        """In bwrap a formula cannot write outside its folder, nor find the token anywhere."""
        reason = bwrap_missing()
        if reason is not None:
            raise SkipTest(reason)
        token_file, outside = self.write_reaching()
        server = self.start("--token-file", token_file, "--sandbox", "bwrap")
        found = self.snoop(server)
        self.assertNotIn(server.process.pid, found["Ancestors"])
        self.assertEqual((found["InEnviron"], found["InFile"]), (False, False))

        answer = self.ask(server, self.dask("write_outside", File="reaching.py"))
        self.assertEqual(answer["Error"]["Code"], "JobFailed", answer)
        self.assertTrue(
            "Read-only file system" in answer["Error"]["Message"]
            or "No such file or directory" in answer["Error"]["Message"],
            answer,
        )
        self.assertEqual(os.listdir(outside), [])
        self.assert_fine(server)


class ExposureTests(HostileTestCase):
    """Listening beyond loopback needs a token, or a warning at every start."""

    def run_twistd(self, *arguments: str) -> subprocess.CompletedProcess[str]:
        return run_twistd(self.folder, "--data-root", self.folder, *arguments)

    def test_allInterfacesNeedToken(self) -> None:
        """--port tcp:0 (every interface) without a token stops the start, naming both ways out."""
        result = self.run_twistd("--port", "tcp:0")
        self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
        self.assertIn("--token-file", result.stdout)
        self.assertIn("--insecure-no-token", result.stdout)
        self.assertNotIn("Traceback", result.stdout + result.stderr)

    def test_readableTokenFileRefused(self) -> None:
        """A token file other users can read stops the start, saying to chmod 600 it."""
        path = os.path.join(self.folder, "tokens")
        with open(path, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
        os.chmod(path, 0o644)
        result = self.run_twistd("--token-file", path)
        self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
        self.assertIn("chmod 600", result.stdout)

    def test_insecureNoTokenWarns(self) -> None:
        """With --insecure-no-token the server listens on every interface and logs a warning."""
        server = self.start("--port", "tcp:0", "--insecure-no-token")
        self.assertIn("WITHOUT a token (--insecure-no-token)", server.log())
        listening = self.wait_for(
            lambda: [line for line in server.log().splitlines() if "(tcp:0)" in line],
            "the line of the port on every interface",
        )
        port = int(listening[0].split("measuring listening on 0.0.0.0:")[1].split()[0])
        with Connection(port) as connection:
            self.assertEqual(connection.ask(STATUS)["Status"], "OK")
