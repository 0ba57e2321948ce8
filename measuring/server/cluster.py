"""
The server's side of a dask.distributed cluster (``--scheduler``): its settings checked, the
jobs' messages told where it is, and the view of it that Info shows.

``checked`` validates the ``scheduler*`` settings for ``config``; ``ClusterPool`` hands every job
the cluster's settings on its way to the worker pool; ``ClusterView`` looks at the cluster at
start (saying in the log whether it can be used, and again whenever that changes) and when Info
asks. Every look runs ``measuring.cluster.probe`` in the view's own thread: this module and the
reactor thread never import distributed, and a slow or unreachable scheduler never holds up the
server's other threads.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.usage import UsageError

from measuring.cluster import ClusterSettings
from measuring.messages import CLUSTER_MARK, Message
from measuring.server.jobs.records import iso
from measuring.server.jobs.scheduler import Pool, RunningJob
from measuring.server.threads import Runner

TLS_SETTINGS = ("scheduler-ca", "scheduler-cert", "scheduler-key")
#: How long a look at the cluster stays current for Info, and how long an Info answer waits for a
#: new one before it gives the last one (with the time it was taken).
FRESH = 1.0
WAIT = 0.5
#: What Status shows of a look; All statistic shows all of it.
BRIEF = ("Address", "Reachable", "Workers", "Threads", "Memory", "Tasks", "Versions", "Error")


def checked(
    settings: Mapping[str, Any], sources: Mapping[str, str], real: Callable[[str], str]
) -> dict[str, Any]:
    """
    The ``scheduler*`` settings as ``Config`` holds them (TLS files as real paths); UsageError
    when they do not go together: TLS files without a ``tls://`` address or the other way round,
    a file that cannot be read, or a cluster with ``--sandbox bwrap`` (whose workers have no
    network to reach it).
    """
    address = settings["scheduler"]
    given = [name for name in TLS_SETTINGS if settings[name] is not None]
    files = {name: real(settings[name]) for name in given}
    if address is None:
        if given:
            raise UsageError(f"{sources[given[0]]} is for a tls:// --scheduler, and none is set")
        return {"scheduler": None, **{name.replace("-", "_"): None for name in TLS_SETTINGS}}
    if address.startswith("tls://") and len(given) < len(TLS_SETTINGS):
        raise UsageError(
            f"{sources['scheduler']} {address} needs --scheduler-ca, --scheduler-cert and "
            f"--scheduler-key (the scheduler asks for the server's certificate)"
        )
    if not address.startswith("tls://") and given:
        raise UsageError(
            f"{sources[given[0]]} is for a tls:// --scheduler, not {address}: use tls://"
        )
    for name, path in files.items():
        if not os.path.isfile(path) or not os.access(path, os.R_OK):
            raise UsageError(f"{sources[name]} {settings[name]!r} is not a readable file")
    if settings["sandbox"] == "bwrap":
        raise UsageError(
            f"{sources['sandbox']} bwrap cannot go with {sources['scheduler']}: the sandbox has "
            f"no network, and a job's process must reach the cluster's scheduler"
        )
    return {
        "scheduler": address,
        **{name.replace("-", "_"): files.get(name) for name in TLS_SETTINGS},
    }


def worker_environment(settings: ClusterSettings | None) -> dict[str, str]:
    """What a worker process's environment gains with a cluster: a mark to warm up for it."""
    return {CLUSTER_MARK: settings.address} if settings is not None else {}


class ClusterPool:
    """The worker pool, as the job manager sees it, with every job told where the cluster is."""

    def __init__(self, pool: Pool, settings: ClusterSettings) -> None:
        self._pool = pool
        self._cluster = settings.to_message()

    def run(self, message: Message) -> RunningJob:
        return self._pool.run({**message, "Cluster": self._cluster})


class Probe(Protocol):
    """One blocking look at the cluster (``measuring.cluster.probe`` with the settings)."""

    def __call__(self) -> dict[str, Any]: ...


class ClusterView(Service):
    """The cluster as Info shows it: the last look, renewed when Info asks and it is stale."""

    _log = Logger()

    def __init__(self, clock: IReactorTime, runner: Runner, address: str, probe: Probe) -> None:
        self._clock = clock
        self._runner = runner
        self._probe = probe
        self._last: dict[str, Any] = {"Address": address, "Reachable": None, "Checked": None}
        self._taken: float | None = None
        self._looking = False
        self._waiting: list[defer.Deferred[dict[str, Any]]] = []

    def startService(self) -> None:
        super().startService()
        self._look()

    def brief(self) -> defer.Deferred[dict[str, Any]]:
        """What Status shows: address, reachable, workers, threads, memory, tasks, versions."""
        return self.current().addCallback(
            lambda look: {key: look[key] for key in (*BRIEF, "Checked") if key in look}
        )

    def current(self) -> defer.Deferred[dict[str, Any]]:
        """
        The last look at the cluster, renewed first when it is older than ``FRESH`` seconds:
        at most ``WAIT`` seconds are waited for that, and then the last one is given.
        """
        if self._taken is not None and self._clock.seconds() - self._taken < FRESH:
            return defer.succeed(dict(self._last))
        waiting: defer.Deferred[dict[str, Any]] = defer.Deferred()
        self._waiting.append(waiting)
        self._look()
        if not waiting.called:
            timer = self._clock.callLater(WAIT, self._give_last, waiting)

            def given(look: dict[str, Any]) -> dict[str, Any]:
                if timer.active():
                    timer.cancel()
                return look

            waiting.addCallback(given)
        return waiting

    def _give_last(self, waiting: defer.Deferred[dict[str, Any]]) -> None:
        if waiting in self._waiting:
            self._waiting.remove(waiting)
            waiting.callback(dict(self._last))

    def _look(self) -> None:
        if self._looking:
            return
        self._looking = True
        self._runner.run(self._probe).addCallbacks(self._seen, self._failed)

    def _failed(self, reason: Any) -> None:
        self._log.failure("looking at the cluster", reason)
        self._seen(
            {
                "Address": self._last["Address"],
                "Reachable": False,
                "Error": "looking at the cluster failed; see the server's log",
            }
        )

    def _seen(self, look: dict[str, Any]) -> None:
        self._looking = False
        before, self._taken = self._last, self._clock.seconds()
        self._last = {**look, "Checked": iso(self._taken)}
        self._tell(before, self._last)
        waiting, self._waiting = self._waiting, []
        for one in waiting:
            one.callback(dict(self._last))

    def _tell(self, before: dict[str, Any], now: dict[str, Any]) -> None:
        """Log the first look, and every change between usable and not."""
        usable = now["Reachable"] and now.get("Versions") == "match"
        was = before["Reachable"] and before.get("Versions") == "match"
        first = before["Reachable"] is None
        if usable and (first or not was):
            self._log.info(
                "{again}the cluster at {address} is usable: {workers} workers, {threads} threads",
                again="" if first else "back: ",
                address=now["Address"],
                workers=now.get("Workers"),
                threads=now.get("Threads"),
            )
        elif not usable and (first or was):
            why = now.get("Error") or now.get("Versions")
            self._log.warn(
                "{why}: jobs fail with Unavailable until the cluster is usable "
                "(the server runs on)",
                why=why,
            )
