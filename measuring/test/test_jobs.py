"""
Tests for ``measuring.jobs``: the queue, the limit on running jobs, the time limit, the outcomes.

The pool is an honest fake that behaves like ``measuring.pool.WorkerPool`` seen from outside: each
``run`` gives a job whose ``result`` fires when the test says the job ended, and whose ``kill``
fails it with the reason. Time is a ``task.Clock``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, task
from twisted.trial.unittest import SynchronousTestCase

from measuring import loader
from measuring.errors import Busy, Cancelled, Internal, JobFailed, MeasuringError, Timeout
from measuring.jobs import JobManager, JobSpec, new_job_id
from measuring.loader import JobPaths
from measuring.messages import Message
from measuring.stats import Stats

TIMEOUT = 60.0


class FakeRunningJob:
    """A job handed to ``FakePool``; the test ends it with ``succeed`` or ``fail``."""

    def __init__(self, message: Message) -> None:
        self.message = message
        self.result: defer.Deferred[dict[str, Any]] = defer.Deferred()
        self.killed_with: MeasuringError | None = None

    def kill(self, reason: MeasuringError) -> None:
        """Like the real RunningJob: a job killed before its end fails with ``reason``."""
        if self.result.called:
            return
        self.killed_with = reason
        self.fail(reason)

    def succeed(self, results: dict[str, Any], log: str = "") -> None:
        self.result.callback({"Results": results, "Log": log})

    def fail(self, reason: MeasuringError, log: str = "") -> None:
        reason.extra.setdefault("Log", log)
        self.result.errback(reason)


class FakePool:
    """Records every job it is asked to run."""

    def __init__(self) -> None:
        self.runs: list[FakeRunningJob] = []

    def run(self, message: Message) -> FakeRunningJob:
        running = FakeRunningJob(message)
        self.runs.append(running)
        return running

    def started(self) -> list[str]:
        """The ids of the jobs run so far, in the order they were started."""
        return [running.message["Job"] for running in self.runs]


class RecordingRunner:
    """Runs blocking calls at once, like ``threads.Synchronous``, and remembers each one."""

    def __init__(self) -> None:
        self.calls: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []

    def run(self, f: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        self.calls.append((f, args))
        return defer.maybeDeferred(f, *args)


class JobManagerTestCase(SynchronousTestCase):
    """A JobManager over a fake pool, a clock at a fixed time and a folder of its own."""

    def setUp(self) -> None:
        self.clock = task.Clock()
        self.clock.advance(1_800_000_000)
        self.pool = FakePool()
        self.stats = Stats()
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

    def manager(self, workers: int = 1) -> JobManager:
        return JobManager(self.pool, self.clock, workers, TIMEOUT, self.stats, self.blocking)


class QueueTests(JobManagerTestCase):
    """Jobs start in the order they arrive, never more than ``workers`` at once."""

    def test_firstJobStartsAtOnce(self) -> None:
        """A job submitted to an idle manager runs at once, with its Job message."""
        job = self.manager().submit(self.spec)
        self.assertEqual(job.state, "running")
        self.assertEqual(job.started, self.clock.seconds())
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

    def test_atMostWorkersRun(self) -> None:
        """With two workers, two of four jobs run and two wait."""
        manager = self.manager(workers=2)
        jobs = [manager.submit(self.spec) for _ in range(4)]
        self.assertEqual(self.pool.started(), [jobs[0].id, jobs[1].id])
        self.assertEqual([job.state for job in jobs], ["running", "running", "queued", "queued"])
        self.assertEqual(manager.counts(), {"Running": 2, "Queued": 2})

    def test_jobsRunInArrivalOrder(self) -> None:
        """Each job that ends lets the next one in arrival order start, one at a time."""
        manager = self.manager()
        jobs = [manager.submit(self.spec) for _ in range(3)]
        self.assertEqual(self.pool.started(), [jobs[0].id])
        self.pool.runs[0].succeed({})
        self.assertEqual(self.pool.started(), [jobs[0].id, jobs[1].id])
        self.pool.runs[1].fail(JobFailed("formula 'peak' raised ValueError"))
        self.assertEqual(self.pool.started(), [job.id for job in jobs])
        self.assertEqual(manager.counts(), {"Running": 1, "Queued": 0})

    def test_jobIdsSortByTime(self) -> None:
        """A job id is its UTC submission time and a random suffix."""
        self.assertRegex(new_job_id(1_800_000_000), r"^20270115-080000-[0-9a-f]{6}$")
        job = self.manager().submit(self.spec)
        self.assertRegex(job.id, r"^20270115-080000-[0-9a-f]{6}$")

    def test_stopCancelsQueuedJobs(self) -> None:
        """Stopping the manager cancels the jobs still waiting; the running one goes on."""
        manager = self.manager()
        manager.startService()
        running, queued = manager.submit(self.spec), manager.submit(self.spec)
        manager.stopService()
        error = self.failureResultOf(queued.when_finished(), Cancelled).value
        self.assertEqual((error.code, error.extra["Job"]), ("Cancelled", queued.id))
        self.assertEqual(queued.state, "cancelled")
        self.assertEqual(running.state, "running")
        self.assertEqual(self.pool.started(), [running.id])

    def test_stoppingRefusesNewJobs(self) -> None:
        """Once stopping, a new job is refused with Busy instead of waiting forever."""
        manager = self.manager()
        manager.startService()
        manager.stopService()
        error = self.assertRaises(Busy, manager.submit, self.spec)
        self.assertIn("the server is stopping", error.message)
        self.assertEqual(self.pool.started(), [])


class OutcomeTests(JobManagerTestCase):
    """What a job's end makes of it: its state, its answer, its error."""

    def test_successAnswersResultsLogAndElapsed(self) -> None:
        """A job that succeeds answers its Results, Log and the seconds it ran."""
        job = self.manager().submit(self.spec)
        finished = job.when_finished()
        self.clock.advance(2.5)
        self.pool.runs[0].succeed({"peak": {"Kind": "Scalar", "Value": 41.5}}, log="hello\n")
        response = {"Results": {"peak": {"Kind": "Scalar", "Value": 41.5}}, "Log": "hello\n"}
        self.assertEqual(self.successResultOf(finished), {**response, "Elapsed": 2.5})
        self.assertEqual(self.successResultOf(job.when_finished()), {**response, "Elapsed": 2.5})
        self.assertEqual((job.state, job.finished), ("done", self.clock.seconds()))

    def test_elapsedCountsFromStart(self) -> None:
        """Elapsed is how long a job ran, not how long it also waited in the queue."""
        manager = self.manager()
        first, second = manager.submit(self.spec), manager.submit(self.spec)
        self.clock.advance(5)
        self.pool.runs[0].succeed({})
        self.clock.advance(3)
        self.pool.runs[1].succeed({})
        self.assertEqual(self.successResultOf(first.when_finished())["Elapsed"], 5.0)
        self.assertEqual(self.successResultOf(second.when_finished())["Elapsed"], 3.0)

    def test_poolFailureFailsTheJob(self) -> None:
        """A job the pool fails is "failed", its error carrying the Job id and the Log."""
        job = self.manager().submit(self.spec)
        finished = job.when_finished()
        self.pool.runs[0].fail(JobFailed("formula 'peak' raised KeyError"), log="Traceback...")
        error = self.failureResultOf(finished, JobFailed).value
        self.assertEqual(job.state, "failed")
        self.assertIs(job.error, error)
        self.assertEqual(error.to_json(), {"Code": "JobFailed", "Message": error.message})
        self.assertEqual(error.message, "formula 'peak' raised KeyError")
        self.assertEqual(error.extra, {"Job": job.id, "Log": "Traceback..."})

    def test_unexpectedFailureIsInternal(self) -> None:
        """A failure that is not a protocol error becomes Internal, and is logged."""
        job = self.manager().submit(self.spec)
        self.pool.runs[0].result.errback(RuntimeError("a bug in the pool"))
        error = self.failureResultOf(job.when_finished(), Internal).value
        self.assertEqual(job.state, "failed")
        self.assertEqual(error.extra["Job"], job.id)
        self.assertNotIn("a bug in the pool", error.message)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_cancelledJob(self) -> None:
        """A job that ends Cancelled is "cancelled"."""
        job = self.manager().submit(self.spec)
        self.pool.runs[0].kill(Cancelled("the job was cancelled"))
        self.failureResultOf(job.when_finished(), Cancelled)
        self.assertEqual(job.state, "cancelled")

    def test_failureRemovesPartialResults(self) -> None:
        """After a failed job, what it half-wrote is removed, through the blocking runner."""
        job = self.manager().submit(self.spec)
        partial = loader.partial_dir(self.directory, job.id)
        os.makedirs(partial)
        self.pool.runs[0].fail(JobFailed("the worker process exited with code 3"))
        self.assertEqual(self.blocking.calls, [(loader.remove_partial, (self.directory, job.id))])
        self.assertFalse(os.path.exists(partial))

    def test_successLeavesResults(self) -> None:
        """A job that succeeds runs no cleanup."""
        self.manager().submit(self.spec)
        self.pool.runs[0].succeed({})
        self.assertEqual(self.blocking.calls, [])

    def test_statsCountFinishedJobsByState(self) -> None:
        """Stats count finished jobs by how they ended, and their mean duration."""
        manager = self.manager(workers=3)
        for _ in range(3):
            manager.submit(self.spec)
        done, failed, slow = self.pool.runs
        self.clock.advance(1.0)
        done.succeed({})
        self.clock.advance(1.0)
        failed.fail(JobFailed("formula 'peak' raised KeyError"))
        self.clock.advance(TIMEOUT - 2.0)
        self.assertIsInstance(slow.killed_with, Timeout)
        self.assertEqual(dict(self.stats.jobs), {"done": 1, "failed": 1, "timeout": 1})
        jobs = self.stats.snapshot()["Jobs"]
        self.assertEqual(jobs["Finished"], 3)
        self.assertEqual(jobs["MeanSeconds"], round((1.0 + 2.0 + TIMEOUT) / 3, 3))


class TimeLimitTests(JobManagerTestCase):
    """A running job is killed once it has run longer than ``job_timeout``."""

    def test_jobPastItsLimitIsKilled(self) -> None:
        """A job still running at its limit is killed with Timeout and ends "timeout"."""
        job = self.manager().submit(self.spec)
        self.clock.advance(TIMEOUT - 0.001)
        self.assertIsNone(self.pool.runs[0].killed_with)
        self.clock.advance(0.001)
        error = self.failureResultOf(job.when_finished(), Timeout).value
        self.assertIs(self.pool.runs[0].killed_with, error)
        self.assertEqual(job.state, "timeout")
        self.assertEqual(error.code, "Timeout")
        self.assertIn("60 s", error.message)
        self.assertEqual(error.extra["Job"], job.id)
        self.assertEqual(self.stats.jobs["timeout"], 1)

    def test_limitCountsFromStart(self) -> None:
        """A job that waited in the queue gets its whole limit once it starts."""
        manager = self.manager()
        first, second = manager.submit(self.spec), manager.submit(self.spec)
        self.clock.advance(TIMEOUT / 2)
        self.pool.runs[0].succeed({})
        self.clock.advance(TIMEOUT - 1)
        self.assertEqual((first.state, second.state), ("done", "running"))
        self.clock.advance(1)
        self.assertEqual(second.state, "timeout")

    def test_finishedJobIsNotKilled(self) -> None:
        """A job that ends in time is not killed later, and leaves no timer behind."""
        job = self.manager().submit(self.spec)
        self.pool.runs[0].succeed({})
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(TIMEOUT * 2)
        self.assertIsNone(self.pool.runs[0].killed_with)
        self.assertEqual(job.state, "done")

    def test_timeoutStartsTheNextJob(self) -> None:
        """A job killed at its limit lets the next waiting job start."""
        manager = self.manager()
        first, second = manager.submit(self.spec), manager.submit(self.spec)
        self.clock.advance(TIMEOUT)
        self.assertEqual(self.pool.started(), [first.id, second.id])
        self.assertEqual(manager.counts(), {"Running": 1, "Queued": 0})
