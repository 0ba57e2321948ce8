"""
Tests for ``measuring.server.jobs.scheduler``: the queue, its limits, and how a job's end is written
down before anyone is told. Here too the fakes that ``test_jobs_answers``, ``test_jobs_life`` and
``test_dispatch`` share.

The job records live in the real job database (SQLite in a temporary folder, through the real
``JobStore``); the tests read what is on disk with a connection of their own. The worker pool is an
honest fake that behaves like ``measuring.server.pool.pool.WorkerPool`` seen from outside: each
``run`` gives a job whose ``result`` fires when the test says the job ended. Time is a
``task.Clock``.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import defer, task
from twisted.trial.unittest import SynchronousTestCase

from measuring import files
from measuring.errors import (
    Busy,
    Cancelled,
    Internal,
    JobFailed,
    MemoryLimit,
)
from measuring.server.jobs.queries import JobQueries
from measuring.server.jobs.records import Job, JobSpec, Outcome, new_job_id
from measuring.server.jobs.retention import Retention
from measuring.server.jobs.scheduler import Scheduler
from measuring.server.jobs.store import JobDatabase, JobStore
from measuring.server.paths import JobPaths
from measuring.server.threads import Runner, Synchronous
from measuring.test.support.fakes import (
    FakePool,
    HeldRunner,
    RecordingRunner,
    finished,
    limits,
)

NOW = 1_800_000_000.0  # 2027-01-15 08:00:00 UTC
TIMEOUT = 60.0


class JobsTestCase(SynchronousTestCase):
    """Schedulers over a fake pool, a clock, and a job database in a folder of the test's own."""

    def setUp(self) -> None:
        self.clock = task.Clock()
        self.clock.advance(NOW)
        self.pool = FakePool()
        self.blocking = RecordingRunner()
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.spec = JobSpec(
            JobPaths(
                self.directory,
                os.path.join(self.directory, "time_series.parquet"),
                os.path.join(self.directory, "work.py"),
            )
        )
        self.path = os.path.abspath(self.mktemp()) + ".sqlite"
        self.disk = JobDatabase(self.path)
        self.addCleanup(self.disk.close)

    def manager(
        self, runner: Runner | None = None, blocking: Runner | None = None, **overrides: Any
    ) -> Scheduler:
        """
        A started Scheduler (one worker, TIMEOUT unless told) on the test's database; its store
        runs on ``runner``, its blocking calls on ``blocking`` (``self.blocking`` unless told).
        """
        database = JobDatabase(self.path)
        self.addCleanup(database.close)
        store = JobStore(database, Synchronous() if runner is None else runner)
        held = limits(**{"workers": 1, "job_timeout": TIMEOUT, **overrides})
        blocking = self.blocking if blocking is None else blocking
        manager = Scheduler(self.pool, store, self.clock, held, blocking)
        manager.startService()
        self.queries = JobQueries(manager, store, self.clock, blocking, held)
        self.retention = Retention(store, self.clock, held, blocking)
        self.retention.startService()
        self.addCleanup(self.retention.stopService)
        return manager

    def ask(self, **overrides: Any) -> JobQueries:
        """The read side of a started Scheduler (``manager``)."""
        self.manager(**overrides)
        return self.queries

    def submit(self, manager: Scheduler, spec: JobSpec | None = None) -> Job:
        """Submit a job and return it, recorded."""
        return self.successResultOf(manager.submit(self.spec if spec is None else spec))

    def watch(self, job: Job) -> tuple[defer.Deferred[dict[str, Any]], list[dict[str, Any]]]:
        """The job's end, and a list that gets its record as on disk when waiters are told."""
        seen: list[dict[str, Any]] = []

        def told(outcome: Any) -> Any:
            seen.append(self.on_disk(job.id))
            return outcome

        return finished(job).addBoth(told), seen

    def on_disk(self, job: str) -> dict[str, Any]:
        """The job's record as the database holds it."""
        record = self.disk.get(job)
        self.assertIsNotNone(record, f"job {job} is not on disk")
        assert record is not None
        return record


class QueueTests(JobsTestCase):
    """Jobs are recorded, then start in the order they arrive, never more than ``workers``."""

    def test_firstJobStartsAtOnce(self) -> None:
        """A job submitted to an idle manager runs at once, with its Job message, noted on disk."""
        job = self.submit(self.manager())
        self.assertEqual((job.state, job.started, job.attempts), ("running", NOW, 1))
        self.assertEqual(
            self.pool.runs[0].message,
            {
                "Type": "Job",
                "Job": job.id,
                "Directory": self.directory,
                "Base": os.path.join(self.directory, "time_series.parquet"),
                "File": os.path.join(self.directory, "work.py"),
                "Functions": None,
                "Output": "parquet",
                "Engine": "pyarrow",
            },
        )
        record = self.on_disk(job.id)
        self.assertEqual(
            (record["state"], record["started"], record["attempts"]), ("running", NOW, 1)
        )

    def test_submitFiresOnceRecorded(self) -> None:
        """submit fires only once the job's record is committed, and the job is queued on disk."""
        runner = HeldRunner()
        manager = self.manager(runner)
        runner.release()
        submitted = manager.submit(self.spec)
        self.assertNoResult(submitted)
        self.assertEqual(self.disk.recent(None, 10), [])
        runner.step()
        job = self.successResultOf(submitted)
        record = self.on_disk(job.id)
        self.assertEqual((record["state"], record["submitted"]), ("queued", NOW))
        self.assertEqual(record["spec"], self.spec.to_json())
        runner.release()
        self.assertEqual(self.on_disk(job.id)["state"], "running")

    def test_atMostWorkersRun(self) -> None:
        """With two workers, two of four jobs run and two wait, on disk too."""
        manager = self.manager(workers=2)
        jobs = [self.submit(manager) for _ in range(4)]
        self.assertEqual(self.pool.started(), [jobs[0].id, jobs[1].id])
        self.assertEqual(
            [self.on_disk(job.id)["state"] for job in jobs],
            ["running", "running", "queued", "queued"],
        )
        self.assertEqual(manager.counts(), {"Running": 2, "Queued": 2})

    def test_jobsRunInArrivalOrder(self) -> None:
        """Each job that ends lets the next one in arrival order start, one at a time."""
        manager = self.manager()
        jobs = [self.submit(manager) for _ in range(3)]
        self.assertEqual(self.pool.started(), [jobs[0].id])
        self.pool.runs[0].succeed()
        self.assertEqual(self.pool.started(), [jobs[0].id, jobs[1].id])
        self.pool.runs[1].fail(JobFailed("formula 'peak' raised ValueError"))
        self.assertEqual(self.pool.started(), [job.id for job in jobs])
        self.assertEqual(manager.counts(), {"Running": 1, "Queued": 0})

    def test_busyAtMaxQueued(self) -> None:
        """With max_queued jobs waiting, a new one is Busy at once and is not recorded."""
        manager = self.manager(max_queued=2)
        for _ in range(3):
            self.submit(manager)
        error = self.assertRaises(Busy, manager.submit, self.spec)
        self.assertIn("2 jobs are waiting already", error.message)
        self.assertIn("--max-queued 2", error.message)
        self.assertEqual(len(self.disk.recent(None, 10)), 3)
        self.pool.runs[0].succeed()
        self.submit(manager)
        self.assertEqual(manager.counts(), {"Running": 1, "Queued": 2})

    def test_busyWhenStopping(self) -> None:
        """Once stopping, a new job is Busy instead of waiting forever, and is not recorded."""
        manager = self.manager()
        manager.stopService()
        error = self.assertRaises(Busy, manager.submit, self.spec)
        self.assertIn("the server is stopping", error.message)
        self.assertEqual((self.pool.started(), self.disk.recent(None, 10)), ([], []))

    def test_jobIdsSortByTime(self) -> None:
        """A job id is its UTC submission time and a random suffix."""
        self.assertRegex(new_job_id(NOW), r"^20270115-080000-[0-9a-f]{6}$")
        self.assertRegex(self.submit(self.manager()).id, r"^20270115-080000-[0-9a-f]{6}$")


class OutcomeTests(JobsTestCase):
    """How a job ends is on disk before those waiting for it are told."""

    def test_successWrittenBeforeWaitersAreTold(self) -> None:
        """A waiter told of success finds the job done on disk, its log in a column of its own."""
        job = self.submit(self.manager())
        finished, seen = self.watch(job)
        self.clock.advance(2.5)
        self.pool.runs[0].print("hello\n")
        self.pool.runs[0].succeed({"peak": {"Kind": "Scalar", "Value": 41.5}})
        results = {"peak": {"Kind": "Scalar", "Value": 41.5}}
        self.assertEqual(
            self.successResultOf(finished), {"Results": results, "Log": "hello\n", "Elapsed": 2.5}
        )
        [record] = seen
        self.assertEqual(
            (record["state"], record["finished"], record["response"], record["log"]),
            ("done", NOW + 2.5, {"Results": results, "Elapsed": 2.5}, "hello\n"),
        )
        self.assertIsNone(record["error"])

    def test_waitersToldOnlyOnceWritten(self) -> None:
        """While the end of a job is being written, those waiting for it hear nothing yet."""
        runner = HeldRunner()
        manager = self.manager(runner)
        submitted = manager.submit(self.spec)
        runner.release()
        job = self.successResultOf(submitted)
        ending = finished(job)
        self.pool.runs[0].succeed()
        self.assertNoResult(ending)
        self.assertEqual(self.on_disk(job.id)["state"], "running")
        runner.release()
        self.successResultOf(ending)
        self.assertEqual(self.on_disk(job.id)["state"], "done")

    def test_endStatesOnDisk(self) -> None:
        """Each way a job fails gives its state and its error on disk, then to its waiters."""
        manager = self.manager()
        for error, state in [
            (JobFailed("formula 'peak' raised KeyError"), "failed"),
            (MemoryLimit("the job used 3.1 GB, more than --job-memory 2 GB"), "failed"),
            (Cancelled("the job was cancelled"), "cancelled"),
        ]:
            job = self.submit(manager)
            finished, seen = self.watch(job)
            self.pool.runs[-1].print("Traceback ...\n")
            self.pool.runs[-1].fail(error)
            told = self.failureResultOf(finished, type(error)).value
            self.assertIs(told, error)
            self.assertEqual(job.log, "Traceback ...\n")
            [record] = seen
            self.assertEqual(
                (record["state"], record["error"], record["log"], record["response"]),
                (state, error.to_json(), "Traceback ...\n", None),
            )

    def test_unexpectedFailureIsInternal(self) -> None:
        """A failure that is not a protocol error is logged and becomes Internal, "failed"."""
        job = self.submit(self.manager())
        self.pool.runs[0].result.errback(RuntimeError("a bug in the pool"))
        error = self.failureResultOf(finished(job), Internal).value
        self.assertNotIn("a bug in the pool", error.message)
        self.assertEqual(self.on_disk(job.id)["error"], error.to_json())
        self.assertEqual(self.on_disk(job.id)["state"], "failed")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_faultWhileEndingIsInternal(self) -> None:
        """A fault ending a job (Results not a dict) ends it "failed", Internal; the next starts."""
        manager = self.manager()
        job, following = self.submit(manager), self.submit(manager)
        broken = Outcome([{"Kind": "Scalar"}], None, "printed\n")  # type: ignore[arg-type]
        self.pool.runs[0].result.callback(broken)
        error = self.failureResultOf(finished(job), Internal).value
        self.assertEqual(error.message, "the server failed ending this job; see its log")
        record = self.on_disk(job.id)
        self.assertEqual((record["state"], record["error"]), ("failed", error.to_json()))
        self.assertEqual(len(self.flushLoggedErrors(AttributeError)), 1)
        self.assertEqual(self.pool.started(), [job.id, following.id])
        self.assertEqual(manager.counts(), {"Running": 1, "Queued": 0})

    def test_failureRemovesPartialResults(self) -> None:
        """After a failed job, what it half-wrote is removed, through the blocking runner."""
        job = self.submit(self.manager())
        partial = files.partial_dir(self.directory, job.id)
        os.makedirs(partial)
        self.pool.runs[0].fail(JobFailed("the worker process exited with code 3"))
        self.assertIn((files.remove_partial, (self.directory, job.id)), self.blocking.calls)
        self.assertFalse(os.path.exists(partial))

    def test_elapsedCountsFromStart(self) -> None:
        """Elapsed is how long a job ran, not how long it also waited in the queue."""
        manager = self.manager()
        first, second = self.submit(manager), self.submit(manager)
        self.clock.advance(5)
        self.pool.runs[0].succeed()
        self.clock.advance(3)
        self.pool.runs[1].succeed()
        self.assertEqual(self.successResultOf(finished(first))["Elapsed"], 5.0)
        self.assertEqual(self.successResultOf(finished(second))["Elapsed"], 3.0)
