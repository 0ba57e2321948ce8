"""
Tests for the time ``measuring.server.jobs.scheduler.Scheduler`` gives jobs and keeps them: each
job's time limit, recovery at start, the stop with its grace period, the retention sweep, and the
counters of finished jobs.

Same setting as ``test_jobs``: the real job database in a temporary folder (a "restart" is a new
manager on the same database), a fake pool, a clock.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import defer

from measuring import files
from measuring.errors import Busy, Cancelled, JobFailed, Timeout
from measuring.server.jobs.records import Job, JobSpec, new_job_id
from measuring.server.jobs.retention import DAY
from measuring.test.support.fakes import HeldRunner, finished
from measuring.test.unit.test_jobs import NOW, TIMEOUT, JobsTestCase

GRACE = 30.0
HOUR = 3600.0


class TimeLimitTests(JobsTestCase):
    """A running job is killed once it has run longer than its own Timeout or job_timeout."""

    def assertTimedOut(self, job: Job, seconds: float) -> None:
        """``job`` was killed with Timeout naming ``seconds``, and is "timeout" on disk."""
        error = self.failureResultOf(finished(job), Timeout).value
        self.assertIn(f"its limit of {seconds:g} s", error.message)
        record = self.on_disk(job.id)
        self.assertEqual((record["state"], record["error"]["Code"]), ("timeout", "Timeout"))

    def test_jobPastItsLimitIsKilled(self) -> None:
        """A job still running at job_timeout is killed with Timeout and ends "timeout"."""
        job = self.submit(self.manager())
        self.clock.advance(TIMEOUT - 0.001)
        self.assertIsNone(self.pool.runs[0].killed_with)
        self.clock.advance(0.001)
        self.assertIsInstance(self.pool.runs[0].killed_with, Timeout)
        self.assertTimedOut(job, TIMEOUT)

    def test_ownTimeoutShorter(self) -> None:
        """A job's own Timeout, shorter than job_timeout, is its limit."""
        job = self.submit(self.manager(), JobSpec(self.spec.paths, timeout=5.5))
        self.clock.advance(5.4)
        self.assertIsNone(self.pool.runs[0].killed_with)
        self.clock.advance(0.1)
        self.assertTimedOut(job, 5.5)

    def test_ownTimeoutCappedByJobTimeout(self) -> None:
        """A job's own Timeout longer than job_timeout is cut to job_timeout."""
        job = self.submit(self.manager(), JobSpec(self.spec.paths, timeout=TIMEOUT * 10))
        self.clock.advance(TIMEOUT)
        self.assertTimedOut(job, TIMEOUT)

    def test_limitCountsFromStart(self) -> None:
        """A job that waited in the queue gets its whole limit once it starts."""
        manager = self.manager()
        first, second = self.submit(manager), self.submit(manager)
        self.clock.advance(TIMEOUT / 2)
        self.pool.runs[0].succeed()
        self.clock.advance(TIMEOUT - 1)
        self.assertEqual(self.on_disk(second.id)["state"], "running")
        self.clock.advance(1)
        self.assertTimedOut(second, TIMEOUT)
        self.assertEqual(self.on_disk(first.id)["state"], "done")

    def test_finishedJobIsNotKilled(self) -> None:
        """A job that ends in time is not killed later."""
        job = self.submit(self.manager())
        self.pool.runs[0].succeed()
        self.clock.advance(TIMEOUT * 2)
        self.assertIsNone(self.pool.runs[0].killed_with)
        self.assertEqual(self.on_disk(job.id)["state"], "done")

    def test_timeoutStartsTheNextJob(self) -> None:
        """A job killed at its limit lets the next waiting job start."""
        manager = self.manager()
        first, second = self.submit(manager), self.submit(manager)
        self.clock.advance(TIMEOUT)
        self.assertEqual(self.pool.started(), [first.id, second.id])
        self.assertEqual(manager.counts(), {"Running": 1, "Queued": 0})


class RecoveryTests(JobsTestCase):
    """At start, jobs a crash interrupted are queued again, before any new job."""

    def left(self, state: str, submitted: float, interrupted: int = 0) -> str:
        """A record as a server that died left it; returns its id."""
        job = Job(id=new_job_id(submitted), spec=self.spec, submitted=submitted, state=state)
        if state == "running":
            job.started, job.attempts = submitted, interrupted + 1
        self.disk.add({**job.record(), "interrupted": interrupted})
        return job.id

    def test_runningJobRunsAgain(self) -> None:
        """A job left running is queued again and run, counted as interrupted once."""
        job = self.left("running", NOW - 100)
        self.manager()
        self.assertEqual(self.pool.started(), [job])
        record = self.on_disk(job)
        self.assertEqual(
            (record["state"], record["attempts"], record["interrupted"]), ("running", 2, 1)
        )

    def test_interruptedThreeTimesFails(self) -> None:
        """A job interrupted for the third time is not run again: it fails saying why."""
        job = self.left("running", NOW - 100, interrupted=2)
        self.manager()
        self.assertEqual(self.pool.started(), [])
        status = self.successResultOf(self.queries.status(job))
        self.assertEqual(status["State"], "failed")
        self.assertEqual(status["Error"]["Code"], "JobFailed")
        self.assertIn("interrupted 3 times", status["Error"]["Message"])
        self.assertIn("not run again", status["Error"]["Message"])
        self.assertEqual(self.on_disk(job)["finished"], NOW)

    def test_oldestFirst(self) -> None:
        """Recovered jobs, queued or running before, run in the order they were submitted."""
        newer = self.left("queued", NOW - 10)
        older = self.left("running", NOW - 20)
        done = self.left("done", NOW - 30)
        manager = self.manager()
        self.pool.runs[0].succeed()
        self.assertEqual(self.pool.started(), [older, newer])
        self.assertEqual(self.on_disk(done)["state"], "done")
        self.assertEqual(manager.counts(), {"Running": 1, "Queued": 0})

    def test_newJobsWaitForRecovery(self) -> None:
        """A job submitted while recovery is under way runs after the recovered ones."""
        runner = HeldRunner()
        recovered = self.left("queued", NOW - 10)
        manager = self.manager(runner, workers=2)
        submitted = manager.submit(self.spec)
        self.assertEqual(self.pool.started(), [])
        runner.release()
        job = self.successResultOf(submitted)
        self.assertEqual(self.pool.started(), [recovered, job.id])

    def test_recoveryRemovesPartialResults(self) -> None:
        """What an interrupted job half-wrote is removed before it runs again."""
        job = self.left("running", NOW - 100)
        partial = files.partial_dir(self.directory, job)
        os.makedirs(partial)
        self.manager()
        self.assertFalse(os.path.exists(partial))

    def test_partialResultsRemovedBeforeTheJobStarts(self) -> None:
        """A recovered job starts only once its earlier runs' partial folders are removed."""
        blocking = HeldRunner()
        job = self.left("running", NOW - 100)
        partial = files.partial_dir(self.directory, job)
        old = os.path.join(self.directory, "results", f".{job}.old")  # an interrupted replacement
        os.makedirs(partial)
        os.makedirs(old)
        manager = self.manager(blocking=blocking)
        [(removal, arguments, _)] = blocking.held
        self.assertEqual((removal, arguments), (files.remove_partial, (self.directory, job)))
        self.assertEqual((self.pool.started(), manager.counts()["Queued"]), ([], 0))
        self.assertTrue(os.path.isdir(partial))
        blocking.step()
        self.assertEqual(self.pool.started(), [job])
        self.assertEqual((os.path.exists(partial), os.path.exists(old)), (False, False))


class StopTests(JobsTestCase):
    """On stop, running jobs get a grace period; those still running then run again later."""

    def test_jobEndingWithinGrace(self) -> None:
        """A job that ends within the grace is done, and then the stop is over."""
        self.pool.in_worker = True
        manager = self.manager(stop_grace=GRACE)
        job = self.submit(manager)
        stopped = manager.stopService()
        self.clock.advance(GRACE - 1)
        self.assertNoResult(stopped)
        self.pool.runs[0].succeed()
        self.assertIsNone(self.successResultOf(stopped))
        self.assertEqual(self.on_disk(job.id)["state"], "done")
        self.assertIsNone(self.pool.runs[0].killed_with)
        self.retention.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_jobPastGraceQueuedAgain(self) -> None:
        """A job still running after the grace is stopped, queued on disk, and runs at restart."""
        self.pool.in_worker = True
        manager = self.manager(stop_grace=GRACE)
        job = self.submit(manager)
        stopped = manager.stopService()
        self.clock.advance(GRACE)
        self.assertIsInstance(self.pool.runs[0].killed_with, Cancelled)
        self.assertNoResult(stopped)
        self.pool.runs[0].exited()
        self.successResultOf(stopped)
        record = self.on_disk(job.id)
        self.assertEqual(
            (record["state"], record["started"], record["error"]), ("queued", None, None)
        )
        self.manager()
        self.assertEqual(self.pool.started(), [job.id, job.id])
        self.assertEqual(self.on_disk(job.id)["attempts"], 2)

    def test_jobWaitingForWorkerPastGrace(self) -> None:
        """A job the pool fails at once when stopped (no worker yet) is queued again too."""
        manager = self.manager(workers=2, stop_grace=GRACE)
        jobs = [self.submit(manager), self.submit(manager)]
        stopped = manager.stopService()
        self.clock.advance(GRACE)
        self.successResultOf(stopped)
        self.assertEqual([self.on_disk(job.id)["state"] for job in jobs], ["queued", "queued"])

    def test_queuedJobsStayQueued(self) -> None:
        """Jobs waiting at stop do not start; they stay queued and run, in order, at restart."""
        manager = self.manager(stop_grace=GRACE)
        running, waiting = self.submit(manager), self.submit(manager)
        stopped = manager.stopService()
        self.pool.runs[0].fail(JobFailed("formula 'peak' raised KeyError"))
        self.successResultOf(stopped)
        self.assertEqual(self.pool.started(), [running.id])
        self.assertEqual(self.on_disk(waiting.id)["state"], "queued")
        self.manager()
        self.assertEqual(self.pool.started(), [running.id, waiting.id])

    def assertWaitsForNextStart(self, waiter: defer.Deferred[Any], job: Job) -> None:
        """``waiter`` failed Busy naming ``job``, which stays queued, on disk too."""
        error = self.failureResultOf(waiter, Busy).value
        self.assertIn(f"before job {job.id} ended", error.message)
        self.assertIn("the server is back", error.message)
        self.assertEqual((job.state, self.on_disk(job.id)["state"]), ("queued", "queued"))

    def test_waiterOfQueuedJobToldBusy(self) -> None:
        """At stop, a client waiting for a queued job gets Busy naming it; it stays queued."""
        manager = self.manager(stop_grace=GRACE)
        running, queued = self.submit(manager), self.submit(manager)
        waiter = finished(queued)
        manager.stopService()
        self.assertWaitsForNextStart(waiter, queued)
        self.pool.runs[0].succeed()
        self.assertEqual(self.pool.started(), [running.id])
        self.assertEqual(self.on_disk(running.id)["state"], "done")

    def test_jobRecordedAfterStopBeganToldBusy(self) -> None:
        """A job whose record is written after the stop began: its waiting client gets Busy."""
        runner = HeldRunner()
        manager = self.manager(runner, stop_grace=GRACE)
        runner.release()
        recorded: list[Job] = []

        def wait(job: Job) -> defer.Deferred[dict[str, Any]]:
            # What a Dask request does: wait for the job's end once it is recorded.
            recorded.append(job)
            return finished(job)

        waiter = manager.submit(self.spec).addCallback(wait)
        manager.stopService()
        runner.release()
        self.assertWaitsForNextStart(waiter, recorded[0])
        self.assertEqual(self.pool.started(), [])

    def test_stopWaitsForWrites(self) -> None:
        """The stop is over only once the end of every job is written."""
        runner = HeldRunner()
        manager = self.manager(runner, stop_grace=GRACE)
        submitted = manager.submit(self.spec)
        runner.release()
        job = self.successResultOf(submitted)
        stopped = manager.stopService()
        self.pool.runs[0].succeed()
        self.assertNoResult(stopped)
        runner.release()
        self.successResultOf(stopped)
        self.assertEqual(self.on_disk(job.id)["state"], "done")

    def test_nothingRunning(self) -> None:
        """With no job running, the stop is over at once."""
        self.successResultOf(self.manager().stopService())


class RetentionTests(JobsTestCase):
    """Finished jobs are removed keep_jobs days after they ended; results after keep_results."""

    def finished_job(self, keep_jobs: float, keep_results: float | None) -> tuple[str, str]:
        """A done job whose results folder holds a file, ended now; returns its id and folder."""
        manager = self.manager(
            keep_jobs=keep_jobs, keep_results=keep_results, job_timeout=DAY * 1000
        )
        job = self.submit(manager)
        folder = files.result_dir(self.directory, job.id)
        os.makedirs(folder)
        with open(os.path.join(folder, "peak.parquet"), "wb") as f:
            f.write(b"PAR1")
        self.pool.runs[-1].succeed()
        return job.id, folder

    def test_oldJobsRemoved(self) -> None:
        """A finished job is removed within the hour after keep_jobs days; its results stay."""
        manager = self.manager(keep_jobs=30, job_timeout=DAY * 1000)
        done, running = self.submit(manager), self.submit(manager)
        folder = files.result_dir(self.directory, done.id)
        os.makedirs(folder)
        self.pool.runs[0].succeed()
        self.clock.advance(30 * DAY)
        self.assertEqual(self.on_disk(done.id)["state"], "done")
        self.clock.advance(HOUR)
        self.assertIsNone(self.disk.get(done.id))
        self.assertEqual(self.on_disk(running.id)["state"], "running")
        self.assertTrue(os.path.isdir(folder))

    def test_resultsRemovedThenRecord(self) -> None:
        """With keep_results, the results folder goes first; the record goes keep_jobs days on."""
        job, folder = self.finished_job(keep_jobs=30, keep_results=10)
        self.clock.advance(10 * DAY + HOUR)
        self.assertFalse(os.path.exists(folder))
        self.assertEqual(self.on_disk(job)["cleaned"], 1)
        self.assertTrue(os.path.isdir(os.path.dirname(folder)))
        self.clock.advance(20 * DAY)
        self.assertIsNone(self.disk.get(job))

    def test_recordKeptUntilResultsRemoved(self) -> None:
        """A record outlives keep_jobs while its results, kept longer, are still on disk."""
        job, folder = self.finished_job(keep_jobs=30, keep_results=60)
        self.clock.advance(31 * DAY)
        self.assertTrue(os.path.isdir(folder))
        self.assertEqual(self.on_disk(job)["cleaned"], 0)
        self.clock.advance(30 * DAY)
        self.assertFalse(os.path.exists(folder))
        self.assertIsNone(self.disk.get(job))

    def test_sweepAtStart(self) -> None:
        """The first sweep runs as the manager starts."""
        old = Job(id=new_job_id(NOW - 40 * DAY), spec=self.spec, submitted=NOW - 40 * DAY)
        old.state, old.started, old.finished = "done", NOW - 40 * DAY, NOW - 40 * DAY
        self.disk.add(old.record())
        self.manager(keep_jobs=30)
        self.assertIsNone(self.disk.get(old.id))


class HistoryTests(JobsTestCase):
    """The counters of finished jobs come from the database."""

    def test_history(self) -> None:
        """Finished jobs are counted by state, in all and in the last hour, with their mean time."""
        manager = self.manager(workers=4)
        jobs = [self.submit(manager) for _ in range(4)]
        self.clock.advance(1)
        self.pool.runs[0].succeed()
        self.clock.advance(1)
        self.pool.runs[1].fail(JobFailed("formula 'peak' raised KeyError"))
        self.clock.advance(1)
        self.successResultOf(manager.cancel(jobs[2].id))
        self.clock.advance(TIMEOUT - 3)
        every = {"Done": 1, "Failed": 1, "Cancelled": 1, "Timeout": 1}
        self.assertEqual(
            self.successResultOf(self.queries.history()),
            {"Total": every, "LastHour": every, "MeanSeconds": 16.5},
        )
        self.clock.advance(2 * HOUR)
        self.submit(manager)
        self.clock.advance(4)
        self.pool.runs[4].succeed()
        history = self.successResultOf(self.queries.history())
        self.assertEqual(history["Total"], {**every, "Done": 2})
        self.assertEqual(
            history["LastHour"], {"Done": 1, "Failed": 0, "Cancelled": 0, "Timeout": 0}
        )
        self.assertEqual(history["MeanSeconds"], 14.0)
