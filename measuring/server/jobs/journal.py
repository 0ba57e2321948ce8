"""
Writing job records when the disk may refuse them: in order for each job, retried until written.

A record the job database cannot take (a full state directory, most often) is not dropped: the
``Journal`` retries it every ``RETRY_EVERY`` seconds, and the writes after it for the same job
wait behind it, so a job's record ends as its last write says. Meanwhile new jobs are refused
(``refusal``), and the trouble is logged once when it starts and once when it ends, however many
writes fail in between. Time comes from the injected clock; the writes go through the store.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from measuring.errors import Busy, Internal, MeasuringError
from measuring.server.jobs.store import is_full

#: Seconds between two tries of a record the database refused.
RETRY_EVERY = 5.0


class Updates(Protocol):
    """Where records are written (``store.JobStore``)."""

    def update(self, job: str, **fields: Any) -> defer.Deferred[None]: ...

    def note(self, job: str, **fields: Any) -> defer.Deferred[None]: ...


@dataclass
class Write:
    """
    One write of a job's record (``synced``: committed to disk before it counts as written):
    ``tried`` fires after its first try (True: written), ``done`` once it is written.
    """

    job: str
    fields: dict[str, Any]
    synced: bool = True
    tried: defer.Deferred[bool] = field(default_factory=defer.Deferred)
    done: defer.Deferred[None] = field(default_factory=defer.Deferred)
    retried: bool = False

    def tell_tried(self, written: bool) -> None:
        if not self.tried.called:
            self.tried.callback(written)


class Journal:
    """Writes job records through ``store``, each job's in order, retrying refused ones."""

    _log = Logger()

    def __init__(
        self, store: Updates, clock: IReactorTime, where: str, retry_every: float = RETRY_EVERY
    ) -> None:
        self._store = store
        self._clock = clock
        self._where = where
        self._retry_every = retry_every
        self._queues: dict[str, deque[Write]] = {}
        self._timers: dict[str, IDelayedCall] = {}
        self._trying: set[defer.Deferred[Any]] = set()
        self._retrying = 0
        self._stopped = False
        #: What keeps records from being written now, or None.
        self.trouble: str | None = None
        self._full = False

    def write(self, job: str, synced: bool = True, **fields: Any) -> Write:
        """Write ``fields`` of ``job``'s record after its earlier writes; see ``Write``."""
        write = Write(job, fields, synced)
        queue = self._queues.setdefault(job, deque())
        queue.append(write)
        if len(queue) == 1:
            self._try(job)
        elif queue[0].retried:
            write.tell_tried(False)  # it waits behind a write the disk refuses
        return write

    def waiting(self) -> int:
        """How many records wait to be written."""
        return sum(len(queue) for queue in self._queues.values())

    def _try(self, job: str) -> None:
        self._timers.pop(job, None)
        write = self._queues[job][0]
        store = self._store.update if write.synced else self._store.note
        attempt = defer.maybeDeferred(store, job, **write.fields)
        self._trying.add(attempt)
        attempt.addBoth(self._tried, write, attempt)

    def _tried(self, outcome: object, write: Write, attempt: defer.Deferred[Any]) -> None:
        self._trying.discard(attempt)
        queue = self._queues[write.job]
        if isinstance(outcome, Failure):
            if not write.retried:
                write.retried = True
                self._retrying += 1
                self.failed(outcome)
            for waiting in queue:
                waiting.tell_tried(False)
            if not self._stopped:
                self._timers[write.job] = self._clock.callLater(
                    self._retry_every, self._try, write.job
                )
            return
        queue.popleft()
        if write.retried:
            self._retrying -= 1
        write.tell_tried(True)
        write.done.callback(None)
        self.succeeded()
        if queue:
            self._try(write.job)
        else:
            del self._queues[write.job]

    def failed(self, reason: Failure) -> MeasuringError:
        """
        Note a write the database refused (retried here, or a new job's, which is not); the
        first of a run of them is logged. Returns the error a new job is refused with.
        """
        if self.trouble is None:
            self.trouble = f"{type(reason.value).__name__}: {reason.value}"
            self._full = reason.value is not None and is_full(reason.value)
            self._log.failure(
                "cannot write job records in {where} ({trouble}): new jobs are refused until "
                "the records can be written; those of accepted jobs are kept and tried again "
                "every {every:g} s (this is logged once, not for every record)",
                reason,
                level=LogLevel.error,
                where=self._where,
                trouble=self.trouble,
                every=self._retry_every,
            )
        return self._error()

    def succeeded(self) -> None:
        """A record was written: once none waits for a retry, the trouble is over."""
        if self.trouble is not None and self._retrying == 0:
            self._log.info(
                "job records are written in {where} again (the trouble was: {trouble})",
                where=self._where,
                trouble=self.trouble,
            )
            self.trouble = None

    def refusal(self) -> MeasuringError | None:
        """Why a new job is refused now (records wait for a retry), or None."""
        return self._error() if self.trouble is not None and self._retrying else None

    def _error(self) -> MeasuringError:
        what = "is full" if self._full else "cannot be written"
        message = (
            f"the state directory {self._where} {what} ({self.trouble}): the server takes no "
            f"new job until it can record jobs again; jobs it has accepted are kept"
        )
        return Busy(message) if self._full else Internal(message)

    def stop(self) -> defer.Deferred[None]:
        """Try no more; fires once the writes being tried now have their answer."""
        self._stopped = True
        for timer in self._timers.values():
            if timer.active():
                timer.cancel()
        self._timers.clear()
        left = self.waiting() - len(self._trying)
        if left:
            self._log.warn(
                "{n} job records could not be written before the stop ({trouble}); jobs that "
                "ended keep their outcome beside their results and are recorded at the next start",
                n=left,
                trouble=self.trouble,
            )
        trying = defer.DeferredList(list(self._trying), consumeErrors=True)
        return trying.addCallback(lambda _: None)
