"""
The four Info answers: the server's state, its job processes, its process tree, the machine.

Counters and job numbers are read on the reactor thread; every psutil call that may take long
(scanning processes, disks) runs in the ``blocking`` runner's thread, and the psutil objects that
remember CPU times between calls live only there.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import threading
from collections.abc import Callable
from typing import Any, Protocol

import psutil
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime

from measuring import __version__, storage
from measuring.server.jobs.records import Limits, iso
from measuring.server.pool.pool import WorkerInfo
from measuring.server.stats import Stats
from measuring.server.threads import Runner

PACKAGES = ("twisted", "dask", "pandas", "pyarrow", "fastparquet", "psutil")


class PoolView(Protocol):
    """What Info reads from the worker pool."""

    size: int
    memory_limit: int | None

    def processes(self) -> list[WorkerInfo]: ...

    @property
    def template_state(self) -> str: ...

    @property
    def busy(self) -> int: ...


class ClusterInfo(Protocol):
    """What Info reads of the cluster (``measuring.server.cluster.ClusterView``)."""

    def brief(self) -> defer.Deferred[dict[str, Any]]: ...

    def current(self) -> defer.Deferred[dict[str, Any]]: ...


class JobsView(Protocol):
    """What Info reads of the jobs (``measuring.server.jobs.queries.JobQueries``)."""

    limits: Limits

    def counts(self) -> dict[str, int]: ...

    def history(self) -> defer.Deferred[dict[str, Any]]: ...


def _versions() -> dict[str, str]:
    versions = {"measuring": __version__, "python": platform.python_version()}
    for package in PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


class ProcessSampler:
    """
    psutil views of processes, kept between calls so that CPU use is measured since the last one.

    Safe from several threads (one at a time). A process seen for the first time reads 0 % CPU.
    """

    def __init__(self) -> None:
        self._known: dict[int, psutil.Process] = {}
        self._lock = threading.Lock()

    def _process(self, pid: int) -> psutil.Process:
        process = self._known.get(pid)
        if process is None or not process.is_running():
            process = self._known[pid] = psutil.Process(pid)
            process.cpu_percent(None)
        return process

    def tree(self, pid: int) -> list[dict[str, Any]]:
        """``pid`` and every process below it: Pid, Parent, Name, Cpu (%), Rss (bytes)."""
        with self._lock:
            return self._tree(pid)

    def _tree(self, pid: int) -> list[dict[str, Any]]:
        try:
            root = self._process(pid)
            processes = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []
        samples = []
        for found in processes:
            try:
                process = self._process(found.pid)
                with process.oneshot():
                    samples.append(
                        {
                            "Pid": process.pid,
                            "Parent": process.ppid(),
                            "Name": process.name(),
                            "Cpu": round(process.cpu_percent(None), 1),
                            "Rss": process.memory_info().rss,
                        }
                    )
            except psutil.NoSuchProcess:
                continue
        self._forget_ended()
        return samples

    def _forget_ended(self) -> None:
        """Drop the views of processes that have ended."""
        for pid, process in list(self._known.items()):
            if not process.is_running():
                del self._known[pid]


def _usage(named: Any) -> dict[str, Any]:
    """A psutil named tuple as JSON, its fields in CamelCase (bytes_sent: BytesSent)."""
    return {
        "".join(part.capitalize() for part in field.split("_")): getattr(named, field)
        for field in named._fields
    }


class InfoService(Service):
    """Answers the Info requests."""

    def __init__(
        self,
        clock: IReactorTime,
        pool: PoolView,
        jobs: JobsView,
        stats: Stats,
        data_roots: tuple[str, ...],
        blocking: Runner,
        dashboard: Callable[[], str | None] = lambda: None,
        cluster: ClusterInfo | None = None,
        helpers: Callable[[], dict[int, str]] = dict,
    ) -> None:
        """``helpers``: the server's own helper processes by pid, with their role (``guard``)."""
        self._clock = clock
        self._dashboard = dashboard
        self._helpers = helpers
        self._cluster = cluster
        self._pool = pool
        self._jobs = jobs
        self._stats = stats
        self._data_roots = data_roots
        self._blocking = blocking
        self._sampler = ProcessSampler()
        self._started = clock.seconds()
        self._versions = _versions()
        self._state = "starting"
        self._answers: dict[str, Callable[[], defer.Deferred[dict[str, Any]]]] = {
            "Status": lambda: defer.succeed(self.status()),
            "Dask process": self.dask_processes,
            "All process": self.all_processes,
            "All statistic": self.all_statistics,
        }

    def startService(self) -> None:
        super().startService()
        self._state = "running"
        self._started = self._clock.seconds()
        # cpu_percent(None) compares with the previous call: make the first answer meaningful.
        self._blocking.run(self._prime)

    def stopService(self) -> None:
        super().stopService()
        self._state = "stopping"

    def _prime(self) -> None:
        psutil.cpu_percent(None)
        psutil.cpu_percent(None, percpu=True)
        self._sampler.tree(os.getpid())

    def answer(self, request: str) -> defer.Deferred[dict[str, Any]]:
        """The Response of one Info request (one of ``wire.INFO_REQUESTS``)."""
        answer = self._answers[request]()
        if self._cluster is not None and request in ("Status", "All statistic"):
            look = self._cluster.brief() if request == "Status" else self._cluster.current()
            answer.addCallback(lambda response: look.addCallback(
                lambda cluster: {**response, "Cluster": cluster}
            ))  # fmt: skip
        return answer

    def _uptime(self) -> float:
        return round(self._clock.seconds() - self._started, 3)

    def status(self) -> dict[str, Any]:
        return {
            "State": self._state,
            "Version": __version__,
            "Uptime": self._uptime(),
            "Started": iso(self._started),
            "Pid": os.getpid(),
            "Jobs": self._jobs.counts(),
            "Workers": {
                "Size": self._pool.size,
                "Busy": self._pool.busy,
                "Template": self._pool.template_state,
            },
            "Limits": {
                "JobTimeout": self._jobs.limits.job_timeout,
                "JobMemory": self._pool.memory_limit,
                "MaxQueued": self._jobs.limits.max_queued,
            },
            "DataRoots": list(self._data_roots),
            "Versions": self._versions,
            "Dashboard": self._dashboard(),
        }

    def dask_processes(self) -> defer.Deferred[dict[str, Any]]:
        busy = [worker for worker in self._pool.processes() if worker.job is not None]

        def sample() -> dict[str, Any]:
            processes = []
            for worker in busy:
                tree = self._sampler.tree(worker.pid)
                if not tree:
                    continue
                processes.append(
                    {
                        "Pid": worker.pid,
                        "Job": worker.job,
                        "Cpu": round(sum(p["Cpu"] for p in tree), 1),
                        "Rss": sum(p["Rss"] for p in tree),
                        "Processes": len(tree),
                        "Started": iso(worker.started),
                    }
                )
            return {"Count": len(processes), "Processes": processes}

        return self._blocking.run(sample)

    def all_processes(self) -> defer.Deferred[dict[str, Any]]:
        roles: dict[int, tuple[str, str | None]] = {
            pid: (role, None) for pid, role in self._helpers().items()
        }
        roles.update(
            (worker.pid, ("job" if worker.job else "template", worker.job))
            for worker in self._pool.processes()
        )

        def sample() -> dict[str, Any]:
            tree = self._sampler.tree(os.getpid())
            for process in tree:
                role, job = roles.get(process["Pid"], ("child", None))
                if process["Pid"] == os.getpid():
                    role = "server"
                process["Role"] = role
                if job is not None:
                    process["Job"] = job
            return {
                "Count": len(psutil.pids()),
                "Service": {
                    "Pid": os.getpid(),
                    "Processes": len(tree),
                    "Cpu": round(sum(p["Cpu"] for p in tree), 1),
                    "Rss": sum(p["Rss"] for p in tree),
                    "Tree": tree,
                },
            }

        return self._blocking.run(sample)

    def all_statistics(self) -> defer.Deferred[dict[str, Any]]:
        counters = self._stats.snapshot()
        live = self._jobs.counts()
        uptime = self._uptime()

        def sample(history: dict[str, Any]) -> dict[str, Any]:
            net = psutil.net_io_counters()
            return {
                "Cpu": {
                    "Percent": psutil.cpu_percent(None),
                    "PerCpu": psutil.cpu_percent(None, percpu=True),
                    "Count": psutil.cpu_count(),
                },
                "Memory": _usage(psutil.virtual_memory()),
                "Swap": _usage(psutil.swap_memory()),
                "Disk": {
                    root: _usage(psutil.disk_usage(root))
                    for root in self._data_roots
                    if not storage.is_url(root)  # object storage has no disk to measure
                },
                "Load": [round(load, 2) for load in psutil.getloadavg()],
                "Net": _usage(net) if net is not None else {},
                "Jobs": {**live, **history},
                **counters,
                "Uptime": uptime,
            }

        return self._jobs.history().addCallback(lambda history: self._blocking.run(sample, history))
