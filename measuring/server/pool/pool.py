"""
Warm worker processes, parent side: start them, hand each one job, watch their memory.

The pool keeps ``size`` worker processes (``python -m measuring.worker``) started and warmed up in
advance. Each runs one job and exits; a new one starts warming up as soon as one takes a job.
Each worker leads its own process group, so stopping a job kills everything it started. The pool
never waits on a process: everything arrives through the reactor. ``child`` is one worker process
seen from here; ``messages`` is what crosses the pipes.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections import deque
from collections.abc import Mapping, Sequence
from typing import NamedTuple

from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.internet.interfaces import IDelayedCall, IReactorProcess, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

import measuring
from measuring.errors import Cancelled, Internal, MemoryLimit
from measuring.messages import JOB_FD, OUTBOX_PREFIX, REPLY_FD, TMP_PREFIXES, Message, job_tmp
from measuring.server import results
from measuring.server.pool.process import RunningJob, WorkerProcess, describe_exit
from measuring.server.pool.processes import (
    SERVER_MARK,
    WORKER_MARK,
    end_orphans,
    kill_marked,
    kill_tree,
    tree_rss,
)
from measuring.server.pool.sandbox import Bubblewrap
from measuring.server.threads import Runner

MEMORY_CHECK = 0.5
REAP_EVERY = 2.0
WORKER_MODULE = "measuring.worker"


def worker_environment(environ: Mapping[str, str], tmp: str, mark: str) -> dict[str, str]:
    """
    The whole environment of a worker process: only what Python and the formulas need, and the
    server's mark (``processes.SERVER_MARK``) by which a restarted server finds what a previous
    one left running. Nothing of the server's own configuration or secrets is passed on.
    """
    env = {
        "PATH": environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
        "LANG": environ.get("LANG", "C.UTF-8"),
        "HOME": environ.get("HOME", tmp),
        "TMPDIR": tmp,
        "PYTHONPATH": measuring.PACKAGE_ROOT,
        "PYTHONUNBUFFERED": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        SERVER_MARK: mark,
    }
    if "TZ" in environ:
        env["TZ"] = environ["TZ"]
    return env


class WorkerInfo(NamedTuple):
    """What the pool says about one of its processes."""

    pid: int
    state: str
    job: str | None
    started: float | None


def _size(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


class WorkerPool(Service):
    """
    Keeps ``size`` warm worker processes and runs one job in each.

    ``environment`` is the workers' whole environment; its ``SERVER_MARK`` tells this server's
    processes apart, so that those a previous server left behind are ended at start. With a
    ``memory_limit`` (bytes), the memory of every job's process tree is checked twice a second
    and a job past the limit is stopped. Blocking psutil calls go through ``blocking``.
    """

    _log = Logger()

    def __init__(
        self,
        reactor: IReactorProcess,
        clock: IReactorTime,
        size: int,
        workdir: str,
        environment: dict[str, str],
        blocking: Runner,
        memory_limit: int | None = None,
        command: Sequence[str] | None = None,
        sandbox: Bubblewrap | None = None,
        job_limits: dict[str, int] | None = None,
        reap_orphans: bool = False,
    ) -> None:
        self._reactor = reactor
        self._clock = clock
        self.size = size
        self._workdir = workdir
        self._environment = environment
        self._blocking = blocking
        self.memory_limit = memory_limit
        self._sandbox = sandbox
        # This process is a subreaper (processes.adopt_orphans): end what dead workers left.
        self._reap_orphans = reap_orphans
        #: What a worker enforces on its job: ``ResultBytes``, ``Processes`` (see worker.py).
        self.job_limits = job_limits or {}
        # -P: the worker's folder is not on sys.path, so no file there can shadow a module.
        self._command = list(command or [sys.executable, "-P", "-m", WORKER_MODULE])
        self._workers: set[WorkerProcess] = set()
        self._ready: deque[WorkerProcess] = deque()
        self._waiting: deque[RunningJob] = deque()
        self._failures = 0
        self._respawn: IDelayedCall | None = None
        self._watch = task.LoopingCall(self._check_memory)
        self._watch.clock = clock
        self._reaper = task.LoopingCall(self._reap)
        self._reaper.clock = clock

    def startService(self) -> None:
        super().startService()
        swept = self._blocking.run(self._sweep_at_start)
        swept.addCallback(self._swept_at_start)
        swept.addErrback(lambda f: self._log.failure("ending what a previous server left", f))
        swept.addBoth(lambda _: self._fill())
        if self.memory_limit is not None:
            self._watch.start(MEMORY_CHECK, now=False)
        if self._reap_orphans:
            self._reaper.start(REAP_EVERY, now=False)

    def _sweep_at_start(self) -> list[int]:
        """End what a previous server left running, and empty the workers' temporary folder."""
        mark, tmp = self._environment.get(SERVER_MARK), self._environment.get("TMPDIR")
        killed = kill_marked(SERVER_MARK, mark) if mark else []
        if tmp and os.path.isdir(tmp):
            for name in os.listdir(tmp):
                if name.startswith(TMP_PREFIXES):
                    shutil.rmtree(os.path.join(tmp, name), ignore_errors=True)
        return killed

    def _swept_at_start(self, killed: list[int]) -> None:
        if killed:
            self._log.warn(
                "ended {n} processes a previous server left running: {pids}",
                n=len(killed),
                pids=killed,
            )

    def finish(
        self, worker: WorkerProcess, job: RunningJob, place: bool
    ) -> defer.Deferred[str | None]:
        """
        After ``worker`` ended: end every process still carrying its mark (what its formulas
        started, also outside its process group); with ``place``, move the results from its
        outbox into the job's Directory; remove its temporary folders. Fires with what went
        wrong placing the results, or None.
        """
        tmp = worker.outbox or self._environment.get("TMPDIR")
        directory = str(job.message["Directory"])
        known = self._known_pids()

        def finish() -> str | None:
            kill_marked(WORKER_MARK, worker.mark)
            if self._reap_orphans:
                end_orphans(known, WORKER_MODULE)
            problem = None
            if place and worker.outbox is not None:
                try:
                    results.place_results(worker.outbox, directory, job.job)
                except Exception as e:
                    problem = f"{type(e).__name__}: {e}"
            if tmp:
                shutil.rmtree(job_tmp(tmp, job.job), ignore_errors=True)
            if worker.outbox is not None:
                shutil.rmtree(worker.outbox, ignore_errors=True)
            return problem

        return self._blocking.run(finish)

    def _known_pids(self) -> set[int]:
        return {worker.pid for worker in self._workers if worker.pid is not None}

    def _reap(self) -> defer.Deferred[list[int]]:
        """End and reap what dead workers left (sandboxes' inner processes end as zombies)."""
        reaped = self._blocking.run(end_orphans, self._known_pids(), WORKER_MODULE)
        reaped.addErrback(lambda f: self._log.failure("ending what dead workers left", f))
        return reaped

    def end_below(self, worker: WorkerProcess) -> None:
        """End every process below a worker being stopped (it is their subreaper: all of them)."""
        if worker.pid is not None:
            self._blocking.run(kill_tree, worker.pid).addErrback(
                lambda f: self._log.failure(
                    "ending the processes of worker {pid}", f, pid=worker.pid
                )
            )

    def _check_memory(self) -> defer.Deferred[None] | None:
        busy = [
            (worker.job, worker.pid)
            for worker in self._workers
            if worker.state == "busy" and worker.job is not None and worker.pid is not None
        ]
        if not busy or self.memory_limit is None:
            return None
        limit = self.memory_limit

        def judge(sizes: list[int]) -> None:
            for (job, _), rss in zip(busy, sizes, strict=True):
                job.peak_rss = max(job.peak_rss, rss)
                if rss > limit:
                    job.kill(
                        MemoryLimit(
                            f"the job's processes used {_size(rss)} of memory, more than its "
                            f"limit of {_size(limit)} (--job-memory); it was stopped"
                        )
                    )

        sampled = self._blocking.run(lambda: [tree_rss(pid) for _, pid in busy])
        judged = sampled.addCallback(judge)
        judged.addErrback(lambda f: self._log.failure("checking the jobs' memory", f))
        return judged

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        for loop in (self._watch, self._reaper):
            if loop.running:
                loop.stop()
        if self._respawn is not None and self._respawn.active():
            self._respawn.cancel()
        while self._waiting:
            self._waiting.popleft().fail(Cancelled("the server is stopping"))
        workers = list(self._workers)
        for worker in workers:
            if worker.job is not None:
                worker.job.kill(Cancelled("the server is stopping"))
            else:
                worker.kill()
        return defer.gatherResults([worker.ended for worker in workers]).addCallback(lambda _: None)

    def _fill(self) -> None:
        """
        Start worker processes until ``size`` of them are warm or warming up.

        A worker that takes a job is replaced at once, not when the job ends, so that jobs
        waiting in the queue find warm workers.
        """
        self._respawn = None
        while self.running and sum(w.state != "busy" for w in self._workers) < self.size:
            worker = WorkerProcess(self, self._clock)
            self._workers.add(worker)
            environment = {**self._environment, WORKER_MARK: worker.mark}
            argv = [*self._command, str(os.getpid())]
            if self._sandbox is not None:
                # In its own PID namespace the worker cannot see the server: bwrap watches it.
                worker.outbox = os.path.join(
                    self._environment["TMPDIR"], OUTBOX_PREFIX + worker.mark
                )
                environment.update(TMPDIR=worker.outbox, HOME=worker.outbox)
                argv = self._sandbox.command([*self._command, "0"], worker.outbox)
            try:
                if worker.outbox is not None:
                    os.makedirs(worker.outbox)
                self._reactor.spawnProcess(
                    worker,
                    argv[0],
                    argv,
                    env=environment,
                    path=worker.outbox or self._workdir,
                    childFDs={0: "w", 1: "r", 2: "r", JOB_FD: "w", REPLY_FD: "r"},
                )
            except Exception:
                self._log.failure("starting a worker process")
                self._workers.discard(worker)
                self._failed_start()
                return

    def run(self, message: Message) -> RunningJob:
        """Run one job message in the next ready worker (waiting for one if none is)."""
        job = RunningJob(self, message)
        self._waiting.append(job)
        self._assign()
        return job

    def forget(self, job: RunningJob) -> None:
        """Drop a job that is still waiting for a worker."""
        if job in self._waiting:
            self._waiting.remove(job)

    def _assign(self) -> None:
        started = False
        while self._waiting and self._ready:
            self._ready.popleft().start(self._waiting.popleft(), self.job_limits)
            started = True
        if started and self._respawn is None:
            self._fill()

    def ready(self, worker: WorkerProcess) -> None:
        """Called by a worker that has warmed up."""
        self._failures = 0
        self._ready.append(worker)
        self._assign()

    def ended(self, worker: WorkerProcess, was: str, reason: Failure) -> None:
        """Called by a worker whose process has ended; starts its replacement."""
        self._workers.discard(worker)
        if worker in self._ready:
            self._ready.remove(worker)
        if not self.running or was == "busy":
            return
        if was == "ready":
            self._log.warn(
                "worker process {pid} {how} while it waited for a job",
                pid=worker.pid,
                how=describe_exit(reason),
            )
            self._fill()
            return
        self._log.error(
            "worker process {pid} {how} before it was ready",
            pid=worker.pid,
            how=describe_exit(reason),
        )
        self._failed_start()

    def _failed_start(self) -> None:
        """Another worker failed to start: try again later, and again later after that."""
        self._failures += 1
        if self._failures >= 3:
            while self._waiting:
                self._waiting.popleft().fail(
                    Internal("worker processes fail to start; see the server's log")
                )
        delay = min(30.0, 0.5 * 2**self._failures)
        if self._respawn is None:
            self._respawn = self._clock.callLater(delay, self._fill)

    def processes(self) -> list[WorkerInfo]:
        """Every worker process, busy or not."""
        return [
            WorkerInfo(
                worker.pid,
                worker.state,
                worker.job.job if worker.job else None,
                worker.job.started if worker.job else None,
            )
            for worker in self._workers
            if worker.pid is not None
        ]

    @property
    def ready_count(self) -> int:
        return len(self._ready)
