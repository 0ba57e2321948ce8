"""
Blocking calls kept off the reactor thread.

``ThreadRunner`` is a small thread pool of the server's own (not the reactor's shared one), started
and stopped with the server, for the calls that may block: psutil scans, the job database, reading
result files for Result pages, ending a job's processes and moving its results, removing what a
failed job left on disk. ``Synchronous`` runs the call at once, for tests.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from twisted.application.service import Service
from twisted.internet import defer, threads
from twisted.internet.interfaces import IReactorFromThreads
from twisted.python.threadpool import ThreadPool

T = TypeVar("T")


class Runner(Protocol):
    """Something that runs a blocking call and gives its result as a Deferred."""

    def run(self, f: Callable[..., T], *args: Any) -> defer.Deferred[T]: ...


class ThreadRunner(Service):
    """Runs blocking calls in ``size`` threads of its own."""

    def __init__(self, reactor: IReactorFromThreads, name: str, size: int = 1) -> None:
        self._reactor = reactor
        self._pool = ThreadPool(minthreads=0, maxthreads=size, name=name)

    def startService(self) -> None:
        super().startService()
        self._pool.start()

    def stopService(self) -> None:
        super().stopService()
        self._pool.stop()

    def run(self, f: Callable[..., T], *args: Any) -> defer.Deferred[T]:
        return threads.deferToThreadPool(self._reactor, self._pool, f, *args)


class Synchronous:
    """Runs blocking calls at once, in the caller's thread: for tests."""

    def run(self, f: Callable[..., T], *args: Any) -> defer.Deferred[T]:
        return defer.maybeDeferred(f, *args)
