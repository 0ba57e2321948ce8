"""
End to end: the real ``twistd -n measuring`` in a subprocess, spoken to over a socket.

Each test starts its own server on a free loopback port, in its own folder, and stops it with
SIGTERM as systemd would; every test also checks that the server left no process behind.
"""

from __future__ import annotations

import os
import select
import subprocess
import time
from typing import Any

import pandas as pd
from twisted.trial.unittest import SynchronousTestCase

from measuring.test.support import FORMULAS, Server, ServerTestCase, run_twistd

INFO = ("Status", "Dask process", "All process", "All statistic")

CRASHING = """
import os


def divide(df):
    return len(df.columns) / 0


def leave(df):
    os._exit(3)


def segfault(df):
    import ctypes

    return ctypes.string_at(0)


def spin(df):
    while True:
        pass


def fine(df):
    return df.value.count()
"""


class IntegrationTestCase(ServerTestCase):
    """The sample data, work.py and crash.py (``CRASHING``); ``dask`` runs work.py unless told."""

    formulas = {"work.py": FORMULAS, "crash.py": CRASHING}


class OriginalRequestsTests(IntegrationTestCase):
    """The requests of the original description, answered by the real server."""

    def test_infoRequests(self) -> None:
        """The four Info requests answer OK with the server's own pid, jobs and machine figures."""
        server = self.start()
        server.wait_until_ready()
        answers = {name: server.ask({"Header": "Info", "Request": name}) for name in INFO}
        for name, answer in answers.items():
            self.assertEqual(
                (answer["Header"], answer["Request"], answer["Status"]), ("Info", name, "OK")
            )
        self.assertEqual(answers["Status"]["Response"]["Pid"], server.process.pid)
        self.assertEqual(answers["Status"]["Response"]["State"], "running")
        self.assertEqual(answers["Dask process"]["Response"]["Count"], 0)
        service = answers["All process"]["Response"]["Service"]
        self.assertEqual(service["Pid"], server.process.pid)
        roles = sorted(process["Role"] for process in service["Tree"])
        self.assertEqual(roles, ["server", "template"])
        statistic = answers["All statistic"]["Response"]
        self.assertEqual(list(statistic["Disk"]), [self.folder])
        self.assertGreater(statistic["Memory"]["Total"], 0)
        # Every request so far was an Info request: the four above and the readiness polls.
        self.assertGreaterEqual(statistic["Requests"]["Info"], 4)
        self.assertEqual(statistic["Requests"]["Info"], statistic["Requests"]["Total"])

    def test_daskRequest(self) -> None:
        """The original Dask request writes result files holding the numbers pandas computes."""
        server = self.start()
        answer = server.ask(
            '{"Header":"Dask",\n'
            f' "Request":{{"Directory":"{self.folder}",\n'
            '            "Base":"time_series.parquet",\n'
            '            "File":"work.py"}}'
        )
        self.assertEqual(answer["Status"], "OK", answer)
        results = answer["Response"]["Results"]
        self.assertEqual(list(results), ["mean_by_sensor", "peak", "hourly", "count"])

        expected = self.frame.groupby("sensor").value.mean()
        means = pd.read_parquet(os.path.join(self.folder, results["mean_by_sensor"]["File"]))
        pd.testing.assert_series_equal(
            means["value"], expected, check_names=False, check_index_type=False
        )
        self.assertEqual(results["mean_by_sensor"]["Rows"], len(expected))

        hourly = pd.read_parquet(os.path.join(self.folder, results["hourly"]["File"]))
        expected_hourly = self.frame.set_index("time").value.resample("1h").mean()
        self.assertEqual(hourly["value"].tolist(), expected_hourly.tolist())

        self.assertEqual(results["peak"], {"Kind": "Scalar", "Value": self.frame.value.max()})
        self.assertEqual(results["count"], {"Kind": "Scalar", "Value": len(self.frame)})
        job_folder = os.path.join(self.folder, "results")
        self.assertEqual(os.listdir(job_folder), [answer["Job"]])

    def test_statusWhileFormulaBusy(self) -> None:
        """Status is answered at once while a CPU-bound formula runs, before the job's answer."""
        server = self.start()
        server.wait_until_ready()
        with server.connect() as busy:
            busy.send({**self.dask("spin", File="crash.py"), "Id": "job"})
            deadline = time.monotonic() + 60
            processes: list[Any] = []
            while not processes and time.monotonic() < deadline:
                answer = busy.ask({"Header": "Info", "Request": "Dask process", "Id": "info"})
                self.assertEqual(answer["Id"], "info")
                processes = answer["Response"]["Processes"]
            self.assertEqual(len(processes), 1)
            with server.connect() as other:
                status = other.ask({"Header": "Info", "Request": "Status"})
            self.assertEqual(status["Response"]["Jobs"], {"Running": 1, "Queued": 0})
            readable, _, _ = select.select([busy.socket], [], [], 0)
            self.assertEqual(readable, [], "the looping job answered before it was stopped")


class FailureTests(IntegrationTestCase):
    """Formulas that fail fail their own job; the server answers and carries on."""

    def test_crashingFormulas(self) -> None:
        """Raising, os._exit and a segfault each answer JobFailed, then a good job still runs."""
        server = self.start()
        expected = {
            "divide": "formula 'divide' raised ZeroDivisionError",
            "leave": "exited with code 3",
            "segfault": "was killed by signal 11 (SIGSEGV)",
        }
        for name, words in expected.items():
            answer = server.ask(self.dask(name, File="crash.py"))
            self.assertEqual(answer["Error"]["Code"], "JobFailed", answer)
            self.assertIn(words, answer["Error"]["Message"])
            self.assertIn("Job", answer)
        answer = server.ask(self.dask("fine", File="crash.py"))
        self.assertEqual(answer["Response"]["Results"]["fine"]["Value"], self.frame.value.count())
        self.assertFalse(os.path.exists(os.path.join(self.folder, "results")))

    def test_jobTimeout(self) -> None:
        """A formula that loops forever is stopped at --job-timeout with Code Timeout."""
        server = self.start("--job-timeout", "1")
        answer = server.ask(self.dask("spin", File="crash.py"))
        self.assertEqual(answer["Error"]["Code"], "Timeout", answer)
        self.assertIn("limit of 1 s", answer["Error"]["Message"])
        processes = server.ask({"Header": "Info", "Request": "Dask process"})
        self.assertEqual(processes["Response"]["Count"], 0)

    def test_badRequests(self) -> None:
        """Bad requests get their Code on a connection that stays usable; TooLarge closes it."""
        server = self.start("--max-request-bytes", "2KiB")
        with server.connect() as connection:
            cases: list[tuple[Any, str, str]] = [
                ("{not json", "BadRequest", "not valid JSON"),
                ('{"Header":"Nope"}', "BadRequest", "unknown Header 'Nope'"),
                (self.dask(Base="../../etc/passwd"), "Forbidden", "leads outside"),
                (self.dask(File="missing.py"), "NotFound", "'missing.py' was not found"),
                ({"Header": "Dask", "Request": {"Base": "x"}}, "BadRequest", 'no "Directory"'),
            ]
            for request, code, words in cases:
                answer = connection.ask(request)
                self.assertEqual(answer["Error"]["Code"], code, answer)
                self.assertIn(words, answer["Error"]["Message"])
            status = connection.ask({"Header": "Info", "Request": "Status"})
            self.assertEqual(status["Status"], "OK")
            answer = connection.ask("x" * 4096)
            self.assertEqual(answer["Error"]["Code"], "TooLarge")
            self.assertRaises(ConnectionError, connection.receive)


class StartTests(SynchronousTestCase):
    """Bad settings stop the start with one clear line and exit code 1."""

    def run_twistd(self, *arguments: str) -> subprocess.CompletedProcess[str]:
        folder = self.mktemp()
        os.makedirs(folder)
        return run_twistd(folder, *arguments)

    def test_badOption(self) -> None:
        """A bad value is named on one line, with no traceback."""
        result = self.run_twistd("--workers", "-1")
        self.assertEqual(result.returncode, 1)
        self.assertIn("--workers must be a whole number of at least 1", result.stdout)
        self.assertIn("not '-1'", result.stdout)
        self.assertNotIn("Traceback", result.stdout + result.stderr)

    def test_portInUse(self) -> None:
        """A port in use stops the start with one line naming it."""
        import socket

        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            result = self.run_twistd("--port", f"tcp:{port}:interface=127.0.0.1")
        self.assertEqual(result.returncode, 1)
        self.assertIn(f"cannot listen on tcp:{port}:interface=127.0.0.1", result.stdout)
        self.assertIn("Address already in use", result.stdout)
        self.assertNotIn("Traceback", result.stdout + result.stderr)

    def test_configFile(self) -> None:
        """Settings come from the --config file, and a flag wins over it."""
        folder = os.path.realpath(self.mktemp())
        os.makedirs(folder)
        config = os.path.join(folder, "measuring.toml")
        with open(config, "w") as f:
            f.write(f'workers = 3\ndata-root = ["{folder}"]\nmax-request-bytes = "4KiB"\n')
        server = Server(folder, "--config", config, "--workers", "1")
        self.addCleanup(server.stop)
        status = server.ask({"Header": "Info", "Request": "Status"})["Response"]
        self.assertEqual(status["Workers"]["Size"], 1)
        self.assertEqual(status["DataRoots"], [folder])

    def test_unknownConfigKey(self) -> None:
        """An unknown key in the --config file is named, with the known ones."""
        config = os.path.realpath(self.mktemp())
        with open(config, "w") as f:
            f.write("wokers = 3\n")
        result = self.run_twistd("--config", config)
        self.assertEqual(result.returncode, 1)
        self.assertIn("unknown setting 'wokers'", result.stdout)
