"""
How long finished jobs stay: a sweep every hour removes jobs older than ``--keep-jobs`` days
from the job database and, with ``--keep-results``, their result folders.

Time comes from the injected clock; folders are removed in the blocking-call runner.
"""

from __future__ import annotations

import shutil
from typing import Any, Protocol

from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from measuring import files, storage
from measuring.server.jobs.records import Limits
from measuring.server.threads import Runner

SWEEP_EVERY = 3600.0
DAY = 86400.0


class Expiring(Protocol):
    """The job database as the sweep uses it (``store.JobStore``)."""

    def expired_results(self, before: float) -> defer.Deferred[list[dict[str, Any]]]: ...

    def mark_cleaned(self, jobs: list[str]) -> defer.Deferred[None]: ...

    def sweep(self, before: float, cleaned_only: bool) -> defer.Deferred[int]: ...


def remove_results(directory: str, job: str) -> None:
    """Remove a job's result folder and anything half-written it left."""
    if storage.is_url(directory):
        storage.remove_results(directory, job)
    else:
        shutil.rmtree(files.result_dir(directory, job), ignore_errors=True)
    files.remove_partial(directory, job)


class Retention(Service):
    """Sweeps old jobs and results away, at start and every ``SWEEP_EVERY`` seconds."""

    _log = Logger()

    def __init__(
        self, store: Expiring, clock: IReactorTime, limits: Limits, blocking: Runner
    ) -> None:
        self._store = store
        self._clock = clock
        self.limits = limits
        self._blocking = blocking
        self._sweeper = task.LoopingCall(self.sweep)
        self._sweeper.clock = clock

    def startService(self) -> None:
        super().startService()
        self._sweeper.start(SWEEP_EVERY, now=True)

    def stopService(self) -> defer.Deferred[None] | None:
        if self._sweeper.running:
            self._sweeper.stop()
        return super().stopService()

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
