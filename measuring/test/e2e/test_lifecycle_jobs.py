"""
End to end, a job followed from outside: background (Async) jobs and the Job requests that follow
them, Progress lines while a job runs, and cancelling a queued, a running and a finished job.

Each test starts the real ``twistd -n measuring`` in its own folder (``support.ServerTestCase``)
and speaks to it over sockets; cleanup checks that every server stopped cleanly and left no process
behind. Formulas that must run for a while wait on marker files, so the tests never sleep longer
than a poll.
"""

from __future__ import annotations

import math
import os
from typing import Any

import pandas as pd

from measuring.test.support import (
    FINISHED,
    JOB_ID,
    Connection,
    ServerTestCase,
    alive,
    carrying,
    write_dataset,
)


class AsyncJobTests(ServerTestCase):
    """Jobs in the background, followed with Job requests."""

    def test_asyncJobMatchesSyncAnswer(self) -> None:
        """An Async job is accepted at once, ends done as a sync one, and Job requests show it."""
        server = self.start()
        functions = ("mean_by_sensor", "minutely", "total")
        sync = server.ask(self.dask(*functions))
        self.assertEqual(sync["Status"], "OK", sync)

        accepted = server.ask(self.dask(*functions, Async=True))
        job = accepted["Job"]
        self.assertEqual(accepted, {"Header": "Dask", "Status": "Accepted", "Job": job})
        self.assertRegex(job, JOB_ID)
        seen: list[str] = []
        status = self.wait_for_job(server, job, *FINISHED, seen=seen)
        self.assertIn(seen[0], ("queued", "running"))
        self.assertEqual(seen, [s for s in ("queued", "running", "done") if s in seen], seen)
        self.assertEqual(status["State"], "done", status)
        self.assertEqual(status["Attempts"], 1)
        self.assertEqual(status["Directory"], self.folder)
        self.assertEqual(status["Functions"], list(functions))
        self.assertIsNotNone(status["Started"])
        self.assertIsNotNone(status["Finished"])
        self.assertIsInstance(status["Elapsed"], float)

        results = status["Results"]
        self.assertEqual(results["mean_by_sensor"]["File"], f"results/{job}/mean_by_sensor.parquet")
        self.assertEqual(_without_files(results), _without_files(sync["Response"]["Results"]))
        self.assert_means(results)
        self.assertAlmostEqual(results["total"]["Value"], self.frame.value.sum(), places=6)

        listed = server.ask({"Header": "Job", "Request": "List"})["Response"]["Jobs"]
        self.assertEqual(
            [(j["Job"], j["State"]) for j in listed], [(job, "done"), (sync["Job"], "done")]
        )

        log = self.job(server, "Log", job)["Response"]["Log"]
        self.assertIn(f"mean_by_sensor ran in job {job}", log)

        expected = self.frame.set_index("time").value.resample("1min").mean()
        records = []
        for offset in (0, 100):
            page = self.job(server, "Result", job, Name="minutely", Offset=offset, Limit=100)
            response = page["Response"]
            self.assertEqual(
                (response["Name"], response["Kind"], response["Rows"], response["Offset"]),
                ("minutely", "Series", len(expected), offset),
            )
            records += response["Records"]
        self.assertEqual(len(records), len(expected))
        self.assertEqual([pd.Timestamp(r["time"]) for r in records], list(expected.index))
        for record, value in zip(records, expected, strict=True):
            self.assertTrue(math.isclose(record["value"], value, rel_tol=1e-12), (record, value))
        scalar = self.job(server, "Result", job, Name="total")["Response"]
        self.assertEqual(scalar, {"Name": "total", **results["total"]})


def _without_files(results: dict[str, Any]) -> dict[str, Any]:
    """Results without their File, which names the job."""
    return {
        name: {k: v for k, v in entry.items() if k != "File"} for name, entry in results.items()
    }


class ProgressTests(ServerTestCase):
    """Progress lines while a job runs over a dataset of several Parquet files."""

    def setUp(self) -> None:
        super().setUp()
        parts = os.path.join(self.folder, "parts")
        os.makedirs(parts)
        for number, start in enumerate(range(0, len(self.frame), 2500)):
            chunk = self.frame.iloc[start : start + 2500]
            write_dataset(parts, f"part.{number}.parquet", frame=chunk)

    def receive_progress(
        self, connection: Connection
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """The Progress lines coming on ``connection``, and the answer after them."""
        lines = [connection.receive()]
        while lines[-1]["Header"] == "Progress":
            lines.append(connection.receive())
        *progress, answer = lines
        self.assertNotEqual(progress, [])
        for line in progress:
            self.assertEqual(set(line), {"Header", "Job", "Done", "Total", "Id"})
            self.assertEqual(line["Job"], answer["Job"])
            self.assertLessEqual(line["Done"], line["Total"])
        self.assertGreater(progress[-1]["Total"], 1)
        self.assertEqual(progress[-1]["Done"], progress[-1]["Total"])
        return progress, answer

    def test_progressBeforeAnswer(self) -> None:
        """A sync Progress request gets its job's Progress up to Done == Total, then its answer."""
        server = self.start()
        request = self.dask("mean_by_sensor", "total", Base="parts", Progress=True)
        with server.connect() as connection:
            connection.send({**request, "Id": "progress-1"})
            progress, answer = self.receive_progress(connection)
        self.assertEqual(answer["Status"], "OK", answer)
        self.assertEqual({line["Id"] for line in [*progress, answer]}, {"progress-1"})
        self.assert_means(answer["Response"]["Results"])

    def test_asyncProgressThenAnswer(self) -> None:
        """An Async Progress request gets Accepted, its job's Progress, then the job's answer."""
        server = self.start()
        request = self.dask("mean_by_sensor", "total", Base="parts", Progress=True, Async=True)
        with server.connect() as connection:
            accepted = connection.ask({**request, "Id": 7})
            self.assertEqual((accepted["Status"], accepted["Id"]), ("Accepted", 7), accepted)
            progress, answer = self.receive_progress(connection)
        self.assertEqual((answer["Header"], answer["Status"]), ("Dask", "OK"), answer)
        self.assertEqual(answer["Job"], accepted["Job"])
        self.assertEqual({line["Id"] for line in [*progress, answer]}, {7})
        self.assert_means(answer["Response"]["Results"])


class CancelTests(ServerTestCase):
    """Job Cancel on a queued, a running and a finished job."""

    def test_cancelQueuedJob(self) -> None:
        """A queued job that is cancelled never starts: cancelled, Attempts 0, no results."""
        server = self.start("--workers", "1")
        self.hold()
        running = self.submit(server, "held")
        queued = self.submit(server, "mean_by_sensor")
        self.wait_started(running)
        answer = self.job(server, "Cancel", queued)
        self.assertEqual((answer["Status"], answer["Response"]), ("OK", {"State": "cancelled"}))
        self.release_all()
        self.assertEqual(self.wait_for_job(server, running, *FINISHED)["State"], "done")
        status = self.status(server, queued)
        self.assertEqual((status["State"], status["Attempts"]), ("cancelled", 0))
        self.assertIsNone(status["Started"])
        self.assertEqual(status["Error"]["Code"], "Cancelled")
        self.assertFalse(os.path.exists(os.path.join(self.folder, "results", queued)))

    def test_cancelRunningJob(self) -> None:
        """A cancelled running job ends cancelled, its client gets Cancelled, its processes end."""
        server = self.start("--workers", "1")
        with server.connect() as client:
            client.send({**self.dask("spin"), "Id": "spinning"})
            (process,) = self.wait_for(
                lambda: self.info(server, "Dask process")["Processes"], "the job running"
            )
            job = process["Job"]
            answer = self.job(server, "Cancel", job)
            self.assertEqual(answer["Response"], {"State": "cancelled"})
            ended = client.receive()
        self.assertEqual((ended["Id"], ended["Job"]), ("spinning", job))
        self.assertEqual(ended["Error"]["Code"], "Cancelled", ended)
        status = self.status(server, job)
        self.assertEqual((status["State"], status["Attempts"]), ("cancelled", 1))
        self.assertEqual(status["Error"]["Code"], "Cancelled")
        self.assertEqual(self.info(server, "Dask process")["Count"], 0)
        self.wait_for(lambda: not alive([process["Pid"]]), "the job's worker ending")
        self.assertEqual(carrying(job), [])

    def test_cancelDoneJob(self) -> None:
        """Cancelling a job that is done answers done, and the job keeps its results."""
        server = self.start()
        answer = server.ask(self.dask("total"))
        job = answer["Job"]
        cancel = self.job(server, "Cancel", job)
        self.assertEqual((cancel["Status"], cancel["Response"]), ("OK", {"State": "done"}))
        status = self.status(server, job)
        self.assertEqual(status["State"], "done")
        self.assertEqual(status["Results"], answer["Response"]["Results"])
