"""
Tests for what ``measuring.server.jobs.scheduler.Scheduler`` answers about jobs: Cancel, Status,
Log, List, Result and Progress, for live jobs and for those only the job database still knows.

Same setting as ``test_jobs``: the real job database in a temporary folder, a fake pool, a clock.
"""

from __future__ import annotations

import os
from typing import Any

import pandas as pd

from measuring import files
from measuring.errors import Cancelled, JobFailed, NotFound
from measuring.server.jobs import records
from measuring.server.jobs.records import Job, new_job_id
from measuring.test.support.fakes import HeldRunner, finished
from measuring.test.unit.test_jobs import NOW, JobsTestCase


class CancelTests(JobsTestCase):
    """A queued job never starts, a running one is stopped, an ended one keeps its state."""

    def test_cancelQueuedJob(self) -> None:
        """A queued job cancelled is "cancelled" on disk at once, and never starts."""
        manager = self.manager()
        first, queued, last = self.submit(manager), self.submit(manager), self.submit(manager)
        self.assertEqual(self.successResultOf(manager.cancel(queued.id)), "cancelled")
        self.failureResultOf(finished(queued), Cancelled)
        record = self.on_disk(queued.id)
        self.assertEqual((record["state"], record["started"]), ("cancelled", None))
        self.assertEqual(record["error"], {"Code": "Cancelled", "Message": "the job was cancelled"})
        self.pool.runs[0].succeed()
        self.assertEqual(self.pool.started(), [first.id, last.id])

    def test_cancelRunningJob(self) -> None:
        """A running job cancelled is killed; the answer comes once it has ended "cancelled"."""
        self.pool.in_worker = True
        manager = self.manager()
        job = self.submit(manager)
        cancelled = manager.cancel(job.id)
        self.assertIsInstance(self.pool.runs[0].killed_with, Cancelled)
        self.assertNoResult(cancelled)
        self.pool.runs[0].exited()
        self.assertEqual(self.successResultOf(cancelled), "cancelled")
        self.assertEqual(self.on_disk(job.id)["state"], "cancelled")
        self.assertEqual(self.on_disk(job.id)["error"]["Code"], "Cancelled")

    def test_cancelEndedJob(self) -> None:
        """An ended job cancelled keeps its state, on disk too."""
        manager = self.manager()
        job = self.submit(manager)
        self.pool.runs[0].succeed()
        self.assertEqual(self.successResultOf(manager.cancel(job.id)), "done")
        self.assertEqual(self.on_disk(job.id)["state"], "done")
        self.assertIsNone(self.pool.runs[0].killed_with)

    def test_cancelWhileEndIsWritten(self) -> None:
        """A job cancelled while its end is being written answers the state it ended in."""
        runner = HeldRunner()
        manager = self.manager(runner)
        submitted = manager.submit(self.spec)
        runner.release()
        job = self.successResultOf(submitted)
        self.pool.runs[0].succeed()
        cancelled = manager.cancel(job.id)
        runner.release()
        self.assertEqual(self.successResultOf(cancelled), "done")
        self.assertEqual(self.on_disk(job.id)["state"], "done")

    def test_cancelDuringRecovery(self) -> None:
        """A job queued before the start and cancelled during recovery never starts."""
        job = Job(id=new_job_id(NOW - 10), spec=self.spec, submitted=NOW - 10)
        self.disk.add(job.record())
        runner = HeldRunner()
        manager = self.manager(runner)
        cancelled = manager.cancel(job.id)
        runner.release()
        self.assertEqual(self.successResultOf(cancelled), "cancelled")
        self.assertEqual(self.on_disk(job.id)["state"], "cancelled")
        self.assertEqual(self.pool.started(), [])

    def test_cancelUnknownJob(self) -> None:
        """Cancelling a job that is not on record is NotFound naming it."""
        error = self.failureResultOf(self.manager().cancel("20270115-080000-abcdef"), NotFound)
        self.assertIn("no job '20270115-080000-abcdef'", error.value.message)


class StatusTests(JobsTestCase):
    """Status and Log: from memory while a job is live, from the database afterwards."""

    def test_statusOfRunningJob(self) -> None:
        """A running job's Status gives its state, times, attempts and request."""
        manager = self.manager()
        job = self.submit(manager)
        self.assertEqual(
            self.successResultOf(self.queries.status(job.id)),
            {
                "State": "running",
                "Submitted": "2027-01-15T08:00:00+00:00",
                "Started": "2027-01-15T08:00:00+00:00",
                "Finished": None,
                "Attempts": 1,
                "Directory": self.directory,
                "Base": os.path.join(self.directory, "time_series.parquet"),
                "File": os.path.join(self.directory, "work.py"),
                "Functions": None,
            },
        )

    def test_statusOfDoneJobAfterRestart(self) -> None:
        """A done job's Status, read back from disk by a new manager, has Results and Elapsed."""
        job = self.submit(self.manager())
        self.clock.advance(3)
        self.pool.runs[0].succeed({"peak": {"Kind": "Scalar", "Value": 7}})
        status = self.successResultOf(self.ask().status(job.id))
        self.assertEqual(
            (status["State"], status["Finished"], status["Results"], status["Elapsed"]),
            ("done", "2027-01-15T08:00:03+00:00", {"peak": {"Kind": "Scalar", "Value": 7}}, 3.0),
        )
        self.assertNotIn("Error", status)

    def test_statusOfFailedJob(self) -> None:
        """A failed job's Status has its Error and no Results."""
        manager = self.manager()
        job = self.submit(manager)
        self.pool.runs[0].fail(JobFailed("formula 'peak' raised KeyError: 'value'"))
        status = self.successResultOf(self.queries.status(job.id))
        self.assertEqual(status["State"], "failed")
        self.assertEqual(
            status["Error"],
            {"Code": "JobFailed", "Message": "formula 'peak' raised KeyError: 'value'"},
        )
        self.assertNotIn("Results", status)

    def test_statusOfUnknownJob(self) -> None:
        """Status of a job not on record is NotFound naming it and how long jobs are kept."""
        error = self.failureResultOf(self.ask().status("nope"), NotFound).value
        self.assertIn("no job 'nope'", error.message)
        self.assertIn("kept 30 days", error.message)

    def test_log(self) -> None:
        """Log is what the formulas printed so far while running, and all of it once ended."""
        manager = self.manager()
        running, queued = self.submit(manager), self.submit(manager)
        self.pool.runs[0].print("step 1\n")
        self.assertEqual(self.successResultOf(self.queries.log(running.id)), "step 1\n")
        self.assertEqual(self.successResultOf(self.queries.log(queued.id)), "")
        self.pool.runs[0].print("step 2\n")
        self.pool.runs[0].fail(JobFailed("formula 'peak' raised KeyError"))
        self.assertEqual(self.successResultOf(self.ask().log(running.id)), "step 1\nstep 2\n")
        self.failureResultOf(self.queries.log("nope"), NotFound)

    def test_progressReachesListeners(self) -> None:
        """Progress from the pool reaches the job's listeners until the job ends."""
        manager = self.manager()
        job = self.submit(manager)
        seen: list[tuple[int, int]] = []
        job.listen(lambda done, total: seen.append((done, total)))
        self.pool.runs[0].progress(120, 480)
        self.pool.runs[0].progress(480, 480)
        self.pool.runs[0].succeed()
        self.pool.runs[0].progress(480, 480)
        self.assertEqual(seen, [(120, 480), (480, 480)])

    def test_progressAtMostEveryPeriod(self) -> None:
        """
        Listeners hear at most every PROGRESS_EVERY s of the server's clock, but always the end;
        Status the latest.
        """
        manager = self.manager()
        start = self.clock.seconds()
        job = self.submit(manager)
        seen: list[tuple[int, int]] = []
        job.listen(lambda done, total: seen.append((done, total)))
        # When each report comes, in periods of PROGRESS_EVERY from the first.
        reports = [(0, 1), (0.4, 2), (0.996, 3), (1, 4), (1.2, 5), (1.2, 10), (1.6, 10)]
        for periods, done in reports:
            self.clock.advance(start + periods * records.PROGRESS_EVERY - self.clock.seconds())
            self.pool.runs[0].progress(done, 10)
            if done == 3:
                status = self.successResultOf(self.queries.status(job.id))
                self.assertEqual(status["Progress"], {"Done": 3, "Total": 10})
        self.assertEqual(seen, [(1, 10), (4, 10), (10, 10), (10, 10)])


class ListTests(JobsTestCase):
    """List: the newest jobs first, by state when asked, at most ``limit``."""

    def test_recent(self) -> None:
        """Jobs come newest first; a State keeps only jobs in that state; Limit cuts the list."""
        manager = self.manager()
        jobs: list[Job] = []
        for _ in range(3):
            jobs.append(self.submit(manager))
            self.clock.advance(1)
        oldest, middle, newest = jobs

        def listed(state: str | None, limit: int) -> list[tuple[str, str]]:
            found = self.successResultOf(self.queries.recent(state, limit))
            return [(summary["Job"], summary["State"]) for summary in found]

        self.assertEqual(
            listed(None, 100),
            [(newest.id, "queued"), (middle.id, "queued"), (oldest.id, "running")],
        )
        self.assertEqual(listed("queued", 100), [(newest.id, "queued"), (middle.id, "queued")])
        self.assertEqual(listed("running", 100), [(oldest.id, "running")])
        self.assertEqual(listed(None, 2), [(newest.id, "queued"), (middle.id, "queued")])
        self.assertEqual(listed("done", 100), [])

    def test_summary(self) -> None:
        """Each listed job has its id, state, submission time, Directory, Base, File; an error."""
        manager = self.manager()
        job = self.submit(manager)
        summary = {
            "Job": job.id,
            "State": "running",
            "Submitted": "2027-01-15T08:00:00+00:00",
            "Directory": self.directory,
            "Base": os.path.join(self.directory, "time_series.parquet"),
            "File": os.path.join(self.directory, "work.py"),
        }
        self.assertEqual(self.successResultOf(self.queries.recent(None, 1)), [summary])
        self.pool.runs[0].fail(JobFailed("formula 'peak' raised KeyError"))
        failed = {**summary, "State": "failed"}
        failed["Error"] = {"Code": "JobFailed", "Message": "formula 'peak' raised KeyError"}
        self.assertEqual(self.successResultOf(self.queries.recent(None, 1)), [failed])


class ResultTests(JobsTestCase):
    """Result: one page of one result of a done job."""

    def done(self, results: dict[str, Any]) -> str:
        """A job that ended done with ``results``; returns its id."""
        job = self.submit(self.manager())
        self.pool.runs[-1].succeed(results)
        return job.id

    def test_scalar(self) -> None:
        """A single value comes back as its Name, Kind and Value."""
        job = self.done({"peak": {"Kind": "Scalar", "Value": 34.88}})
        self.assertEqual(
            self.successResultOf(self.ask().result(job, "peak", 0, 1000)),
            {"Name": "peak", "Kind": "Scalar", "Value": 34.88},
        )

    def test_table(self) -> None:
        """A table comes back as the page of Records asked for, with Rows in all and Offset."""
        job = self.submit(self.manager())
        relative = f"results/{job.id}/mean_by_sensor.parquet"
        os.makedirs(files.result_dir(self.directory, job.id))
        frame = pd.DataFrame(
            {"value": [1.5, 2.5, 3.5, 4.5, 5.5]},
            index=pd.Index(["s1", "s2", "s3", "s4", "s5"], name="sensor"),
        )
        frame.to_parquet(os.path.join(self.directory, relative), row_group_size=2)
        self.pool.runs[0].succeed(
            {"mean_by_sensor": {"Kind": "Series", "File": relative, "Rows": 5}}
        )
        self.assertEqual(
            self.successResultOf(self.ask().result(job.id, "mean_by_sensor", 1, 3)),
            {
                "Name": "mean_by_sensor",
                "Kind": "Series",
                "File": relative,
                "Rows": 5,
                "Offset": 1,
                "Columns": ["value"],
                "Records": [
                    {"sensor": "s2", "value": 2.5},
                    {"sensor": "s3", "value": 3.5},
                    {"sensor": "s4", "value": 4.5},
                ],
            },
        )

    def test_notDone(self) -> None:
        """A job that is not done has no results: NotFound saying its state."""
        manager = self.manager()
        running = self.submit(manager)
        error = self.failureResultOf(self.queries.result(running.id, "peak", 0, 10), NotFound).value
        self.assertIn("has no results: it is running", error.message)
        self.pool.runs[0].fail(JobFailed("formula 'peak' raised KeyError"))
        error = self.failureResultOf(self.queries.result(running.id, "peak", 0, 10), NotFound).value
        self.assertIn("has no results: it is failed", error.message)

    def test_unknownName(self) -> None:
        """A result the job does not have is NotFound listing those it has."""
        job = self.done(
            {"peak": {"Kind": "Scalar", "Value": 1}, "count": {"Kind": "Scalar", "Value": 2}}
        )
        error = self.failureResultOf(self.ask().result(job, "mean", 0, 10), NotFound).value
        self.assertIn("has no result 'mean' (its results: peak, count)", error.message)

    def test_unknownJob(self) -> None:
        """A Result of a job that is not on record is NotFound."""
        self.failureResultOf(self.ask().result("nope", "peak", 0, 10), NotFound)
