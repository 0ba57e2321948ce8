"""
``measuring.client`` without a server: the addresses a user types, an error class for each Code of
the protocol, an import that stays light, and a server that cannot be reached.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

from measuring.client import (
    Bar,
    Cancelled,
    Client,
    ClientError,
    JobError,
    JobFailed,
    _follow,
    error_from,
    formulas,
    parse_address,
)
from measuring.test.support import PATIENCE, closed_port, environment
from measuring.wire import CODES


class AddressTests(SynchronousTestCase):
    """``parse_address`` and ``Client.from_address`` read the forms a user types."""

    def test_forms(self) -> None:
        """host:port, host, :port and [v6]:port give (host, port), 127.0.0.1 and 8765 by default."""
        self.assertEqual(parse_address("example.org:9000"), ("example.org", 9000))
        self.assertEqual(parse_address("example.org"), ("example.org", 8765))
        self.assertEqual(parse_address(":9000"), ("127.0.0.1", 9000))
        self.assertEqual(parse_address(" [::1]:9000 "), ("::1", 9000))
        self.assertEqual(parse_address("[::1]"), ("::1", 8765))

    def test_notAnAddress(self) -> None:
        """A port that is not a number is a ValueError naming what was given."""
        error = self.assertRaises(ValueError, parse_address, "example.org:http")
        self.assertIn("'example.org:http'", str(error))

    def test_fromAddress(self) -> None:
        """``Client.from_address`` connects nowhere yet and keeps the host, port and options."""
        client = Client.from_address("10.1.2.3:9000", timeout=5.0)
        self.assertEqual((client.host, client.port, client.timeout), ("10.1.2.3", 9000, 5.0))


class ErrorTests(SynchronousTestCase):
    """Each Code of the protocol is a ``JobError`` subclass of that name."""

    def test_errorFrom(self) -> None:
        """An error answer becomes its Code's class, with the code, message, job and log."""
        answer = {
            "Header": "Dask",
            "Status": "Error",
            "Job": "20261128-085308-13a252",
            "Log": "Traceback ...",
            "Error": {"Code": "JobFailed", "Message": "formula 'ratio' raised ZeroDivisionError"},
        }
        error = error_from(answer)
        self.assertIsInstance(error, JobFailed)
        self.assertEqual(
            (error.code, error.message, error.job, error.log),
            ("JobFailed", "formula 'ratio' raised ZeroDivisionError", answer["Job"], answer["Log"]),
        )
        self.assertEqual(str(error), "JobFailed: formula 'ratio' raised ZeroDivisionError")

    def test_everyCode(self) -> None:
        """Every Code of the protocol has its own class; an unknown one is a plain JobError."""
        for code in CODES:
            error = error_from({"Error": {"Code": code, "Message": "m"}})
            self.assertEqual((type(error).__name__, error.code), (code, code))
        self.assertIs(type(error_from({"Error": {"Code": "Novel", "Message": "m"}})), JobError)


class ImportTests(SynchronousTestCase):
    """``import measuring.client`` is light enough for a notebook or a script."""

    def test_importIsLight(self) -> None:
        """A fresh interpreter importing it has imported no Dask, Twisted, pyarrow or pandas."""
        heavy = ["dask", "twisted", "pyarrow", "pandas", "tqdm"]
        script = (
            "import json, sys\n"
            "import measuring.client\n"
            "from measuring.client import Client\n"
            "Client('127.0.0.1', 1)\n"
            f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {heavy!r})))\n"
        )
        done = subprocess.run(
            [sys.executable, "-c", script],
            env=environment(),
            capture_output=True,
            text=True,
            timeout=PATIENCE,
        )
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(json.loads(done.stdout), [])


class UnreachableTests(SynchronousTestCase):
    """A server that cannot be reached is a ``ClientError``, not a JobError."""

    def test_closedPort(self) -> None:
        """A request to a port nothing listens on raises ClientError naming host and port."""
        port = closed_port()
        with Client("127.0.0.1", port, timeout=5.0) as client:
            error = self.assertRaises(ClientError, client.status)
        self.assertIn(f"cannot reach the server at 127.0.0.1:{port}", str(error))


class ProgressTests(SynchronousTestCase):
    """A job's progress is reported as it was: full only when the job is done."""

    def follow(self, *lines: dict[str, object]) -> tuple[list[tuple[int, int]], object]:
        """The reports ``_follow`` makes of ``lines``, and what it returns or raises."""
        calls: list[tuple[int, int]] = []
        try:
            outcome: object = _follow(iter(lines), lambda done, total: calls.append((done, total)))
        except JobError as e:
            outcome = e
        return calls, outcome

    def test_stopsWhereTheJobStopped(self) -> None:
        """A cancelled job's last report is its last Progress line, not done == total."""
        calls, outcome = self.follow(
            {"Header": "Progress", "Done": 3, "Total": 42},
            {"Header": "Dask", "Status": "Error", "Error": {"Code": "Cancelled", "Message": "m"}},
        )
        self.assertEqual(calls, [(3, 42)])
        self.assertIsInstance(outcome, Cancelled)

    def test_fullWhenDone(self) -> None:
        """A done job ends at done == total, however far its last Progress line got."""
        calls, outcome = self.follow(
            {"Header": "Progress", "Done": 40, "Total": 42},
            {"Header": "Dask", "Status": "OK", "Response": {"Results": {}}},
        )
        self.assertEqual((calls, outcome), ([(40, 42), (42, 42)], {"Results": {}}))

    def test_barDrawsNothingBeforeProgress(self) -> None:
        """A bar that never got a report draws nothing, even when closed."""
        drawn = io.StringIO()
        with contextlib.redirect_stderr(drawn):
            Bar("work.py").close()
        self.assertEqual(drawn.getvalue(), "")


class FormulasTests(SynchronousTestCase):
    """``formulas``: a job's formulas as File on the server, or Code sent with it."""

    def test_file(self) -> None:
        """A file on the server is sent by name."""
        self.assertEqual(formulas("work.py", None), {"File": "work.py"})

    def test_localFile(self) -> None:
        """A local file's path sends its source, named after the file."""
        path = self.mktemp() + "-mine.py"
        with open(path, "w") as f:
            f.write("def peak(df):\n    return df.value.max()\n")
        self.assertEqual(
            formulas(None, path),
            {"Code": "def peak(df):\n    return df.value.max()\n", "Name": os.path.basename(path)},
        )

    def test_source(self) -> None:
        """Python source is sent as it is, called formulas.py."""
        source = "def peak(df):\n    return df.value.max()\n"
        self.assertEqual(formulas(None, source), {"Code": source, "Name": "formulas.py"})

    def test_oneOfThem(self) -> None:
        """Both or neither is a ValueError."""
        self.assertRaises(ValueError, formulas, None, None)
        self.assertRaises(ValueError, formulas, "work.py", "def f(df): ...")


class ResultPathTests(SynchronousTestCase):
    """Where a result's file is, as the client sees it."""

    def test_urlResult(self) -> None:
        """A result on object storage is its URL, never joined to the Directory."""
        from measuring.client.result import Result

        url = "s3://plant/data/site/results/j1/means.parquet"
        entry = {"Kind": "DataFrame", "File": url, "Rows": 2}
        self.assertEqual(Result(None, "j1", "means", entry, "s3://plant/data/site").path, url)  # type: ignore[arg-type]
        local = {"Kind": "DataFrame", "File": "results/j1/means.parquet", "Rows": 2}
        self.assertEqual(
            Result(None, "j1", "means", local, "/srv/site").path,  # type: ignore[arg-type]
            "/srv/site/results/j1/means.parquet",
        )
