"""
Tests for the plain parts of the pool's parent side, without a process: what a job printed kept to
a limit (``OutputLog``), how the end of a worker process is told (``describe_exit``), and the
environment a worker gets (``worker_environment``).
"""

from __future__ import annotations

from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from measuring.child import OutputLog, describe_exit
from measuring.messages import SERVER_MARK
from measuring.pool import worker_environment


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
