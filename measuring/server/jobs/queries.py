"""
What is asked of jobs: Job Status, Log, List and Result pages, and the counters Info shows.

The read side of the jobs: a live job is asked of the scheduler (``Live``), any other of the job
database. Result pages are read in the server's blocking-call runner, never on the reactor.
"""

from __future__ import annotations

from typing import Any, Protocol

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime

from measuring.errors import NotFound
from measuring.server import results
from measuring.server.jobs.records import Job, Limits
from measuring.server.threads import Runner


class Live(Protocol):
    """What the scheduler tells of the jobs it holds (``scheduler.Scheduler``)."""

    def live(self, job_id: str) -> Job | None: ...

    def running_log(self, job_id: str) -> str | None: ...

    def counts(self) -> dict[str, int]: ...


class Finder(Protocol):
    """Where a job that is not live is looked up (``store.JobStore``)."""

    def get(self, job: str) -> defer.Deferred[dict[str, Any] | None]: ...


class Records(Finder, Protocol):
    """The job database as the read side uses it (``store.JobStore``)."""

    def recent(self, state: str | None, limit: int) -> defer.Deferred[list[dict[str, Any]]]: ...

    def counters(self, since: float) -> defer.Deferred[dict[str, Any]]: ...


def find_job(live: Live, store: Finder, job_id: str, keep_jobs: float) -> defer.Deferred[Job]:
    """The job, live or from the database; NotFound when there is none."""
    job = live.live(job_id)
    if job is not None:
        return defer.succeed(job)

    def found(record: dict[str, Any] | None) -> Job:
        if record is None:
            raise NotFound(
                f"there is no job {job_id!r} on this server (finished jobs are kept "
                f"{keep_jobs:g} days)"
            )
        return Job.from_record(record)

    return store.get(job_id).addCallback(found)


class JobQueries:
    """Answers for jobs, live or on record."""

    def __init__(
        self, live: Live, store: Records, clock: IReactorTime, blocking: Runner, limits: Limits
    ) -> None:
        self._live = live
        self._store = store
        self._clock = clock
        self._blocking = blocking
        self.limits = limits

    def _job(self, job_id: str) -> defer.Deferred[Job]:
        return find_job(self._live, self._store, job_id, self.limits.keep_jobs)

    def status(self, job_id: str) -> defer.Deferred[dict[str, Any]]:
        """The Response of a Job Status request."""
        return self._job(job_id).addCallback(lambda job: job.status())

    def log(self, job_id: str) -> defer.Deferred[str]:
        """What the job's formulas printed so far (all of it once the job has ended)."""
        running = self._live.running_log(job_id)
        if running is not None:
            return defer.succeed(running)
        return self._job(job_id).addCallback(lambda job: job.log)

    def recent(self, state: str | None, limit: int) -> defer.Deferred[list[dict[str, Any]]]:
        """The newest jobs (in ``state``, when given), newest first."""

        def summaries(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
            jobs = [self._live.live(record["id"]) or Job.from_record(record) for record in records]
            return [job.summary() for job in jobs if state is None or job.state == state]

        return self._store.recent(state, limit).addCallback(summaries)

    def result(
        self, job_id: str, name: str, offset: int, limit: int | None, form: str = "json"
    ) -> defer.Deferred[Any]:
        """
        Rows ``offset`` to ``offset + limit`` of one result of a finished job: a page of JSON
        records, or with ``form`` "arrow" the page's fields and an open file of the Arrow stream
        (to the end for a ``limit`` of None). A single value is its fields alone, in any form.
        """

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
            described = {"Name": name, "Kind": entry["Kind"]}
            directory = job.spec.paths.directory
            if form == "arrow":
                stream = self._blocking.run(
                    results.arrow_stream, directory, entry["File"], offset, limit
                )
                return stream.addCallback(lambda made: ({**described, **made[0]}, made[1]))
            rows = self._blocking.run(results.read_rows, directory, entry["File"], offset, limit)
            return rows.addCallback(lambda page: {**described, **page})

        return self._job(job_id).addCallback(read)

    def counts(self) -> dict[str, int]:
        """How many jobs run and how many wait."""
        return self._live.counts()

    def history(self) -> defer.Deferred[dict[str, Any]]:
        """Finished jobs by state, in all and in the last hour, and their mean run time."""
        return self._store.counters(self._clock.seconds() - 3600.0)
