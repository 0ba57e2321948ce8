"""
The pool, parent side: one template process, and a fresh job process forked from it per job.

The pool starts the template (``template``: ``python -m measuring.worker``, which loads Dask,
pandas and pyarrow once) and restarts it with back-off when it ends; jobs wait meanwhile. Each
job runs in a job process the template forks for it (``process``), at most ``size`` at once;
its end is settled once ``cleanup`` has put its results in place. Around them: the memory watch
(``memory``) and the reaping of what dead job processes left (``orphans``). With a sandbox, each
job process enters a bubblewrap sandbox of its own. The pool never waits on a process:
everything arrives through the reactor.
"""

from __future__ import annotations

import os
import secrets
import shutil
import sys
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from twisted.application.internet import backoffPolicy
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorProcess, IReactorTime
from twisted.logger import Logger

import measuring
from measuring.errors import Cancelled, Internal
from measuring.messages import OUTBOX_PREFIX, SERVER_MARK, TMP_PREFIXES, Message
from measuring.server.pool.cgroups import Containment
from measuring.server.pool.cleanup import finish_job
from measuring.server.pool.memory import MemoryWatch
from measuring.server.pool.orphans import OrphanReaper
from measuring.server.pool.process import (
    Ending,
    JobProcess,
    RunningJob,
    describe_exit,
    settle,
)
from measuring.server.pool.processes import kill_marked
from measuring.server.pool.sandbox import Bubblewrap
from measuring.server.pool.template import TemplateProcess
from measuring.server.threads import Runner

WORKER_MODULE = "measuring.worker"
#: Failed starts of the template in a row after which waiting jobs fail.
MOST_FAILED_STARTS = 3
#: How many times a job runs again because the template ended under it (a formula that kills
#: its template would otherwise run for ever).
MOST_RERUNS = 2
#: Seconds before the n-th start again of a template that failed to start: 1, 2, 4, ... 30.
restart_delay = backoffPolicy(initialDelay=1.0, maxDelay=30.0, factor=2.0, jitter=lambda: 0.0)


def worker_environment(environ: Mapping[str, str], tmp: str, mark: str) -> dict[str, str]:
    """
    The whole environment of the template and so of every job process: only what Python and the
    formulas need, and the server's mark (``processes.SERVER_MARK``) by which a restarted server
    finds what a previous one left running. Nothing of the server's own configuration or
    secrets is passed on (what object storage needs is added, ``storage.worker_environment``).
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
    """What the pool says about one of its processes (``state``: ``template`` or ``busy``)."""

    pid: int
    state: str
    job: str | None
    started: float | None


class WorkerPool(Service):
    """
    Runs each job in a job process forked from the template, at most ``size`` at once.

    ``environment`` is the template's whole environment; its ``SERVER_MARK`` tells this server's
    processes apart, so that those a previous server left behind are ended at start. With a
    ``memory_limit`` (bytes), every job's process tree is watched and a job past the limit is
    stopped. Blocking /proc reads and file moves go through ``blocking``.
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
        containment: Containment | None = None,
    ) -> None:
        self._reactor = reactor
        self._clock = clock
        self.size = size
        self._workdir = workdir
        self._environment = environment
        self._blocking = blocking
        self.memory_limit = memory_limit
        self._sandbox = sandbox
        # A cgroup for each job process, where one can be had (``cgroups``).
        self._containment = containment
        #: What a job process enforces on its job: ``ResultBytes``, ``Processes`` (worker.job).
        self.job_limits = job_limits or {}
        # -P: the worker's folder is not on sys.path, so no file there can shadow a module.
        self._command = list(command or [sys.executable, "-P", "-m", WORKER_MODULE])
        self._template: TemplateProcess | None = None
        self._template_state = "stopped"
        self._waiting: deque[RunningJob] = deque()
        self._running: set[RunningJob] = set()
        self._failures = 0
        self._restart: IDelayedCall | None = None
        self._memory = (
            MemoryWatch(clock, blocking, memory_limit, lambda: list(self._running))
            if memory_limit is not None
            else None
        )
        # This process is a subreaper (processes.adopt_orphans): end what dead job processes left.
        self._orphans = OrphanReaper(clock, blocking, self._spared) if reap_orphans else None

    # -- start and stop

    def startService(self) -> None:
        super().startService()
        self._template_state = "starting"
        swept = self._blocking.run(self._sweep_at_start)
        swept.addCallback(self._swept_at_start)
        swept.addErrback(lambda f: self._log.failure("ending what a previous server left", f))
        swept.addBoth(lambda _: self._start_template())
        for room in (self._memory, self._orphans):
            if room is not None:
                room.start()

    def _sweep_at_start(self) -> list[int]:
        """End what a previous server left running; empty the job processes' temporary folder."""
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

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        for room in (self._memory, self._orphans):
            if room is not None:
                room.stop()
        if self._restart is not None and self._restart.active():
            self._restart.cancel()
        while self._waiting:
            self._waiting.popleft().kill(Cancelled("the server is stopping"))
        running = list(self._running)
        for job in running:
            job.kill(Cancelled("the server is stopping"))
        ends: list[defer.Deferred[Any]] = [job.settled for job in running]
        template = self._template
        if template is not None and template.state != "ended":
            template.stop()
            ends.append(template.ended)
        self._template_state = "stopped"
        done = defer.gatherResults(ends)
        if self._orphans is not None:
            done.addCallback(lambda _: self._orphans and self._orphans.last())
        return done.addCallback(lambda _: None)

    # -- the template

    def _start_template(self) -> None:
        self._restart = None
        if not self.running:
            return
        template = TemplateProcess(
            self._reactor, [*self._command, str(os.getpid())], self._environment, self._workdir
        )
        self._template = template
        self._template_state = "starting" if self._failures == 0 else "restarting"
        template.ready.addCallbacks(lambda _: self._template_ready(template), lambda _: None)
        template.ended.addCallback(lambda _: self._template_ended(template))
        try:
            template.start()
        except Exception:
            self._log.failure("starting the template process")
            self._template = None
            self._failed_start()

    def _template_ready(self, template: TemplateProcess) -> None:
        if template is not self._template:
            return
        self._failures = 0
        self._template_state = "ready"
        self._log.info(
            "template process {pid} ready ({n} thread)", pid=template.pid, n=template.threads
        )
        self._start_waiting()

    def _template_ended(self, template: TemplateProcess) -> None:
        if template is not self._template:
            return
        reason = template.reason
        assert reason is not None
        self._template = None
        if not self.running:
            return
        if template.was_ready:
            self._log.warn(
                "template process {pid} {how}; starting another",
                pid=template.pid,
                how=describe_exit(reason),
            )
            self._start_template()
            return
        self._log.error(
            "template process {pid} {how} before it was ready",
            pid=template.pid,
            how=describe_exit(reason),
        )
        self._failed_start()

    def _failed_start(self) -> None:
        """The template failed to start again: try again later, and again later after that."""
        self._failures += 1
        self._template_state = "restarting"
        if self._failures >= MOST_FAILED_STARTS:
            self._template_state = "failing"
            while self._waiting:
                self._waiting.popleft().kill(self._cannot_start())
        if self._restart is None:
            delay = restart_delay(self._failures - 1)
            self._restart = self._clock.callLater(delay, self._start_template)

    def _cannot_start(self) -> Internal:
        return Internal(
            f"worker processes fail to start: their template process ended {self._failures} "
            f"times in a row before it was ready; see the server's log"
        )

    # -- jobs

    def run(self, message: Message) -> RunningJob:
        """Run one job message in a job process of its own (waiting for the template if need be)."""
        job = RunningJob(message)
        if self._template_state == "failing":
            job.fail(self._cannot_start())
            return job
        self._waiting.append(job)
        self._start_waiting()
        return job

    def _start_waiting(self) -> None:
        template = self._template
        while (
            self._waiting
            and len(self._running) < self.size
            and template is not None
            and template.state == "ready"
        ):
            job = self._waiting.popleft()
            if not job.result.called:  # killed while it waited
                self._launch(template, job)

    def _launch(self, template: TemplateProcess, job: RunningJob) -> None:
        """Fork ``job``'s process from ``template`` and hand it the job."""
        process = JobProcess(self._reactor, self._clock, self._blocking, job.log, job.progress)
        job.process, job.started = process, self._clock.seconds()
        self._running.add(job)
        environment, outbox, sandbox = {}, None, None
        if self._sandbox is not None:
            outbox = os.path.join(self._environment["TMPDIR"], OUTBOX_PREFIX + secrets.token_hex(8))
            os.makedirs(outbox)
            environment = {"TMPDIR": outbox, "HOME": outbox}
            sandbox = self._sandbox.command([], outbox)
        # The job process joins its cgroup first of all: everything it starts stays in it.
        key = secrets.token_hex(8)
        cgroup = self._containment.job_cgroup(key) if self._containment is not None else None
        request = {"Environment": environment, "Sandbox": sandbox, "Cgroup": cgroup}

        def forked(pid: int) -> None:
            process.forked(pid)
            template.exit_of(pid).addCallback(process.exited)

        template.fork(process.child_fds, request).addCallbacks(
            forked, lambda _: process.exited(None)
        )
        process.start({**job.message, "Limits": self.job_limits, "Outbox": outbox})
        process.ended.addCallback(self._ended, job, outbox, key)

    def _ended(self, ending: Ending, job: RunningJob, outbox: str | None, key: str) -> None:
        """``job``'s process ended: clean up after it, then settle the job (or run it again)."""
        tmp = self._environment.get("TMPDIR")
        again = (
            ending.exit is None
            and ending.answer is None
            and job.stop_error is None
            and job.reruns < MOST_RERUNS
            and bool(self.running)
        )
        place = ending.done and outbox is not None
        finished = self._blocking.run(
            self._finish, key, job.job, str(job.message["Directory"]), tmp, outbox, place
        )
        finished.addErrback(lambda f: f"{type(f.value).__name__}: {f.value}")
        finished.addCallback(self._cleaned, job, ending, again)

    def _finish(
        self, key: str, job: str, directory: str, tmp: str | None, outbox: str | None, place: bool
    ) -> str | None:
        """In a thread: end what the job left in its cgroup, then ``cleanup.finish_job``."""
        if self._containment is not None:
            self._containment.end(key)
        return finish_job(job, directory, tmp, outbox, place)

    def _cleaned(self, problem: str | None, job: RunningJob, ending: Ending, again: bool) -> None:
        self._running.discard(job)
        if self._orphans is not None:
            # What the job process left that has ended (a sandbox's processes) is reaped now.
            self._orphans.sweep()
        if again:
            self._log.warn("job {job} runs again: the template ended while it ran", job=job.job)
            job.reruns += 1
            job.process = None
            self._waiting.appendleft(job)
        else:
            settle(job, ending, problem)
            job.settled.callback(None)
        self._start_waiting()

    # -- what the pool tells

    def _spared(self) -> set[int]:
        """The server's children the orphan reaper must not end: the template."""
        template = self._template
        return {template.pid} if template is not None and template.pid is not None else set()

    def processes(self) -> list[WorkerInfo]:
        """The template and every job process, running or ending."""
        found = []
        template = self._template
        if template is not None and template.pid is not None and template.state != "ended":
            found.append(WorkerInfo(template.pid, "template", None, None))
        for job in self._running:
            if job.process is not None and job.process.pid is not None:
                found.append(WorkerInfo(job.process.pid, "busy", job.job, job.started))
        return found

    @property
    def template_state(self) -> str:
        """``starting``, ``ready``, ``restarting`` (after it ended), ``failing``, or ``stopped``."""
        return self._template_state

    @property
    def busy(self) -> int:
        """How many job processes run now."""
        return len(self._running)
