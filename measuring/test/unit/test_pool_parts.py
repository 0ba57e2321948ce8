"""
Tests for the plain parts of the pool's parent side, without a process: what a job printed kept to
a limit (``OutputLog``), how the end of a worker process is told (``describe_exit``), the
environment a worker gets (``worker_environment``), and which worker messages have the shape the
server uses (``malformed``).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from measuring.messages import SERVER_MARK
from measuring.server.pool.pool import worker_environment
from measuring.server.pool.process import OutputLog, describe_exit, malformed


class OutputLogTests(SynchronousTestCase):
    """What a job printed, kept to a limit: its beginning and its end."""

    def test_shortOutputIsKeptWhole(self) -> None:
        """Output within the limit comes back exactly as printed, across several writes."""
        log = OutputLog(limit=100)
        log.append(b"first line\n")
        log.append("second line \N{DEGREE SIGN}C\n".encode())
        self.assertEqual(log.text(), "first line\nsecond line \N{DEGREE SIGN}C\n")

    def test_longOutputKeepsHeadAndTail(self) -> None:
        """Output over the limit keeps its first and last halves and says how much was cut."""
        log = OutputLog(limit=10)
        log.append(b"0123456789")
        log.append(b"ABCDEFGHIJ")
        self.assertEqual(log.text(), "01234\n[... 10 bytes cut ...]\nFGHIJ")

    def test_nothingPrinted(self) -> None:
        """A job that printed nothing has an empty log."""
        self.assertEqual(OutputLog().text(), "")


class DescribeExitTests(SynchronousTestCase):
    """How the end of a worker process is told to a user."""

    def test_exitCode(self) -> None:
        """A process that exited says its exit code."""
        self.assertEqual(
            describe_exit(Failure(ProcessTerminated(exitCode=3))), "exited with code 3"
        )
        self.assertEqual(describe_exit(Failure(ProcessDone(0))), "exited with code 0")

    def test_signal(self) -> None:
        """A process killed by a signal says the signal's number and name."""
        self.assertEqual(
            describe_exit(Failure(ProcessTerminated(signal=11))),
            "was killed by signal 11 (SIGSEGV)",
        )

    def test_unknownSignal(self) -> None:
        """A signal number without a name is still told, as unknown."""
        self.assertEqual(
            describe_exit(Failure(ProcessTerminated(signal=99))),
            "was killed by signal 99 (unknown)",
        )


class WorkerEnvironmentTests(SynchronousTestCase):
    """The environment a worker process gets."""

    def test_onlyWhatPythonNeeds(self) -> None:
        """The server's own variables (secrets) are not passed on; TMPDIR is the worker's folder."""
        environ = {"PATH": "/bin", "MEASURING_TOKEN": "secret", "TZ": "UTC"}
        env = worker_environment(environ, "/w", "/srv/state")
        self.assertNotIn("MEASURING_TOKEN", env)
        self.assertNotIn("secret", env.values())
        self.assertEqual((env["PATH"], env["TMPDIR"], env["TZ"]), ("/bin", "/w", "UTC"))

    def test_serverMark(self) -> None:
        """Workers carry this server's mark in MEASURING_SERVER, not one the server inherited."""
        env = worker_environment({SERVER_MARK: "another"}, "/w", "/srv/state")
        self.assertEqual(env[SERVER_MARK], "/srv/state")


#: Messages of the shapes ``measuring.messages`` describes, as a worker sends them.
GOOD_MESSAGES: list[dict[str, Any]] = [
    {"Type": "Ready"},
    {"Type": "Progress", "Done": 0, "Total": 0},
    {"Type": "Progress", "Done": 120, "Total": 480},
    {"Type": "Error", "Error": {"Code": "JobFailed", "Message": "formula 'peak' raised KeyError"}},
    {"Type": "Done", "Results": {}},
    {
        "Type": "Done",
        "Results": {
            "peak": {"Kind": "Scalar", "Value": 41.5},
            "hourly": {"Kind": "Series", "File": "results/j/hourly.parquet", "Rows": 7},
            "stats": {"Kind": "DataFrame", "File": "results/j/stats.parquet", "Rows": 3},
        },
    },
]

#: Messages a formula could forge on the worker's reply pipe, and what is wrong with each.
BAD_MESSAGES: list[tuple[dict[str, Any], str]] = [
    ({"Type": "Done", "Results": {"x": 5}}, "a result 'x' that is not a formula's result"),
    ({"Type": "Done", "Results": {"x": {"Value": 5}}}, "a result 'x' that is not"),
    ({"Type": "Done", "Results": {"x": {"Kind": "Table"}}}, "a result 'x' that is not"),
    ({"Type": "Done", "Results": {"../x": {"Kind": "Scalar"}}}, "a result '../x' that is not"),
    ({"Type": "Done", "Results": {"x" * 100: 1}}, f"a result {'x' * 40!r} that is not"),
    ({"Type": "Done"}, "a Done message without Results"),
    ({"Type": "Done", "Results": [{"Kind": "Scalar"}]}, "a Done message without Results"),
    ({"Type": "Done", "Results": None}, "a Done message without Results"),
    ({"Type": "Progress", "Done": 1}, "a Progress message without whole Done and Total"),
    ({"Type": "Progress", "Done": "1", "Total": 2}, "a Progress message without whole"),
    ({"Type": "Progress", "Done": 1.0, "Total": 2}, "a Progress message without whole"),
    ({"Type": "Progress", "Done": True, "Total": 2}, "a Progress message without whole"),
    ({"Type": "Progress", "Done": -1, "Total": 2}, "a Progress message without whole"),
    ({"Type": "Error"}, "an Error message without a Code and a Message"),
    ({"Type": "Error", "Error": "boom"}, "an Error message without a Code and a Message"),
    ({"Type": "Error", "Error": {"Code": "JobFailed"}}, "an Error message without a Code"),
    ({"Type": "Error", "Error": {"Code": 3, "Message": "m"}}, "an Error message without"),
    ({"Type": "Job"}, "a message of unknown type 'Job'"),
    ({}, "a message of unknown type 'None'"),
    ({"Type": ["Done"]}, "a message of unknown type \"['Done']\""),
    ({"Type": "T" * 100}, f"a message of unknown type {'T' * 40!r}"),
]


class MalformedTests(SynchronousTestCase):
    """``malformed`` passes the messages a worker sends and names what is wrong with others."""

    def test_goodMessages(self) -> None:
        """Every kind of message a worker sends, in its documented shape, passes."""
        for message in GOOD_MESSAGES:
            self.assertIsNone(malformed(message), message)

    def test_badMessages(self) -> None:
        """A message of another shape is named for what is wrong, in at most a line."""
        for message, problem in BAD_MESSAGES:
            found = malformed(message)
            self.assertIsNotNone(found, message)
            assert found is not None
            self.assertTrue(found.startswith(problem), (message, found))
            self.assertLess(len(found), 120, found)
