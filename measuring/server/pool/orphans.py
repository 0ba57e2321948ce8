"""
Orphan reaping: what a dead job process left running came to the server (its subreaper), and is
ended and reaped here, every two seconds and after each job: one that has ended at once, one
that runs once it is found unknown twice in a row.

Only the server's own children are read (``processes.end_orphans``), in ``blocking``'s thread.
The template, and every process the reactor spawned and reaps itself, are spared.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet import defer, task
from twisted.internet import process as twisted_process
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from measuring.server.pool.processes import end_orphans
from measuring.server.threads import Runner

EVERY = 2.0


class OrphanReaper:
    """Ends the server's children that ``known()`` does not name."""

    _log = Logger()

    def __init__(
        self, clock: IReactorTime, blocking: Runner, known: Callable[[], set[int]]
    ) -> None:
        self._blocking = blocking
        self._known = known
        self._suspects: set[int] = set()
        self._loop = task.LoopingCall(self.sweep)
        self._loop.clock = clock

    def start(self) -> None:
        self._loop.start(EVERY, now=False)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    def last(self) -> defer.Deferred[list[int]]:
        """End every child not known, suspect or not: the server is stopping, nothing starts."""
        spared = self._known() | set(twisted_process.reapProcessHandlers)
        reaped = self._blocking.run(lambda: end_orphans(spared, None)[0])
        reaped.addErrback(lambda f: self._log.failure("ending what dead job processes left", f))
        return reaped

    def sweep(self) -> defer.Deferred[list[int]]:
        """End and reap the orphans there are now; fires with their pids."""
        spared = self._known() | set(twisted_process.reapProcessHandlers)

        def swept(found: tuple[list[int], set[int]]) -> list[int]:
            ended, self._suspects = found
            return ended

        found = self._blocking.run(end_orphans, spared, set(self._suspects))
        reaped = found.addCallback(swept)
        reaped.addErrback(lambda f: self._log.failure("ending what dead job processes left", f))
        return reaped
