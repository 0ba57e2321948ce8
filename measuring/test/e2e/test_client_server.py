"""
``measuring.client`` against the real server: results as pandas read from the file and fetched
through the protocol, errors as ``JobError`` subclasses, and jobs followed by their id.

Each test starts its own ``twistd -n measuring`` in its own folder (``support.ClientTestCase``,
shared with ``test_cli``); cleanup checks that it stopped cleanly and left no process behind.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
from typing import Any

import pandas as pd

from measuring.client import (
    BadRequest,
    Cancelled,
    Client,
    Forbidden,
    Job,
    JobFailed,
    NotFound,
    Result,
    Timeout,
    Unauthorized,
)
from measuring.test.support import (
    BASE,
    JOB_ID,
    PATIENCE,
    ROWS,
    TOKEN,
    ClientTestCase,
    dataset,
    write_token_file,
)


def plain_strings(frame: Any) -> Any:
    """
    ``frame`` with its text columns as pandas' default ``str``: Dask writes them as pyarrow
    strings, which read back with another missing-value marker but the same texts.
    """
    if isinstance(frame, pd.Series):
        return frame
    texts = [name for name, dtype in frame.dtypes.items() if pd.api.types.is_string_dtype(dtype)]
    return frame.astype(dict.fromkeys(texts, "str"))


def mismatches(result: Result, expected: Any, **options: Any) -> list[str]:
    """
    How ``result``, read from its file and fetched from the server, differs from the pandas
    object ``expected`` (rows in index order; ``options`` for pandas' assertion): none if equal.
    """
    found = []
    for source in ("file", "arrow", "json"):
        data = plain_strings(result.to_pandas(source=source)).sort_index()
        if type(data) is not type(expected):
            found.append(f"{result.name} from the {source}: a {type(data).__name__}: {data!r}")
            continue
        try:
            if isinstance(expected, pd.Series):
                pd.testing.assert_series_equal(data, expected, check_freq=False, **options)
            else:
                pd.testing.assert_frame_equal(data, expected, **options)
        except AssertionError as e:
            why = "; ".join(filter(None, str(e).splitlines()[:3]))
            found.append(f"{result.name} from the {source}: {why}")
    return found


class RunTests(ClientTestCase):
    """``Client.run`` runs a job to its end; its results read back as pandas computes them."""

    def assertSameResult(self, result: Result, expected: Any, **options: Any) -> None:
        """``result``, read from its file and fetched from the server, equals ``expected``."""
        wrong = mismatches(result, expected, **options)
        if wrong:
            self.fail("\n".join(wrong))

    def test_run(self) -> None:
        """The job ends done, progress ends at done == total, and each result equals pandas'."""
        server = self.start()
        data = dataset(server)
        calls: list[tuple[int, int]] = []
        with Client.from_address(f"127.0.0.1:{server.port}") as client:
            status = client.status()
            self.assertEqual((status["State"], status["Pid"]), ("running", server.process.pid))
            self.assertEqual(client.info("All statistic")["Disk"].keys(), {server.folder})
            functions = ["mean_by_sensor", "stats", "readings", "peak", "count"]
            job = client.run(
                server.folder,
                BASE,
                "work.py",
                functions=functions,
                progress=lambda done, total: calls.append((done, total)),
            )
            self.assertIsInstance(job, Job)
            self.assertRegex(job.id, f"^{JOB_ID.pattern}$")
            self.assertEqual(job.state, "done")
            self.assertNotEqual(calls, [])
            self.assertEqual(calls[-1][0], calls[-1][1])
            self.assertTrue(all(0 <= done <= total for done, total in calls), calls)

            results = job.results
            self.assertEqual(list(results), functions)
            self.assertEqual(
                {name: (result.kind, result.rows) for name, result in results.items()},
                {
                    "mean_by_sensor": ("Series", 3),
                    "stats": ("DataFrame", 3),
                    "readings": ("DataFrame", ROWS),
                    "peak": ("Scalar", None),
                    "count": ("Scalar", None),
                },
            )
            readings = results["readings"]
            self.assertEqual(readings.file, f"results/{job.id}/readings.parquet")
            path = os.path.join(server.folder, f"results/{job.id}/readings.parquet")
            self.assertEqual(readings.path, path)
            self.assertTrue(os.path.exists(path))
            self.assertEqual(results["peak"].value, data.value.max())
            self.assertEqual(results["count"].to_pandas(), ROWS)

            by_sensor = data.groupby("sensor").value
            self.assertSameResult(results["mean_by_sensor"], by_sensor.mean())
            self.assertSameResult(results["stats"], by_sensor.agg(["count", "mean", "min", "max"]))
            self.assertSameResult(readings, data[["sensor", "value"]])

    def test_timeIndexedResult(self) -> None:
        """A result indexed by time reads back with its time index, whatever its file format."""
        server = self.start()
        expected = dataset(server).set_index("time").value.resample("1h").mean()
        wrong = []
        with Client("127.0.0.1", server.port) as client:
            for output in ("parquet", "csv", "json"):
                job = client.run(server.folder, BASE, "work.py", ["hourly"], output=output)
                # Any time unit will do (check_index_type=False); text is not a time.
                found = mismatches(job.results["hourly"], expected, check_index_type=False)
                wrong += [f"{output}: {why}" for why in found]
        if wrong:
            self.fail("\n".join(["the time index was not read back as times:", *wrong]))

    def test_emptyResult(self) -> None:
        """A result without rows keeps its kind, index and columns, from the file and the server."""
        server = self.start()
        data = dataset(server)
        high = data[data.value > 1000]
        with Client("127.0.0.1", server.port) as client:
            results = client.run(server.folder, BASE, "empty.py").results
        rows = {name: result.rows for name, result in results.items()}
        self.assertEqual(rows, {"none_high": 0, "none_high_by_sensor": 0})
        # Without a row there is no type to read from the records: only the shape must survive.
        loose = {"check_dtype": False, "check_index_type": False}
        by_sensor = high.groupby("sensor").value.mean()
        wrong = mismatches(results["none_high"], high.reset_index(drop=True), **loose)
        wrong += mismatches(results["none_high_by_sensor"], by_sensor, **loose)
        if wrong:
            self.fail("\n".join(["an empty result lost its shape:", *wrong]))

    def test_progressBar(self) -> None:
        """``progress=True`` draws a tqdm bar (on stderr) that ends full, and the job is done."""
        server = self.start()
        drawn = io.StringIO()
        with Client("127.0.0.1", server.port) as client, contextlib.redirect_stderr(drawn):
            job = client.run(server.folder, BASE, "work.py", ["peak"], progress=True)
        self.assertEqual(job.results["peak"].value, dataset(server).value.max())
        self.assertIn("work.py", drawn.getvalue())
        counts = re.findall(r"(\d+)/(\d+)", drawn.getvalue())
        self.assertNotEqual(counts, [], drawn.getvalue())
        self.assertEqual(counts[-1][0], counts[-1][1], drawn.getvalue())


class FailureTests(ClientTestCase):
    """Every way a job or request fails is raised as its Code's ``JobError`` subclass."""

    def test_errors(self) -> None:
        """JobFailed, NotFound, Forbidden, Timeout and BadRequest carry the server's words."""
        server = self.start()
        folder = server.folder
        with Client("127.0.0.1", server.port) as client:
            failed = self.assertRaises(JobFailed, client.run, folder, BASE, "bad.py", ["fail"])
            self.assertEqual(failed.code, "JobFailed")
            self.assertIn("formula 'fail' raised ZeroDivisionError", failed.message)
            self.assertRegex(failed.job or "", f"^{JOB_ID.pattern}$")
            self.assertIn("about to divide", failed.log or "")
            self.assertIn("ZeroDivisionError", failed.log or "")

            missing = self.assertRaises(NotFound, client.run, folder, BASE, "work.py", ["nope"])
            self.assertIn("no formula named 'nope'", missing.message)
            base = self.assertRaises(NotFound, client.run, folder, "nope.parquet", "work.py")
            self.assertIn("Base 'nope.parquet'", base.message)
            outside = self.assertRaises(Forbidden, client.run, "/etc", BASE, "work.py")
            self.assertEqual(outside.code, "Forbidden")
            self.assertIn("outside the data roots", outside.message)
            self.assertRaises(Forbidden, client.submit, "/etc", BASE, "work.py")

            late = self.assertRaises(
                Timeout, client.run, folder, BASE, "bad.py", ["spin"], timeout=1
            )
            self.assertIn("limit of 1 s", late.message)

            self.assertRaises(BadRequest, client.info, "Uptime")
            unknown = self.assertRaises(NotFound, client.job("20200101-000000-abcdef").status)
            self.assertIn("20200101-000000-abcdef", unknown.message)
            # After all those errors the one connection still answers.
            self.assertEqual(client.status()["Jobs"], {"Running": 0, "Queued": 0})
            self.assertEqual(client.info("Dask process")["Count"], 0)

    def test_unauthorized(self) -> None:
        """With a token file, no token or a wrong one is Unauthorized; the right one is answered."""
        folder = os.path.realpath(self.mktemp())
        os.makedirs(folder)
        tokens = write_token_file(folder)
        server = self.start("--token-file", tokens)
        for token in (None, "not-the-token-but-long-enough"):
            with Client("127.0.0.1", server.port, token=token) as client:
                self.assertRaises(Unauthorized, client.status)
        with Client("127.0.0.1", server.port, token=TOKEN) as client:
            self.assertEqual(client.status()["State"], "running")
            job = client.run(server.folder, BASE, "work.py", ["count"])
            self.assertEqual(job.results["count"].value, ROWS)


class JobTests(ClientTestCase):
    """``submit`` returns at once; the Job is followed, cancelled and read by its id."""

    def test_submitWaitCancel(self) -> None:
        """A running job times out a wait, shows its log, cancels, and raises Cancelled after."""
        server = self.start()
        with Client("127.0.0.1", server.port) as client:
            spinning = client.submit(server.folder, BASE, "bad.py", ["spin"])
            self.assertIn(spinning.state, ("queued", "running"))
            self.wait_for(lambda: "spinning" in spinning.log(), "the job to print")
            self.assertRaises(TimeoutError, spinning.wait, timeout=0.2)
            self.assertEqual(spinning.state, "running")

            self.assertEqual(spinning.cancel(), "cancelled")
            cancelled = self.assertRaises(Cancelled, spinning.wait)
            self.assertEqual((cancelled.code, cancelled.job), ("Cancelled", spinning.id))
            self.assertEqual(spinning.state, "cancelled")
            self.assertRaises(NotFound, lambda: spinning.results)

            counting = client.submit(server.folder, BASE, "work.py", ["count"], output="csv")
            self.assertIs(counting.wait(timeout=PATIENCE), counting)
            self.assertEqual(counting.results["count"].value, ROWS)
            listed = {job["Job"]: job["State"] for job in client.jobs()}
            self.assertEqual(listed, {counting.id: "done", spinning.id: "cancelled"})
            self.assertEqual(client.jobs(state="cancelled")[0]["Job"], spinning.id)
            self.assertEqual(client.job(counting.id).results["count"].value, ROWS)

    def test_waitProgress(self) -> None:
        """``wait`` reports the progress it sees through Job Status, ending at done == total."""
        server = self.start()
        server.wait_until_ready()
        calls: list[tuple[int, int]] = []
        with Client("127.0.0.1", server.port) as client:
            job = client.submit(server.folder, BASE, "slow.py")
            job.wait(timeout=PATIENCE, progress=lambda done, total: calls.append((done, total)))
            self.assertEqual(job.results["slow"].value, dataset(server).value.count())
        # The one task naps 1.5 s, long enough for a Job Status to see the job running.
        self.assertNotEqual(calls, [])
        self.assertEqual(calls[-1][0], calls[-1][1], calls)

    def test_resultFormats(self) -> None:
        """Results written as CSV or JSON read back from the file as they do from the server."""
        server = self.start()
        data = dataset(server)
        expected = data.groupby("sensor").value.mean()
        with Client("127.0.0.1", server.port) as client:
            for output in ("csv", "json"):
                job = client.submit(server.folder, BASE, "work.py", ["mean_by_sensor"], output)
                result = job.wait(timeout=PATIENCE).results["mean_by_sensor"]
                self.assertEqual(result.file, f"results/{job.id}/mean_by_sensor.{output}")
                for source in ("file", "arrow", "json"):
                    pd.testing.assert_series_equal(
                        result.to_pandas(source=source).sort_index(),
                        expected,
                        obj=f"mean_by_sensor ({output}, {source})",
                    )
