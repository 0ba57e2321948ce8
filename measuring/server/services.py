"""
``InOrder``: a MultiService that stops its children one after another, last started first.

Twisted's MultiService stops all children at once. The server needs an order: stop listening,
then let running jobs end, then stop the worker pool, then close the job database, and only then
stop the threads the database runs in.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.application.service import IService, MultiService, Service
from twisted.internet import defer


class InOrder(MultiService):
    """Starts children in the order they were added; stops them in reverse, each in turn."""

    async def _stop_all(self) -> None:
        for child in reversed(list(self)):
            await defer.maybeDeferred(IService(child).stopService)

    def stopService(self) -> defer.Deferred[None]:
        # Service.stopService only marks this service as stopped; the children stop below.
        super(MultiService, self).stopService()
        return defer.Deferred.fromCoroutine(self._stop_all())


class ProcessSetup(Service):
    """
    Settings of the whole server process, made in ``privilegedStartService``: after twistd has
    daemonized (a forked child inherits neither a subreaper bit nor undumpability) and before
    it drops privileges. A setting that fails stops the start.
    """

    def __init__(self, *steps: Callable[[], None]) -> None:
        self._steps = steps

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        for step in self._steps:
            step()


class UserSetup(Service):
    """
    Steps made in ``startService``: after twistd has dropped privileges (``--uid``), as the user
    the server runs as, so that what they make belongs to that user. A step that fails stops the
    start.
    """

    def __init__(self, *steps: Callable[[], None]) -> None:
        self._steps = steps

    def startService(self) -> None:
        super().startService()
        for step in self._steps:
            try:
                step()
            except OSError as e:
                raise SystemExit(f"measuring: {e}") from None
