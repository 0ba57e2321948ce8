"""
Jobs: their records, the queue, the limit on how many run at once, and their time limit.

``JobManager.submit`` takes a checked ``JobSpec``, queues it in arrival order and starts it in the
worker pool once fewer than ``workers`` jobs run. Time comes from the injected clock. Nothing here
touches files or processes directly: the pool runs jobs, a thread runner cleans up after them.
"""

from __future__ import annotations

import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from measuring import loader
from measuring.errors import Busy, Cancelled, Internal, MeasuringError, Timeout
from measuring.loader import JobPaths
from measuring.messages import Message
from measuring.stats import Stats
from measuring.threads import Runner


class RunningJob(Protocol):
    """What the pool gives back for a job it runs (``measuring.pool.RunningJob``)."""

    result: defer.Deferred[dict[str, Any]]

    def kill(self, reason: MeasuringError) -> None: ...


class Pool(Protocol):
    """Where jobs run (``measuring.pool.WorkerPool``)."""

    def run(self, message: Message) -> RunningJob: ...


@dataclass(frozen=True)
class JobSpec:
    """A checked Dask request: what to run, on what, and how to write it."""

    paths: JobPaths
    functions: tuple[str, ...] | None = None
    output: str = "parquet"
    engine: str = "pyarrow"

    def message(self, job: str) -> Message:
        """The Job message a worker process runs."""
        return {
            "Type": "Job",
            "Job": job,
            "Directory": self.paths.directory,
            "Base": self.paths.base,
            "File": self.paths.file,
            "Functions": list(self.functions) if self.functions is not None else None,
            "Output": self.output,
            "Engine": self.engine,
        }


@dataclass
class Job:
    """One job and what became of it; times are seconds since the epoch."""

    id: str
    spec: JobSpec
    submitted: float
    state: str = "queued"
    started: float | None = None
    finished: float | None = None
    response: dict[str, Any] | None = None
    error: MeasuringError | None = None
    _waiting: list[defer.Deferred[dict[str, Any]]] = field(default_factory=list, repr=False)

    def when_finished(self) -> defer.Deferred[dict[str, Any]]:
        """Fires with the job's Response once it is done, or fails with its error."""
        if self.response is not None:
            return defer.succeed(self.response)
        if self.error is not None:
            return defer.fail(self.error)
        waiting: defer.Deferred[dict[str, Any]] = defer.Deferred()
        self._waiting.append(waiting)
        return waiting

    def settle(
        self, state: str, response: dict[str, Any] | None, error: MeasuringError | None
    ) -> None:
        self.state, self.response, self.error = state, response, error
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            if error is not None:
                d.errback(error)
            elif response is not None:
                d.callback(response)


def new_job_id(now: float) -> str:
    """A job id that sorts by submission time: ``20261128-084150-3f9a2c`` (UTC)."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime(now)) + "-" + secrets.token_hex(3)


_STATES = {Timeout: "timeout", Cancelled: "cancelled"}


class JobManager(Service):
    """Queues jobs in arrival order and runs at most ``workers`` of them at once."""

    _log = Logger()

    def __init__(
        self,
        pool: Pool,
        clock: IReactorTime,
        workers: int,
        job_timeout: float,
        stats: Stats,
        blocking: Runner,
    ) -> None:
        self._pool = pool
        self._clock = clock
        self._workers = workers
        self._job_timeout = job_timeout
        self._stats = stats
        self._blocking = blocking
        self._queue: deque[Job] = deque()
        self._running: dict[str, RunningJob] = {}
        self._stopping = False

    def stopService(self) -> None:
        super().stopService()
        self._stopping = True
        while self._queue:
            job = self._queue.popleft()
            job.settle("cancelled", None, Cancelled("the server is stopping", Job=job.id))

    def counts(self) -> dict[str, int]:
        """How many jobs run and how many wait."""
        return {"Running": len(self._running), "Queued": len(self._queue)}

    def submit(self, spec: JobSpec) -> Job:
        """Queue a job; it starts as soon as fewer than ``workers`` jobs run."""
        if self._stopping:
            raise Busy("the server is stopping; send the job again once it is back")
        job = Job(id=new_job_id(self._clock.seconds()), spec=spec, submitted=self._clock.seconds())
        self._queue.append(job)
        self._log.info(
            "job {job} queued: {file} on {base}",
            job=job.id,
            file=spec.paths.file,
            base=spec.paths.base,
        )
        self._start_next()
        return job

    def _start_next(self) -> None:
        while self._queue and len(self._running) < self._workers:
            job = self._queue.popleft()
            job.state = "running"
            job.started = self._clock.seconds()
            running = self._pool.run(job.spec.message(job.id))
            self._running[job.id] = running
            timer = self._clock.callLater(
                self._job_timeout,
                running.kill,
                Timeout(
                    f"the job ran longer than its limit of {self._job_timeout:g} s and was stopped"
                ),
            )
            running.result.addBoth(self._finished, job, timer)

    def _finished(self, outcome: dict[str, Any] | Failure, job: Job, timer: IDelayedCall) -> None:
        if timer.active():
            timer.cancel()
        del self._running[job.id]
        job.finished = self._clock.seconds()
        elapsed = round(job.finished - (job.started or job.finished), 3)
        if isinstance(outcome, Failure):
            error = outcome.value
            if not isinstance(error, MeasuringError):
                self._log.failure("job {job} failed inside the server", outcome, job=job.id)
                error = Internal("the server failed running this job; see its log")
            error.extra = {"Job": job.id, **error.extra}
            state = _STATES.get(type(error), "failed")
            job.settle(state, None, error)
            self._blocking.run(loader.remove_partial, job.spec.paths.directory, job.id).addErrback(
                lambda f: self._log.failure("cleaning up after job {job}", f, job=job.id)
            )
            self._log.info(
                "job {job} {state}: {message}", job=job.id, state=state, message=error.message
            )
        else:
            job.settle("done", {**outcome, "Elapsed": elapsed}, None)
            self._log.info("job {job} done in {elapsed} s", job=job.id, elapsed=elapsed)
        self._stats.job_finished(job.state, elapsed)
        self._start_next()
