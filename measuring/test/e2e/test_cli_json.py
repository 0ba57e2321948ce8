"""
``measuring-client`` for scripts and at submission: with ``--json`` every command prints the
server's answer lines as sent (errors included) and exits with the documented code; mistakes in a
Dask request (a misspelled formula, a CSV given as Base, a syntax error) are refused before any
job exists, exit code 2; the hint to read a failed job's log comes only when the log holds
something.
"""

from __future__ import annotations

import json
import os
from typing import Any

from measuring.client import Client
from measuring.test.e2e.test_cli import CliTestCase, cli
from measuring.test.support import BASE, JOB_ID, ROWS, dataset, write_formulas


def answers(done: Any) -> list[dict[str, Any]]:
    """Every line of a run's stdout, each parsed as one JSON answer of the server."""
    lines = done.stdout.splitlines()
    parsed = [json.loads(line) for line in lines]
    for line, answer in zip(lines, parsed, strict=True):
        assert "Header" in answer and ("Status" in answer or answer["Header"] == "Progress"), line
        assert "\n" not in line and line == line.strip(), line
    return parsed


class JsonTests(CliTestCase):
    """``--json``: each command's answer lines on stdout, as sent; exit codes as documented."""

    def json(self, address: str, *arguments: str, code: int = 0) -> list[dict[str, Any]]:
        """The answers ``measuring-client --json arguments`` printed; it exited ``code``."""
        done = cli("--json", *arguments, cwd=self.folder, MEASURING_SERVER=address)
        self.assertEqual(done.returncode, code, done.stdout + done.stderr)
        self.assertNotIn("Traceback", done.stderr)
        return answers(done)

    def test_everyCommand(self) -> None:
        """status, info, run, submit, job *, jobs, result, plot: answers parse, codes hold."""
        server = self.start()
        address = f"127.0.0.1:{server.port}"
        folder = server.folder

        def one(*arguments: str, code: int = 0) -> dict[str, Any]:
            [answer] = self.json(address, *arguments, code=code)
            return answer

        self.assertEqual(one("status")["Response"]["Pid"], server.process.pid)
        self.assertEqual(one("info", "all-statistic")["Request"], "All statistic")

        ran = self.json(address, "run", folder, BASE, "work.py", "-f", "count")
        self.assertEqual(ran[0]["Status"], "Accepted")
        self.assertEqual(ran[-1]["Response"]["Results"]["count"], {"Kind": "Scalar", "Value": ROWS})
        job = ran[-1]["Job"]
        failed = self.json(address, "run", folder, BASE, "bad.py", "-f", "fail", code=1)
        self.assertEqual(failed[-1]["Error"]["Code"], "JobFailed")
        self.assertIn("about to divide", failed[-1]["Log"])

        submitted = one("submit", folder, BASE, "work.py", "-f", "mean_by_sensor")
        self.assertEqual(submitted["Status"], "Accepted")
        waited = one("job", "wait", submitted["Job"])
        self.assertEqual((waited["Request"], waited["Response"]["State"]), ("Status", "done"))
        self.assertEqual(one("job", "status", job)["Response"]["State"], "done")
        self.assertEqual(one("job", "log", job)["Response"], {"Log": ""})
        self.assertEqual(one("job", "cancel", job)["Response"], {"State": "done"})
        listed = one("jobs")["Response"]["Jobs"]
        self.assertEqual(len(listed), 3, listed)
        self.assertEqual(listed[-1]["Base"], os.path.join(folder, BASE))

        page = one("result", job, "count")
        self.assertEqual((page["Request"], page["Response"]["Value"]), ("Result", ROWS))
        self.assertEqual(one("result", submitted["Job"], "mean_by_sensor")["Response"]["Rows"], 3)
        drawn = self.json(address, "plot", submitted["Job"], "mean_by_sensor", "-o", "m.png")
        self.assertEqual([answer["Request"] for answer in drawn], ["Status"])
        self.assertTrue(os.path.exists(os.path.join(folder, "m.png")))

        # Errors: the error answer on stdout, and its exit code.
        for arguments, code, error in [
            (("job", "status", "20200101-000000-abcdef"), 2, "NotFound"),
            (("result", job, "nothing"), 2, "NotFound"),
            (("run", "/etc", BASE, "work.py"), 2, "Forbidden"),
            (("submit", folder, BASE, "work.py", "-f", "nope"), 2, "NotFound"),
            (("info", "status"), 0, None),
        ]:
            answer = one(*arguments, code=code)
            self.assertEqual((answer.get("Error") or {}).get("Code"), error, answer)

    def test_demo(self) -> None:
        """``--json demo`` prints its run's answer lines on stdout, and the rest on stderr."""
        folder = os.path.realpath(self.mktemp())
        done = cli("--json", "demo", "--days", "1", "--folder", folder)
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
        lines = answers(done)
        self.assertEqual(lines[0]["Status"], "Accepted")
        self.assertEqual(lines[-1]["Response"]["Results"]["alarm_count"]["Kind"], "Scalar")
        self.assertIn("Server stopped.", done.stderr)


class SubmissionTests(CliTestCase):
    """Mistakes are caught when the job is submitted, in the server: exit 2 and no job."""

    def test_refusedAtSubmission(self) -> None:
        """A misspelled formula, a CSV Base and a syntax error are refused; no job is created."""
        server = self.start()
        address = f"127.0.0.1:{server.port}"
        folder = server.folder
        dataset(server).head(50).to_csv(os.path.join(folder, "time_series.csv"), index=False)
        write_formulas(folder, "def peak(df):\n    return df.value.max(\n", "broken.py")
        for arguments, start in [
            (
                ("-f", "hourly_maen"),
                "error: NotFound: work.py has no formula named 'hourly_maen' "
                "(its formulas: mean_by_sensor, stats, readings, hourly, peak, count)",
            ),
            (
                ("--output", "csv"),
                "error: BadRequest: time_series.csv is not a Parquet file (it looks like CSV text)",
            ),
            ((), "error: BadRequest: broken.py line 2: SyntaxError: "),
        ]:
            base = "time_series.csv" if "--output" in arguments else BASE
            file = "broken.py" if not arguments else "work.py"
            for command in ("submit", "run"):
                done = cli(command, folder, base, file, *arguments, MEASURING_SERVER=address)
                self.assertFailed(done, 2, start)
                self.assertEqual(done.stdout, "")
        with Client("127.0.0.1", server.port) as client:
            self.assertEqual(client.jobs(), [])

    def test_logHint(self) -> None:
        """A failed job points at its log only when the log holds something."""
        server = self.start()
        address = f"127.0.0.1:{server.port}"
        write_formulas(server.folder, "def odd(df):\n    return object()\n", "quiet.py")
        quiet = cli("run", server.folder, BASE, "quiet.py", MEASURING_SERVER=address)
        line = self.assertFailed(quiet, 1, "error: JobFailed: ")
        self.assertIn("odd", line)
        loud = cli("run", server.folder, BASE, "bad.py", "-f", "fail", MEASURING_SERVER=address)
        self.assertFailed(loud, 1, "error: JobFailed: formula 'fail' raised", hint=True)
        [job] = JOB_ID.findall(loud.stderr)
        status = cli("job", "status", job, MEASURING_SERVER=address)
        self.assertEqual(status.returncode, 1, status.stderr)
        self.assertIn(
            "  error      JobFailed: formula 'fail' raised ZeroDivisionError", status.stdout
        )
