"""
``measuring-client``, run as a user runs it (``python -m measuring.client.cli`` in a subprocess,
stdout not a terminal) against the real server: what it prints, its exit codes, its one-line errors,
``--json``, and the ``MEASURING_SERVER`` / ``MEASURING_TOKEN_FILE`` defaults.

Each test that needs a server starts its own (``support.ClientTestCase``, shared with
``test_client_server``); cleanup checks that it stopped cleanly and left no process behind.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import subprocess
import sys
from typing import Any

import pandas as pd

import measuring
from measuring.client import Client
from measuring.test.support import (
    BASE,
    JOB_ID,
    PATIENCE,
    ROWS,
    TOKEN,
    ClientTestCase,
    closed_port,
    dataset,
    environment,
    naming,
    write_token_file,
)

PNG = b"\x89PNG\r\n\x1a\n"


def command(*arguments: str) -> list[str]:
    """The command line running ``measuring-client`` with ``arguments``."""
    return [sys.executable, "-m", "measuring.client.cli", *arguments]


def client_environment(**variables: str) -> dict[str, str]:
    """The environment of a client subprocess: ours, less any MEASURING_ default, plus these."""
    env = {k: v for k, v in environment().items() if not k.startswith("MEASURING_")}
    return {**env, **variables}


def cli(*arguments: str, cwd: str | None = None, **variables: str) -> Any:
    """Run ``measuring-client arguments`` to its end; its CompletedProcess (text)."""
    return subprocess.run(
        command(*arguments),
        env=client_environment(**variables),
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=PATIENCE,
    )


class CliTestCase(ClientTestCase):
    """
    The client tests' folder and servers on it (``support.ClientTestCase``), and assertions on
    what one run of ``measuring-client`` printed and how it exited.
    """

    def assertSucceeded(self, done: Any) -> str:
        """It exited 0 and printed nothing on stderr; returns its stdout."""
        self.assertEqual((done.returncode, done.stderr), (0, ""), done.stdout)
        stdout: str = done.stdout
        return stdout

    def assertFailed(self, done: Any, code: int, start: str, hint: bool = False) -> str:
        """
        It exited ``code`` with one line on stderr starting ``start`` and no traceback, and with
        ``hint`` a second line saying how to see the job's log; returns the first line.
        """
        self.assertEqual(done.returncode, code, done.stdout + done.stderr)
        self.assertNotIn("Traceback", done.stderr)
        lines = done.stderr.splitlines()
        self.assertEqual(len(lines), 2 if hint else 1, done.stderr)
        self.assertTrue(lines[0].startswith(start), done.stderr)
        if hint:
            self.assertRegex(
                lines[1], rf"^what it printed: measuring-client job log {JOB_ID.pattern}$"
            )
        return str(lines[0])


class RunTests(CliTestCase):
    """``status``, ``info`` and ``run`` print what the server answers, for people and scripts."""

    def test_statusInfoRun(self) -> None:
        """Status reads as text, info and --json as JSON, and run prints a table per result."""
        # --server wins over MEASURING_SERVER, which is used when --server is not given.
        server = self.start()
        address = f"127.0.0.1:{server.port}"
        data = dataset(server)

        status = self.assertSucceeded(cli("status", MEASURING_SERVER=address))
        lines = status.splitlines()
        self.assertEqual(
            lines[0][: lines[0].index(", up ")],
            f"measuring {measuring.__version__} at {address}: running",
        )
        self.assertEqual(lines[1], "jobs: 0 running, 0 queued")
        nowhere = f"127.0.0.1:{closed_port()}"
        scripted = cli("--server", address, "--json", "status", MEASURING_SERVER=nowhere)
        answer = json.loads(self.assertSucceeded(scripted))["Response"]
        self.assertEqual((answer["State"], answer["Pid"]), ("running", server.process.pid))
        for name in ("All statistic", "all-statistic", "ALL_STATISTIC"):
            statistic = json.loads(
                self.assertSucceeded(cli("info", name, MEASURING_SERVER=address))
            )
            self.assertEqual(list(statistic["Disk"]), [server.folder])

        run = ("run", server.folder, BASE, "work.py")
        ran = self.assertSucceeded(cli("--server", address, *run))
        [job] = JOB_ID.findall(ran.splitlines()[0])
        self.assertTrue(ran.startswith(f"job {job}: done in "), ran)
        summary = [line.split() for line in ran.split("\n\n")[0].splitlines()[1:]]
        self.assertEqual(summary[0], ["result", "kind", "rows", "file", "or", "value"])
        self.assertEqual(
            summary[1:],
            [
                ["mean_by_sensor", "Series", "3", f"results/{job}/mean_by_sensor.parquet"],
                ["stats", "DataFrame", "3", f"results/{job}/stats.parquet"],
                ["readings", "DataFrame", str(ROWS), f"results/{job}/readings.parquet"],
                ["hourly", "Series", "7", f"results/{job}/hourly.parquet"],
                ["peak", "Scalar", f"{data.value.max():.6g}"],
                ["count", "Scalar", str(ROWS)],
            ],
        )
        preview = ran.split("\nmean_by_sensor (first rows of 3):\n")[1].split("\n\n")[0]
        self.assertEqual(preview.splitlines()[0].split(), ["sensor", "value"])
        means = data.groupby("sensor").value.mean()
        self.assertEqual(
            {line.split()[0]: line.split()[1] for line in preview.splitlines()[1:]},
            {sensor: f"{mean:.6g}" for sensor, mean in means.items()},
        )

        functions = ("-f", "count", "-f", "mean_by_sensor")
        options = ("--output", "csv", "--timeout", "30")
        chosen = self.assertSucceeded(cli("--server", address, *run, *functions, *options))
        names = [line.split()[0] for line in chosen.split("\n\n")[0].splitlines()[2:]]
        self.assertEqual(names, ["count", "mean_by_sensor"])
        self.assertRegex(chosen, r"results/\S+/mean_by_sensor\.csv")

        scripted_run = cli("--json", *run, "-f", "peak", "-f", "hourly", MEASURING_SERVER=address)
        answered = [json.loads(line) for line in self.assertSucceeded(scripted_run).splitlines()]
        self.assertEqual(answered[0]["Status"], "Accepted")
        self.assertEqual({line["Header"] for line in answered[1:-1]}, {"Progress"})
        self.assertEqual((answered[-1]["Header"], answered[-1]["Status"]), ("Dask", "OK"))
        scripted = answered[-1]["Response"]
        self.assertEqual(list(scripted["Results"]), ["peak", "hourly"])
        self.assertEqual(scripted["Results"]["peak"]["Value"], data.value.max())
        hourly = scripted["Results"]["hourly"]["File"]
        self.assertTrue(os.path.exists(os.path.join(server.folder, hourly)), hourly)


class JobCommandTests(CliTestCase):
    """``submit``, ``job``, ``jobs``, ``result`` and ``plot`` follow and read jobs by their id."""

    def test_followAndCancel(self) -> None:
        """A submitted job shows its state and log, lists under its state, and cancels."""
        server = self.start()
        address = f"127.0.0.1:{server.port}"

        def client(*arguments: str) -> str:
            return self.assertSucceeded(cli(*arguments, MEASURING_SERVER=address))

        job = client("submit", server.folder, BASE, "bad.py", "-f", "spin").strip()
        self.assertRegex(job, f"^{JOB_ID.pattern}$")
        self.wait_for(lambda: client("job", "log", job) == "spinning\n", "the job's log")
        status = client("job", "status", job)
        self.assertTrue(status.startswith(f"job {job}: running (attempts 1)\n"), status)
        self.assertIn(f"  file       {server.folder}/bad.py\n", status)
        self.assertIn(job, client("jobs", "--state", "running"))

        self.assertEqual(client("job", "cancel", job), "cancelled\n")
        # job status exits as job wait would: 1 for a cancelled job.
        status = cli("job", "status", job, MEASURING_SERVER=address)
        self.assertEqual((status.returncode, status.stderr), (1, ""))
        self.assertTrue(status.stdout.startswith(f"job {job}: cancelled"), status.stdout)
        self.assertIn(f"  base       {server.folder}/{BASE}\n", status.stdout)
        self.assertIn("  error      Cancelled: the job was cancelled\n", status.stdout)
        scripted = cli("--json", "job", "status", job, MEASURING_SERVER=address)
        self.assertEqual(scripted.returncode, 1)
        answer = json.loads(scripted.stdout)["Response"]
        self.assertEqual((answer["State"], answer["Error"]["Code"]), ("cancelled", "Cancelled"))
        cancelled = json.loads(client("--json", "job", "cancel", job))
        self.assertEqual(cancelled["Response"]["State"], "cancelled")

        listed = client("jobs", "--state", "cancelled").splitlines()
        self.assertEqual(
            listed[0].split(), ["Job", "State", "Submitted", "Directory", "Base", "File", "Error"]
        )
        self.assertEqual(listed[1].split()[:2], [job, "cancelled"])
        self.assertEqual(
            listed[1].split()[4:], [BASE, "bad.py", "Cancelled:", "the", "job", "was", "cancelled"]
        )
        self.assertEqual(len(listed), 2, listed)
        done = json.loads(client("--json", "jobs", "--state", "done"))
        self.assertEqual((done["Request"], done["Response"]), ("List", {"Jobs": []}))

    def test_wait(self) -> None:
        """``job wait`` waits for a submitted job to end and prints its results, exiting 0."""
        server = self.start()
        address = f"127.0.0.1:{server.port}"
        submitted = cli("submit", server.folder, BASE, "slow.py", MEASURING_SERVER=address)
        job = self.assertSucceeded(submitted).strip()
        with Client("127.0.0.1", server.port) as api:
            self.assertIn(api.job(job).status()["State"], ("queued", "running"))
        waited = self.assertSucceeded(cli("job", "wait", job, MEASURING_SERVER=address))
        self.assertTrue(waited.startswith(f"job {job}: done in "), waited)
        rows = [line.split() for line in waited.splitlines()[1:3]]
        self.assertEqual(rows[1], ["slow", "Scalar", str(dataset(server).value.count())])

    def test_resultAndPlot(self) -> None:
        """``result`` prints a page of rows as a table, CSV or JSON; ``plot`` writes a PNG."""
        server = self.start()
        address = f"127.0.0.1:{server.port}"
        data = dataset(server)
        with Client("127.0.0.1", server.port) as api:
            job = api.submit(server.folder, BASE, "work.py").wait(timeout=PATIENCE).id

        def client(*arguments: str) -> str:
            return self.assertSucceeded(
                cli(*arguments, cwd=server.folder, MEASURING_SERVER=address)
            )

        means = client("result", job, "mean_by_sensor").splitlines()
        self.assertEqual(means[0].split(), ["sensor", "value"])
        expected = data.groupby("sensor").value.mean()
        self.assertEqual(
            {line.split()[0]: float(line.split()[1]) for line in means[1:4]},
            {sensor: float(f"{mean:.6g}") for sensor, mean in expected.items()},
        )
        self.assertEqual(means[4], "(3 of 3 rows from 0)")

        table = client("result", job, "readings", "--limit", "3", "--csv")
        rows = list(csv.reader(io.StringIO(table)))
        first = data[["sensor", "value"]].head(3).itertuples(index=False)
        expected_rows = [
            [sensor, "" if math.isnan(value) else repr(value)] for sensor, value in first
        ]
        self.assertEqual(rows, [["sensor", "value"], *expected_rows])
        page = json.loads(
            client("--json", "result", job, "readings", "--limit", "5", "--offset", "10")
        )["Response"]
        self.assertEqual((page["Rows"], page["Offset"], len(page["Records"])), (ROWS, 10, 5))
        self.assertEqual(page["Records"][0]["sensor"], data.sensor[10])
        self.assertEqual(client("result", job, "count"), f"{ROWS}\n")

        for name in ("hourly", "mean_by_sensor"):
            image = os.path.join(server.folder, f"{name}.png")
            self.assertEqual(client("plot", job, name, "-o", image), f"wrote {image}\n")
            with open(image, "rb") as f:
                self.assertEqual(f.read(len(PNG)), PNG)

        # Runtime errors have the one format, never click's usage box.
        for wrong, message in [
            (("result", job, "nothing"), f"error: NotFound: job {job} has no result 'nothing'"),
            (("plot", job, "nothing"), f"error: NotFound: job {job} has no result 'nothing'"),
            (("plot", job, "count"), f"error: count is a single value ({ROWS}); there is"),
        ]:
            self.assertFailed(cli(*wrong, MEASURING_SERVER=address), 2, message)


class ExitCodeTests(CliTestCase):
    """Exit codes tell a script what went wrong: 1 the job, 2 the command, 3 the server."""

    def test_jobEnds(self) -> None:
        """A failed, timed out or cancelled job exits 1 with the server's words on one line."""
        server = self.start()
        address = f"127.0.0.1:{server.port}"
        run = ("run", server.folder, BASE, "bad.py")

        failed = cli(*run, "-f", "fail", MEASURING_SERVER=address)
        self.assertFailed(
            failed, 1, "error: JobFailed: formula 'fail' raised ZeroDivisionError", hint=True
        )
        hint = failed.stderr.splitlines()[1].removeprefix("what it printed: measuring-client ")
        printed = self.assertSucceeded(cli(*hint.split(), MEASURING_SERVER=address))
        self.assertIn("about to divide\n", printed)
        debug = cli("--debug", *run, "-f", "fail", MEASURING_SERVER=address)
        self.assertEqual(debug.returncode, 1)
        self.assertIn("Traceback", debug.stderr)
        self.assertIn("error: JobFailed: formula 'fail'", debug.stderr)
        # The hint comes when the log holds something: here, when "spin" started in time.
        late = cli(*run, "-f", "spin", "--timeout", "1", MEASURING_SERVER=address)
        [job] = JOB_ID.findall(late.stderr) or [None]
        with Client("127.0.0.1", server.port) as api:
            last = api.jobs(limit=1)[0]["Job"]
            printed_before = bool(api.job(last).log().strip())
        self.assertEqual(job, last if printed_before else None)
        self.assertFailed(
            late, 1, "error: Timeout: the job ran longer than its limit of 1 s", printed_before
        )

        waiting = subprocess.Popen(
            command("--server", address, *run, "-f", "spin"),
            env=client_environment(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.addCleanup(_end, waiting)
        with Client("127.0.0.1", server.port) as api:
            [job] = self.wait_for(lambda: api.jobs(state="running"), "the job to run")
            self.assertEqual(api.job(job["Job"]).cancel(), "cancelled")
        stdout, stderr = waiting.communicate(timeout=PATIENCE)
        self.assertFailed(
            subprocess.CompletedProcess([], waiting.returncode, stdout, stderr),
            1,
            "error: Cancelled: the job was cancelled",
        )

    def test_usage(self) -> None:
        """An unknown option, a path outside the data roots or one that is missing exits 2."""
        server = self.start()
        address = f"127.0.0.1:{server.port}"
        unknown = cli("--server", address, "run", server.folder, BASE, "work.py", "--bogus")
        self.assertEqual(unknown.returncode, 2, unknown.stderr)
        self.assertIn("No such option '--bogus'", unknown.stderr)
        self.assertNotIn("Traceback", unknown.stderr)

        forbidden = cli("run", "/etc", BASE, "work.py", MEASURING_SERVER=address)
        self.assertIn(
            "outside the data roots", self.assertFailed(forbidden, 2, "error: Forbidden:")
        )
        missing = cli("run", server.folder, "nope.parquet", "work.py", MEASURING_SERVER=address)
        self.assertIn("'nope.parquet'", self.assertFailed(missing, 2, "error: NotFound:"))
        formula = cli("run", server.folder, BASE, "work.py", "-f", "nope", MEASURING_SERVER=address)
        self.assertIn("'nope'", self.assertFailed(formula, 2, "error: NotFound:"))
        job = cli("job", "status", "20200101-000000-abcdef", MEASURING_SERVER=address)
        self.assertFailed(job, 2, "error: NotFound: there is no job '20200101-000000-abcdef'")

    def test_unreachable(self) -> None:
        """A closed port, from --server or MEASURING_SERVER, exits 3 on one line."""
        address = f"127.0.0.1:{closed_port()}"
        for done in (cli("--server", address, "status"), cli("jobs", MEASURING_SERVER=address)):
            self.assertFailed(done, 3, f"error: cannot reach the server at {address}")
        bad = cli("--server", "127.0.0.1:http", "status")
        self.assertEqual(bad.returncode, 2, bad.stderr)
        self.assertIn("'127.0.0.1:http' is not HOST:PORT", bad.stderr)

    def test_token(self) -> None:
        """The token file comes from MEASURING_TOKEN_FILE; none, or a wrong one, exits 3."""
        folder = os.path.realpath(self.mktemp())
        os.makedirs(os.path.join(folder, "wrong"))
        tokens = write_token_file(folder)
        wrong = write_token_file(os.path.join(folder, "wrong"), "not-the-token-but-long-enough")
        server = self.start("--token-file", tokens)
        address = f"127.0.0.1:{server.port}"

        def client(*arguments: str, **variables: str) -> Any:
            return cli(*arguments, MEASURING_SERVER=address, **variables)

        status = client("status", MEASURING_TOKEN_FILE=tokens)
        self.assertIn(": running", self.assertSucceeded(status))
        count = ("--json", "run", server.folder, BASE, "work.py", "-f", "count")
        ran = self.assertSucceeded(client(*count, MEASURING_TOKEN_FILE=tokens)).splitlines()
        self.assertEqual(json.loads(ran[-1])["Response"]["Results"]["count"]["Value"], ROWS)
        for done in (
            client("status"),
            client("status", MEASURING_TOKEN_FILE=wrong),
            client("--token-file", wrong, "status", MEASURING_TOKEN_FILE=tokens),
        ):
            self.assertFailed(done, 3, "error: Unauthorized:")
        self.assertNotIn(TOKEN, server.log())
        missing = client("--token-file", os.path.join(folder, "nowhere"), "status")
        self.assertEqual(missing.returncode, 2, missing.stderr)
        self.assertIn("cannot read --token-file", missing.stderr)

    def test_serversTokenFile(self) -> None:
        """The server's own token file, with a comment and a second token, serves the client too."""
        folder = os.path.realpath(self.mktemp())
        os.makedirs(folder)
        rotated = "the-next-token-being-rotated-in"
        tokens = write_token_file(folder, "# measuring tokens, one per line", "", TOKEN, rotated)
        server = self.start("--token-file", tokens)
        address = f"127.0.0.1:{server.port}"
        status = cli("status", MEASURING_SERVER=address, MEASURING_TOKEN_FILE=tokens)
        self.assertIn(": running", self.assertSucceeded(status))


class DemoTests(CliTestCase):
    """``measuring-client demo`` runs the product's main job end to end and cleans up."""

    def test_demo(self) -> None:
        """It prints results that match the sample data and leaves no process running."""
        folder = os.path.realpath(self.mktemp())
        done = cli("demo", "--days", "1", "--folder", folder)
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
        data = pd.read_parquet(os.path.join(folder, "time_series.parquet"))
        self.assertEqual(len(data), 5 * 86_400)
        self.assertIn(f"\npeak: {float(data.value.max())!r}\n", done.stdout)
        self.assertIn(f"\nalarm_count: {(data.value > 31.0).sum()}\n", done.stdout)
        self.assertIn("Server stopped.", done.stdout)
        with open(os.path.join(folder, "server.log")) as f:
            [address] = re.findall(r"measuring listening on (\S+) ", f.read())
        self.assertIn(f"\nListening on {address}\n", done.stdout)
        [job] = os.listdir(os.path.join(folder, "results"))
        self.assertIn(f"Job {job}: done in ", done.stdout)
        self.assertEqual(naming(folder), [], "the demo left its server or workers running")


def _end(process: subprocess.Popen[str]) -> None:
    """End a client subprocess a failed test left running."""
    if process.poll() is None:
        process.kill()
    process.communicate()
