"""
Jobs from submission to their end: the queue, the limits, the durable records.

``JobManager.submit`` records a checked ``JobSpec`` in the job database (committed, synced) and
queues it; jobs start in arrival order while fewer than ``workers`` run, each with a time limit.
A job's end is written to the database before anyone is told. At start, jobs a crash interrupted
are queued again; on stop, running jobs get a grace period, then run again at the next start.
Time comes from the injected clock; blocking work goes to the store's thread or ``blocking``.
"""

from __future__ import annotations

import shutil
from collections import deque
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from measuring import files
from measuring.errors import (
    Busy,
    Cancelled,
    Internal,
    MeasuringError,
    NotFound,
    Timeout,
)
from measuring.messages import Message
from measuring.server import results
from measuring.server.jobs.records import Job, JobSpec, Progress, new_job_id, stored_response
from measuring.server.threads import Runner

MOST_INTERRUPTIONS = 3
SWEEP_EVERY = 3600.0
DAY = 86400.0
_STATES = {Timeout: "timeout", Cancelled: "cancelled"}

__all__ = ["Job", "JobManager", "JobSpec", "Limits"]


class RunningJob(Protocol):
    """What the pool gives back for a job it runs (``measuring.server.pool.process.RunningJob``)."""

    result: defer.Deferred[dict[str, Any]]
    on_progress: Progress | None

    def kill(self, reason: MeasuringError) -> None: ...

    def log_text(self) -> str: ...


class Pool(Protocol):
    """Where jobs run (``measuring.server.pool.pool.WorkerPool``)."""

    def run(self, message: Message) -> RunningJob: ...


class Store(Protocol):
    """Where job records live (``measuring.server.jobs.store.JobStore``)."""

    def add(self, record: dict[str, Any]) -> defer.Deferred[None]: ...

    def update(self, job: str, **fields: Any) -> defer.Deferred[None]: ...

    def get(self, job: str) -> defer.Deferred[dict[str, Any] | None]: ...

    def recent(self, state: str | None, limit: int) -> defer.Deferred[list[dict[str, Any]]]: ...

    def recover(self, most: int, now: float) -> defer.Deferred[list[dict[str, Any]]]: ...

    def expired_results(self, before: float) -> defer.Deferred[list[dict[str, Any]]]: ...

    def mark_cleaned(self, jobs: list[str]) -> defer.Deferred[None]: ...

    def sweep(self, before: float, cleaned_only: bool) -> defer.Deferred[int]: ...

    def counters(self, since: float) -> defer.Deferred[dict[str, Any]]: ...


@dataclass(frozen=True)
class Limits:
    """
    How much work the server takes on, and how long it keeps what is done: the settings of the
    same names (``measuring.server.settings``), which also hold their defaults.
    """

    workers: int
    job_timeout: float
    max_queued: int
    stop_grace: float
    keep_jobs: float
    keep_results: float | None


def remove_results(directory: str, job: str) -> None:
    """Remove a job's result folder and anything half-written it left."""
    shutil.rmtree(files.result_dir(directory, job), ignore_errors=True)
    files.remove_partial(directory, job)


def _waits_for_next_start(job: Job) -> Busy:
    """What a client waiting for ``job`` hears when the server stops before it ends."""
    return Busy(
        f"the server is stopping before job {job.id} ended; it runs (again) from the start when "
        f"the server is back (ask for it with a Job Status request)",
        Job=job.id,
    )


class JobManager(Service):
    """Records, queues and runs jobs, and answers for them."""

    _log = Logger()

    def __init__(
        self, pool: Pool, store: Store, clock: IReactorTime, limits: Limits, blocking: Runner
    ) -> None:
        self._pool = pool
        self._store = store
        self._clock = clock
        self.limits = limits
        self._blocking = blocking
        self._live: dict[str, Job] = {}
        self._queue: deque[Job] = deque()
        self._running: dict[str, RunningJob] = {}
        self._recording = 0
        self._recovered = False
        self._after_recovery: list[defer.Deferred[None]] = []
        self._broken: str | None = None
        self._stopping = False
        self._again: set[str] = set()
        self._writes: set[defer.Deferred[Any]] = set()
        self._sweeper = task.LoopingCall(self.sweep)
        self._sweeper.clock = clock

    # -- start and stop

    def startService(self) -> None:
        super().startService()
        recovering = self._store.recover(MOST_INTERRUPTIONS, self._clock.seconds())
        recovering.addCallbacks(self._requeue, self._unrecovered)
        self._sweeper.start(SWEEP_EVERY, now=True)

    def _requeue(self, records: list[dict[str, Any]]) -> defer.Deferred[None]:
        jobs = [Job.from_record(record) for record in records]
        for job in jobs:
            self._live[job.id] = job
        if jobs:
            self._log.info("{n} jobs queued from before the last stop", n=len(jobs))
        # What their interrupted runs half-wrote goes before they run again.
        done = defer.DeferredList([self._remove_partial(job) for job in jobs], consumeErrors=True)
        return done.addCallback(lambda _: self._queued_again(jobs))

    def _queued_again(self, jobs: list[Job]) -> None:
        self._queue = deque([*jobs, *self._queue])
        self._recovered = True
        waiting, self._after_recovery = self._after_recovery, []
        for d in waiting:
            d.callback(None)
        self._start_next()

    def _unrecovered(self, reason: Failure) -> None:
        self._log.failure("reading the job database at start", reason)
        self._broken = "the job database could not be read at start; see the server's log"
        waiting, self._after_recovery = self._after_recovery, []
        for d in waiting:
            d.errback(Internal(self._broken))

    def stopService(self) -> defer.Deferred[None]:
        """Stop starting jobs; give running ones ``stop_grace`` seconds, then stop them too."""
        super().stopService()
        self._stopping = True
        if self._sweeper.running:
            self._sweeper.stop()
        for job in self._queue:
            job.interrupt(_waits_for_next_start(job))
        running = list(self._running.values())
        if running:
            self._log.info(
                "waiting up to {grace} s for {n} running jobs",
                grace=self.limits.stop_grace,
                n=len(running),
            )
        timer = self._clock.callLater(self.limits.stop_grace, self._stop_running)
        ended = defer.DeferredList([job.result for job in running], consumeErrors=True)

        def stopped(_: object) -> defer.Deferred[Any]:
            if timer.active():
                timer.cancel()
            return defer.DeferredList(list(self._writes), consumeErrors=True)

        return ended.addBoth(stopped).addCallback(lambda _: None)

    def _stop_running(self) -> None:
        for job, running in list(self._running.items()):
            self._again.add(job)
            running.kill(Cancelled("the server is stopping; the job runs again when it is back"))

    def _track(self, write: defer.Deferred[Any]) -> defer.Deferred[Any]:
        """Keep ``write`` until it is done, so that a stop waits for it; log if it fails."""
        self._writes.add(write)

        def done(result: object) -> object:
            self._writes.discard(write)
            if isinstance(result, Failure):
                self._log.failure("writing a job record", result)
                return None
            return result

        return write.addBoth(done)

    # -- submitting and running

    def submit(self, spec: JobSpec) -> defer.Deferred[Job]:
        """Record a job (committed to disk) and queue it; fires with the Job once recorded."""
        if self._stopping:
            raise Busy("the server is stopping; send the job again once it is back")
        if self._broken is not None:
            raise Internal(self._broken)
        waiting = len(self._queue) + self._recording
        if waiting >= self.limits.max_queued:
            raise Busy(
                f"{waiting} jobs are waiting already, as many as this server queues "
                f"(--max-queued {self.limits.max_queued}); send it again later"
            )
        now = self._clock.seconds()
        job = Job(id=new_job_id(now), spec=spec, submitted=now)
        self._recording += 1

        def recorded(_: object) -> Job:
            self._recording -= 1
            self._live[job.id] = job
            self._queue.append(job)
            if self._stopping:
                job.interrupt(_waits_for_next_start(job))
            what = spec.paths.file or f"{spec.name} (sent with the request)"
            self._log.info("job {job} queued: {file}", job=job.id, file=what)
            self._start_next()
            return job

        def failed(reason: Failure) -> Failure:
            self._recording -= 1
            self._log.failure("recording job {job}", reason, job=job.id)
            return Failure(Internal("the job could not be recorded; see the server's log"))

        return self._store.add(job.record()).addCallbacks(recorded, failed)

    def _start_next(self) -> None:
        limits = self.limits
        while self._recovered and not self._stopping and self._queue:
            if len(self._running) >= limits.workers:
                return
            job = self._queue.popleft()
            job.state, job.started, job.attempts = (
                "running",
                self._clock.seconds(),
                job.attempts + 1,
            )
            self._track(
                self._store.update(
                    job.id, state="running", started=job.started, attempts=job.attempts
                )
            )
            running = self._pool.run(job.spec.message(job.id))
            running.on_progress = job.progress
            self._running[job.id] = running
            seconds = min(job.spec.timeout or limits.job_timeout, limits.job_timeout)
            timer = self._clock.callLater(
                seconds,
                running.kill,
                Timeout(f"the job ran longer than its limit of {seconds:g} s and was stopped"),
            )
            running.result.addBoth(self._ended, job, timer)

    def _ended(self, outcome: dict[str, Any] | Failure, job: Job, timer: IDelayedCall) -> None:
        """A job's process is done with it: record how it ended, whatever went wrong doing so."""
        try:
            self._end(outcome, job, timer)
        except Exception:
            self._log.failure("ending job {job}", job=job.id)
            self._running.pop(job.id, None)
            if not job.ended:
                failure = Internal("the server failed ending this job; see its log", Job=job.id)
                self._finish(job, "failed", None, failure)
            self._start_next()

    def _end(self, outcome: dict[str, Any] | Failure, job: Job, timer: IDelayedCall) -> None:
        if timer.active():
            timer.cancel()
        del self._running[job.id]
        if job.id in self._again:
            self._again.discard(job.id)
            job.state, job.started = "queued", None
            self._remove_partial(job)
            self._track(self._store.update(job.id, state="queued", started=None))
            job.interrupt(_waits_for_next_start(job))
            return
        if isinstance(outcome, Failure):
            error = outcome.value
            if not isinstance(error, MeasuringError):
                self._log.failure("job {job} failed inside the server", outcome, job=job.id)
                error = Internal("the server failed running this job; see its log")
            error.extra = {"Job": job.id, **error.extra}
            self._finish(job, _STATES.get(type(error), "failed"), None, error)
            self._remove_partial(job)
        else:
            elapsed = round(self._clock.seconds() - (job.started or 0.0), 3)
            # The files are where the server says, whatever the worker claimed.
            for name, entry in outcome["Results"].items():
                if entry.get("Kind") != "Scalar":
                    entry["File"] = files.result_file(job.id, name, job.spec.output)
            self._finish(job, "done", {**outcome, "Elapsed": elapsed}, None)
        self._start_next()

    def _remove_partial(self, job: Job) -> defer.Deferred[Any]:
        """Remove, in a thread, what a job that did not end done half-wrote."""
        return self._track(
            self._blocking.run(files.remove_partial, job.spec.paths.directory, job.id)
        )

    def _finish(
        self,
        job: Job,
        state: str,
        response: dict[str, Any] | None,
        error: MeasuringError | None,
    ) -> defer.Deferred[Any]:
        """Write how a job ended, then tell those waiting for it."""
        job.finished = self._clock.seconds()
        job.log = (response or {}).get("Log") or (error.extra.get("Log", "") if error else "")
        written = self._store.update(
            job.id,
            state=state,
            finished=job.finished,
            response=stored_response(response),
            error=error.to_json() if error is not None else None,
            log=job.log,
        )

        def told(_: object) -> None:
            job.settle(state, response, error)
            self._live.pop(job.id, None)
            message = (
                error.message if error is not None else f"in {response and response['Elapsed']} s"
            )
            self._log.info("job {job} {state}: {message}", job=job.id, state=state, message=message)

        return self._track(written).addBoth(told)

    # -- answering for jobs

    def _job(self, job_id: str) -> defer.Deferred[Job]:
        """The job, live or from the database; NotFound when there is none."""
        if job_id in self._live:
            return defer.succeed(self._live[job_id])

        def found(record: dict[str, Any] | None) -> Job:
            if record is None:
                raise NotFound(
                    f"there is no job {job_id!r} on this server (finished jobs are kept "
                    f"{self.limits.keep_jobs:g} days)"
                )
            return Job.from_record(record)

        return self._store.get(job_id).addCallback(found)

    def status(self, job_id: str) -> defer.Deferred[dict[str, Any]]:
        """The Response of a Job Status request."""
        return self._job(job_id).addCallback(lambda job: job.status())

    def cancel(self, job_id: str) -> defer.Deferred[str]:
        """Cancel a job (a queued one never starts, a running one stops); fires with its state."""
        if not self._recovered:
            # The job may be among those recovery queues again: cancel it once it is queued.
            waiting: defer.Deferred[None] = defer.Deferred()
            self._after_recovery.append(waiting)
            return waiting.addCallback(lambda _: self.cancel(job_id))
        job = self._live.get(job_id)
        if job is None or job.ended:
            return self._job(job_id).addCallback(lambda job: job.state)
        if job.id in self._running:
            self._running[job.id].kill(Cancelled("the job was cancelled"))
        elif job in self._queue:
            self._queue.remove(job)
            self._finish(job, "cancelled", None, Cancelled("the job was cancelled", Job=job.id))
        elif job.state == "queued":
            # Stopped by the server's stop: it stays queued for the next start.
            return defer.succeed(job.state)
        # Otherwise its end is being written.
        return job.when_finished().addBoth(lambda _: job.state)

    def log(self, job_id: str) -> defer.Deferred[str]:
        """What the job's formulas printed so far (all of it once the job has ended)."""
        if job_id in self._running:
            return defer.succeed(self._running[job_id].log_text())
        return self._job(job_id).addCallback(lambda job: job.log)

    def recent(self, state: str | None, limit: int) -> defer.Deferred[list[dict[str, Any]]]:
        """The newest jobs (in ``state``, when given), newest first."""

        def summaries(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
            jobs = [self._live.get(record["id"]) or Job.from_record(record) for record in records]
            return [job.summary() for job in jobs if state is None or job.state == state]

        return self._store.recent(state, limit).addCallback(summaries)

    def result(self, job_id: str, name: str, offset: int, limit: int) -> defer.Deferred[Any]:
        """Rows ``offset`` to ``offset + limit`` of one result of a finished job."""

        def read(job: Job) -> Any:
            if job.response is None:
                raise NotFound(f"job {job_id} has no results: it is {job.state}")
            found = job.response["Results"]
            if name not in found:
                raise NotFound(
                    f"job {job_id} has no result {name!r} (its results: {', '.join(found)})"
                )
            entry = found[name]
            if entry["Kind"] == "Scalar":
                return {"Name": name, **entry}
            directory = job.spec.paths.directory
            rows = self._blocking.run(results.read_rows, directory, entry["File"], offset, limit)
            return rows.addCallback(lambda page: {"Name": name, "Kind": entry["Kind"], **page})

        return self._job(job_id).addCallback(read)

    def counts(self) -> dict[str, int]:
        """How many jobs run and how many wait."""
        return {"Running": len(self._running), "Queued": len(self._queue)}

    def history(self) -> defer.Deferred[dict[str, Any]]:
        """Finished jobs by state, in all and in the last hour, and their mean run time."""
        return self._store.counters(self._clock.seconds() - 3600.0)

    # -- retention

    def sweep(self) -> defer.Deferred[None]:
        """Remove finished jobs older than ``keep_jobs`` days (and results, with keep_results)."""
        now = self._clock.seconds()
        keep_results = self.limits.keep_results
        done: defer.Deferred[Any] = defer.succeed(None)
        if keep_results is not None:
            done = self._store.expired_results(now - keep_results * DAY)
            done.addCallback(self._remove_results)
        done.addCallback(
            lambda _: self._store.sweep(now - self.limits.keep_jobs * DAY, keep_results is not None)
        )
        done.addCallback(self._swept)
        done.addErrback(lambda f: self._log.failure("removing old jobs", f))
        return done.addCallback(lambda _: None)

    def _swept(self, removed: int) -> None:
        if removed:
            self._log.info(
                "removed {n} finished jobs older than {days} days",
                n=removed,
                days=self.limits.keep_jobs,
            )

    def _remove_results(self, records: list[dict[str, Any]]) -> defer.Deferred[None]:
        def remove() -> None:
            for record in records:
                remove_results(record["spec"]["paths"]["directory"], record["id"])

        removed = self._blocking.run(remove)
        return removed.addCallback(lambda _: self._store.mark_cleaned([r["id"] for r in records]))
