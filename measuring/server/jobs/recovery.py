"""
At start, what the last server left: jobs it did not finish, queued again; jobs that ended while
their record could not be written (their outcome kept beside their results), recorded as they
ended and not run again.

``Recovery.run`` fires with the jobs to queue, oldest first, each with what its interrupted run
half-wrote removed. While the disk is too full for the recovery's own writes it tries again every
``RETRY_EVERY`` seconds (new jobs are refused meanwhile, by the journal); any other failure is
the caller's. Time comes from the injected clock, file calls go to a thread.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from measuring import files, storage
from measuring.server.jobs import outcomes
from measuring.server.jobs.journal import RETRY_EVERY, Journal
from measuring.server.jobs.records import Job
from measuring.server.jobs.store import is_full
from measuring.server.threads import Runner

#: Times a job may be interrupted by the server's end before it fails instead of running again.
MOST_INTERRUPTIONS = 3


class Recovering(Protocol):
    """The job database as recovery uses it (``store.JobStore``)."""

    def recover(self, most: int, now: float) -> defer.Deferred[list[dict[str, Any]]]: ...


def _left_on_disk(directory: str, job: str) -> dict[str, Any] | None:
    """The kept outcome of ``job``; without one, what its run half-wrote is removed."""
    outcome = outcomes.take(directory, job)
    if outcome is None:
        try:
            files.remove_partial(directory, job)
        except Exception:
            if not storage.is_url(directory):
                raise
            # Storage out of reach: the job runs again, and its publish replaces what is there.
    return outcome


class Recovery:
    """
    Reads what the last server left and sorts it: ``live`` gets every job still to be answered
    for from memory; ``stored(job, kept)`` is called once a kept outcome is written.
    """

    _log = Logger()

    def __init__(
        self,
        store: Recovering,
        journal: Journal,
        clock: IReactorTime,
        blocking: Runner,
        live: dict[str, Job],
        stored: Callable[[Job, bool], None],
    ) -> None:
        self._store = store
        self._journal = journal
        self._clock = clock
        self._blocking = blocking
        self._live = live
        self._stored = stored
        self.stopped = False

    async def run(self) -> list[Job]:
        """The jobs to queue again, oldest first."""
        while True:
            try:
                records = await self._store.recover(MOST_INTERRUPTIONS, self._clock.seconds())
                break
            except Exception as e:
                if not is_full(e) or self.stopped:
                    raise
                # Recovery writes too: try again once there is room.
                self._journal.failed(Failure())
                await task.deferLater(self._clock, RETRY_EVERY, lambda: None)
        self._journal.succeeded()
        left = [
            self._blocking.run(_left_on_disk, record["spec"]["paths"]["directory"], record["id"])
            for record in records
        ]
        kept = await defer.gatherResults(left) if left else []
        jobs = []
        for record, outcome in zip(records, kept, strict=True):
            if outcome is not None:
                self._record(record, outcome)
            else:
                jobs.append(Job.from_record(record))
                self._live[jobs[-1].id] = jobs[-1]
        if jobs:
            self._log.info("{n} jobs queued from before the last stop", n=len(jobs))
        return jobs

    def _record(self, record: dict[str, Any], outcome: dict[str, Any]) -> None:
        """Write the kept outcome of a job that ended before the last stop."""
        fields = {key: outcome[key] for key in outcomes.FIELDS if key in outcome}
        job = Job.from_record({**record, **fields})
        self._live[job.id] = job
        self._log.info(
            "job {job} ended {state} before the last stop and its record is written now; it is "
            "not run again",
            job=job.id,
            state=job.state,
        )
        write = self._journal.write(job.id, **fields)
        write.done.addCallback(lambda _: self._stored(job, True))
