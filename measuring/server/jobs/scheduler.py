"""
Jobs from submission to their end: the queue, the limits, the durable records.

``Scheduler.submit`` records a checked ``JobSpec`` in the job database (committed, synced) and
queues it; jobs start in arrival order while fewer than ``workers`` run, each with a time limit.
A job's end is written to the database before anyone is told. At start, jobs a crash interrupted
are queued again; on stop, running jobs get a grace period, then run again at the next start.
Time comes from the injected clock; blocking work goes to the store's thread or ``blocking``.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Protocol

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from measuring import files
from measuring.errors import (
    Busy,
    Cancelled,
    Internal,
    MeasuringError,
    Timeout,
)
from measuring.messages import Message
from measuring.server.jobs import outcomes
from measuring.server.jobs.journal import Journal
from measuring.server.jobs.queries import find_job
from measuring.server.jobs.records import (
    Job,
    JobSpec,
    Limits,
    Outcome,
    Progress,
    new_job_id,
    stored_response,
)
from measuring.server.jobs.recovery import Recovery
from measuring.server.stats import Stats
from measuring.server.threads import Runner

_STATES = {Timeout: "timeout", Cancelled: "cancelled"}

__all__ = ["Job", "JobSpec", "Limits", "Scheduler"]


class RunningJob(Protocol):
    """What the pool gives back for a job it runs (``measuring.server.pool.process.RunningJob``)."""

    result: defer.Deferred[Outcome]  # never fails
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

    def note(self, job: str, **fields: Any) -> defer.Deferred[None]: ...

    def get(self, job: str) -> defer.Deferred[dict[str, Any] | None]: ...

    def recover(self, most: int, now: float) -> defer.Deferred[list[dict[str, Any]]]: ...


class JobEvents(Protocol):
    """Who counts what happens to jobs (``measuring.server.stats.Stats``): cheap, in memory."""

    def job_queued(self) -> None: ...

    def job_started(self, waited: float) -> None: ...

    def job_ended(self, state: str, ran: float | None) -> None: ...


def _waits_for_next_start(job: Job) -> Busy:
    """What a client waiting for ``job`` hears when the server stops before it ends."""
    return Busy(
        f"the server is stopping before job {job.id} ended; it runs (again) from the start when "
        f"the server is back (ask for it with a Job Status request)"
    )


class Scheduler(Service):
    """Records, queues and runs jobs; cancels them. What is asked of jobs: ``queries``."""

    _log = Logger()

    def __init__(
        self,
        pool: Pool,
        store: Store,
        clock: IReactorTime,
        limits: Limits,
        blocking: Runner,
        events: JobEvents | None = None,
        journal: Journal | None = None,
    ) -> None:
        self._pool = pool
        self._store = store
        # Records of jobs already accepted are written through it: retried until written.
        self._journal = journal or Journal(store, clock, "of this server")
        self._clock = clock
        self.limits = limits
        self._blocking = blocking
        self._events: JobEvents = events if events is not None else Stats()
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
        #: Outcomes of finished jobs being kept beside their results (``outcomes``).
        self._kept: dict[str, defer.Deferred[Any]] = {}
        self._recovery: Recovery | None = None

    # -- start and stop

    def startService(self) -> None:
        super().startService()
        self._recovery = Recovery(
            self._store, self._journal, self._clock, self._blocking, self._live, self._stored
        )
        recovering = defer.Deferred.fromCoroutine(self._recovery.run())
        recovering.addCallbacks(self._queued_again, self._unrecovered)

    def _queued_again(self, jobs: list[Job]) -> None:
        for _ in jobs:
            self._events.job_queued()
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
        if self._recovery is not None:
            self._recovery.stopped = True
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
            # Records the disk refuses are not waited for: their outcomes are kept on disk.
            journal = self._journal.stop()
            return journal.addCallback(
                lambda _: defer.DeferredList(list(self._writes), consumeErrors=True)
            )

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
        refusal = self._journal.refusal()
        if refusal is not None:
            raise refusal
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
            self._journal.succeeded()
            self._live[job.id] = job
            self._queue.append(job)
            self._events.job_queued()
            if self._stopping:
                job.interrupt(_waits_for_next_start(job))
            what = spec.paths.file or f"{spec.name} (sent with the request)"
            self._log.info("job {job} queued: {file}", job=job.id, file=what)
            self._start_next()
            return job

        def failed(reason: Failure) -> Failure:
            self._recording -= 1
            return Failure(self._journal.failed(reason))

        return self._store.add(job.record()).addCallbacks(recorded, failed)

    def _start_next(self) -> None:
        limits = self.limits
        while self._recovered and not self._stopping and self._queue:
            if len(self._running) >= limits.workers:
                return
            job = self._queue.popleft()
            started = self._clock.seconds()
            job.state, job.started, job.attempts = "running", started, job.attempts + 1
            self._events.job_started(started - job.submitted)
            # Not synced: a job interrupted while running is queued again at the next start.
            self._journal.write(
                job.id, synced=False, state="running", started=job.started, attempts=job.attempts
            )
            running = self._pool.run(job.spec.message(job.id))
            running.on_progress = lambda done, total, job=job: job.progress(
                done, total, self._clock.seconds()
            )
            self._running[job.id] = running
            seconds = min(job.spec.timeout or limits.job_timeout, limits.job_timeout)
            timer = self._clock.callLater(
                seconds,
                running.kill,
                Timeout(f"the job ran longer than its limit of {seconds:g} s and was stopped"),
            )
            running.result.addBoth(self._ended, job, timer)

    def _ended(self, outcome: Outcome | Failure, job: Job, timer: IDelayedCall) -> None:
        """A job's process is done with it: record how it ended, whatever went wrong doing so."""
        try:
            self._end(outcome, job, timer)
        except Exception:
            self._log.failure("ending job {job}", job=job.id)
            self._running.pop(job.id, None)
            if not job.ended:
                failure = Internal("the server failed ending this job; see its log")
                self._finish(job, "failed", None, failure, "")
            self._start_next()

    def _end(self, outcome: Outcome | Failure, job: Job, timer: IDelayedCall) -> None:
        if timer.active():
            timer.cancel()
        del self._running[job.id]
        if job.id in self._again:
            self._again.discard(job.id)
            job.state, job.started = "queued", None
            self._remove_partial(job)
            self._journal.write(job.id, synced=False, state="queued", started=None)
            job.interrupt(_waits_for_next_start(job))
            return
        if isinstance(outcome, Failure):
            self._log.failure("job {job} failed inside the server", outcome, job=job.id)
            outcome = Outcome(None, Internal("the server failed running this job; see its log"), "")
        if outcome.error is not None or outcome.results is None:
            error = outcome.error or Internal("the job ended with neither results nor an error")
            self._finish(job, _STATES.get(type(error), "failed"), None, error, outcome.log)
            self._remove_partial(job)
        else:
            elapsed = round(self._clock.seconds() - (job.started or 0.0), 3)
            # The files are where the server says, whatever the worker claimed.
            for name, entry in outcome.results.items():
                if entry.get("Kind") != "Scalar":
                    entry["File"] = files.result_entry(
                        job.spec.paths.directory, job.id, name, job.spec.output
                    )
            response = {"Results": outcome.results, "Log": outcome.log, "Elapsed": elapsed}
            self._finish(job, "done", response, None, outcome.log)
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
        log: str,
    ) -> None:
        """
        Write how a job ended, then tell those waiting for it. If the disk refuses the record,
        they are told all the same: the outcome is kept in memory and beside the job's results
        (``outcomes``) until the record is written.
        """
        job.finished = self._clock.seconds()
        ran = job.finished - job.started if job.state == "running" and job.started else None
        self._events.job_ended(state, ran)
        job.log = log
        write = self._journal.write(
            job.id,
            state=state,
            finished=job.finished,
            response=stored_response(response),
            error=error.to_json() if error is not None else None,
            log=job.log,
        )

        def told(written: bool) -> None:
            job.settle(state, response, error)
            if not written:
                self._keep_outcome(job)
            message = (
                error.message if error is not None else f"in {response and response['Elapsed']} s"
            )
            self._log.info("job {job} {state}: {message}", job=job.id, state=state, message=message)

        write.tried.addCallback(told)
        write.done.addCallback(lambda _: self._stored(job, write.retried))

    def _keep_outcome(self, job: Job) -> None:
        """Keep a finished job's record beside its results until the database takes it."""
        kept = self._blocking.run(outcomes.keep, job.spec.paths.directory, job.id, job.record())

        def unkept(reason: Failure) -> None:
            self._log.warn(
                "the outcome of job {job} could not be kept beside its results either ({why}): "
                "if the server stops before its record is written, the job runs again",
                job=job.id,
                why=reason.getErrorMessage(),
            )

        self._kept[job.id] = self._track(kept.addErrback(unkept))

    def _stored(self, job: Job, kept: bool) -> None:
        """A finished job's record is written: it is answered for from the database now."""
        if self._live.get(job.id) is job:
            del self._live[job.id]
        if kept:
            keeping = self._kept.pop(job.id, defer.succeed(None))
            forgotten = keeping.addCallback(
                lambda _: self._blocking.run(outcomes.forget, job.spec.paths.directory, job.id)
            )
            self._track(forgotten)

    # -- what is live

    def live(self, job_id: str) -> Job | None:
        """The job, while it is queued or running (or its end is being written)."""
        return self._live.get(job_id)

    def recovered(self) -> defer.Deferred[None]:
        """
        Fires once recovery has sorted out what the last server left (at once after it, or
        while the disk is too full for it: then the database answers as it is).
        """
        if self._recovered or self._broken is not None or self._journal.trouble is not None:
            return defer.succeed(None)
        waiting: defer.Deferred[None] = defer.Deferred()
        self._after_recovery.append(waiting)
        return waiting

    def running_log(self, job_id: str) -> str | None:
        """What a running job's formulas printed so far; None when it is not running."""
        running = self._running.get(job_id)
        return None if running is None else running.log_text()

    def counts(self) -> dict[str, int]:
        """How many jobs run and how many wait."""
        return {"Running": len(self._running), "Queued": len(self._queue)}

    def _job(self, job_id: str) -> defer.Deferred[Job]:
        return find_job(self, self._store, job_id, self.limits.keep_jobs)

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
            self._finish(job, "cancelled", None, Cancelled("the job was cancelled"), "")
        elif job.state == "queued":
            # Stopped by the server's stop: it stays queued for the next start.
            return defer.succeed(job.state)
        # Otherwise its end is being written.
        return job.when_finished().addBoth(lambda _: job.state)
