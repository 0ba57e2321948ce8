"""
Warm worker processes, parent side: start them, hand each one job, collect its answer and log.

The pool keeps ``size`` worker processes (``python -m measuring.worker``) started and warmed up in
advance. Each runs one job and exits; a new one is started in its place at once. Each worker leads
its own process group, so stopping a job kills everything it started. The pool never waits on a
process: everything arrives through the reactor. See ``messages`` for what crosses the pipes.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import sys
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.internet.interfaces import IDelayedCall, IReactorProcess, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

import measuring
from measuring.errors import Cancelled, Internal, JobFailed, MeasuringError, MemoryLimit, from_json
from measuring.messages import JOB_FD, REPLY_FD, Message, MessageBuffer, encode, job_tmp
from measuring.processes import SERVER_MARK, WORKER_MARK, kill_marked, tree_rss
from measuring.threads import Runner

LOG_BYTES = 64 * 1024
KILL_GRACE = 1.0
PIPE_GRACE = 1.0
MEMORY_CHECK = 0.5


class OutputLog:
    """What a job printed, kept to ``limit`` bytes: the beginning and the end, with a cut mark."""

    def __init__(self, limit: int = LOG_BYTES) -> None:
        self._half = limit // 2
        self._head = bytearray()
        self._tail = bytearray()
        self._cut = 0

    def append(self, data: bytes) -> None:
        room = self._half - len(self._head)
        if room > 0:
            self._head += data[:room]
            data = data[room:]
        self._tail += data
        excess = len(self._tail) - self._half
        if excess > 0:
            del self._tail[:excess]
            self._cut += excess

    def text(self) -> str:
        cut = f"\n[... {self._cut} bytes cut ...]\n" if self._cut else ""
        return self._head.decode("utf-8", "replace") + cut + self._tail.decode("utf-8", "replace")


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


def describe_exit(reason: Failure) -> str:
    """How a process ended: ``exited with code 3``, ``was killed by signal 11 (SIGSEGV)``."""
    value = reason.value
    signal_number = getattr(value, "signal", None)
    if signal_number is not None:
        try:
            name = signal.Signals(signal_number).name
        except ValueError:
            name = "unknown"
        return f"was killed by signal {signal_number} ({name})"
    return f"exited with code {getattr(value, 'exitCode', None)}"


class WorkerInfo(NamedTuple):
    """What the pool says about one of its processes."""

    pid: int
    state: str
    job: str | None
    started: float | None


class RunningJob:
    """
    One job handed to the pool: waits for a ready worker, then runs in it.

    ``result`` fires with ``{"Results": ..., "Log": ...}`` or fails with a MeasuringError whose
    ``extra`` carries the ``Log``.
    """

    def __init__(self, pool: WorkerPool, message: Message) -> None:
        self._pool = pool
        self.message = message
        self.result: defer.Deferred[dict[str, Any]] = defer.Deferred()
        self.log = OutputLog()
        self.worker: WorkerProcess | None = None
        self.started: float | None = None
        self.stop_error: MeasuringError | None = None
        self.on_progress: Callable[[int, int], None] | None = None
        self.peak_rss = 0

    @property
    def job(self) -> str:
        return str(self.message["Job"])

    def kill(self, reason: MeasuringError) -> None:
        """Stop the job (its whole process group); ``result`` fails with ``reason``."""
        if self.result.called or self.stop_error is not None:
            return
        self.stop_error = reason
        if self.worker is None:
            self._pool.forget(self)
            self.fail(reason)
        else:
            self.worker.kill()

    def log_text(self) -> str:
        """What the job has printed so far."""
        return self.log.text()

    def succeed(self, results: dict[str, Any]) -> None:
        self.result.callback({"Results": results, "Log": self.log.text()})

    def fail(self, reason: MeasuringError) -> None:
        reason.extra.setdefault("Log", self.log.text())
        self.result.errback(reason)


class WorkerProcess(ProcessProtocol):
    """The parent side of one worker process: starting, then ready, then busy with one job."""

    _log = Logger()

    def __init__(self, pool: WorkerPool, clock: IReactorTime) -> None:
        self._pool = pool
        self._clock = clock
        self._messages = MessageBuffer()
        self._answer: Message | None = None
        self._garbled: MeasuringError | None = None
        self._timers: list[IDelayedCall] = []
        self.pid: int | None = None
        self.mark = secrets.token_hex(16)
        self.state = "starting"
        self.job: RunningJob | None = None
        self.ended: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:
        self.pid = self.transport.pid  # type: ignore[union-attr]
        self.transport.closeChildFD(0)  # type: ignore[union-attr]

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == REPLY_FD and self._garbled is not None:
            return
        if childFD == REPLY_FD:
            try:
                messages = self._messages.feed(data)
            except ValueError as e:
                self._log.error("worker {pid} sent a bad message: {e}", pid=self.pid, e=e)
                self._garbled = JobFailed(
                    f"the job's process sent what the server cannot read: {e}"
                )
                self.kill()
                return
            for message in messages:
                self._received(message)
        elif self.job is not None:
            self.job.log.append(data)
        else:
            self._log.warn(
                "worker {pid}: {output}",
                pid=self.pid,
                output=data[:4096].decode("utf-8", "replace").rstrip(),
            )

    def _received(self, message: Message) -> None:
        if message.get("Type") == "Ready" and self.state == "starting":
            self.state = "ready"
            self._pool.ready(self)
        elif message.get("Type") == "Progress" and self.job is not None:
            if self.job.on_progress is not None:
                self.job.on_progress(int(message["Done"]), int(message["Total"]))
        elif message.get("Type") in ("Done", "Error") and self.state == "busy":
            self._answer = message

    def start(self, job: RunningJob) -> None:
        """Hand this ready worker its one job."""
        self.state = "busy"
        self.job = job
        job.worker = self
        job.started = self._clock.seconds()
        self.transport.writeToChild(JOB_FD, encode(job.message))  # type: ignore[union-attr]
        self.transport.closeChildFD(JOB_FD)  # type: ignore[union-attr]

    def _signal_group(self, signal_number: int) -> None:
        if self.pid is None:
            return
        try:
            os.killpg(self.pid, signal_number)
        except ProcessLookupError:
            # Not yet the leader of its own group (still starting): signal the process itself.
            with contextlib.suppress(OSError):
                os.kill(self.pid, signal_number)
        except PermissionError:
            self._log.warn("cannot signal process group {pid}", pid=self.pid)

    def kill(self) -> None:
        """Ask the whole process group to end (SIGTERM); force it after a grace (SIGKILL)."""
        if self.state == "ended":
            return
        self._signal_group(signal.SIGTERM)
        self._timers.append(self._clock.callLater(KILL_GRACE, self._signal_group, signal.SIGKILL))

    def processExited(self, reason: Failure) -> None:
        # Whatever the worker started and left behind in its group ends with it.
        self._signal_group(signal.SIGKILL)
        self._timers.append(self._clock.callLater(PIPE_GRACE, self._close_pipes))

    def _close_pipes(self) -> None:
        # A descendant that left the process group may still hold the pipes open.
        if self.transport is not None:
            for fd in (0, 1, 2, JOB_FD, REPLY_FD):
                self.transport.closeChildFD(fd)

    def processEnded(self, reason: Failure) -> None:
        for timer in self._timers:
            if timer.active():
                timer.cancel()
        was = self.state
        self.state = "ended"
        self._pool.ended(self, was, reason)
        if self.job is None:
            self.ended.callback(None)
            return
        # A process a formula started outside the group still carries this worker's mark.
        job = self.job
        swept = self._pool.sweep(self, job.job)
        swept.addBoth(lambda _: self._settle(job, reason))
        swept.addBoth(lambda _: self.ended.callback(None))

    def _settle(self, job: RunningJob, reason: Failure) -> None:
        answer = self._answer or {}
        if self._garbled is not None:
            job.fail(self._garbled)
        elif answer.get("Type") == "Done":
            job.succeed(answer["Results"])
        elif job.stop_error is not None:
            job.fail(job.stop_error)
        elif answer.get("Type") == "Error":
            job.fail(from_json(answer["Error"]))
        else:
            job.fail(
                JobFailed(
                    f"the worker process running the formulas {describe_exit(reason)} before it "
                    f"finished (a crash in native code, os._exit, or the system's out-of-memory "
                    f"killer can do this)"
                )
            )


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
    ) -> None:
        self._reactor = reactor
        self._clock = clock
        self.size = size
        self._workdir = workdir
        self._environment = environment
        self._blocking = blocking
        self.memory_limit = memory_limit
        # -P: the worker's folder is not on sys.path, so no file there can shadow a module.
        self._command = list(command or [sys.executable, "-P", "-m", "measuring.worker"])
        self._workers: set[WorkerProcess] = set()
        self._ready: deque[WorkerProcess] = deque()
        self._waiting: deque[RunningJob] = deque()
        self._failures = 0
        self._respawn: IDelayedCall | None = None
        self._watch = task.LoopingCall(self._check_memory)
        self._watch.clock = clock

    def startService(self) -> None:
        super().startService()
        swept = self._blocking.run(self._sweep_at_start)
        swept.addCallback(self._swept_at_start)
        swept.addErrback(lambda f: self._log.failure("ending what a previous server left", f))
        swept.addBoth(lambda _: self._fill())
        if self.memory_limit is not None:
            self._watch.start(MEMORY_CHECK, now=False)

    def _sweep_at_start(self) -> list[int]:
        """End what a previous server left running, and empty the workers' temporary folder."""
        mark, tmp = self._environment.get(SERVER_MARK), self._environment.get("TMPDIR")
        killed = kill_marked(SERVER_MARK, mark) if mark else []
        if tmp and os.path.isdir(tmp):
            for name in os.listdir(tmp):
                if name.startswith("job-"):
                    shutil.rmtree(os.path.join(tmp, name), ignore_errors=True)
        return killed

    def _swept_at_start(self, killed: list[int]) -> None:
        if killed:
            self._log.warn(
                "ended {n} processes a previous server left running: {pids}",
                n=len(killed),
                pids=killed,
            )

    def sweep(self, worker: WorkerProcess, job: str) -> defer.Deferred[None]:
        """
        End every process still carrying the ended ``worker``'s mark (what its formulas
        started, also outside its process group), and remove ``job``'s temporary folder.
        """
        tmp = self._environment.get("TMPDIR")

        def sweep() -> None:
            kill_marked(WORKER_MARK, worker.mark)
            if tmp:
                shutil.rmtree(job_tmp(tmp, job), ignore_errors=True)

        return self._blocking.run(sweep)

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
        if self._watch.running:
            self._watch.stop()
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
        argv = [*self._command, str(os.getpid())]
        while self.running and sum(w.state != "busy" for w in self._workers) < self.size:
            worker = WorkerProcess(self, self._clock)
            self._workers.add(worker)
            try:
                self._reactor.spawnProcess(
                    worker,
                    argv[0],
                    argv,
                    env={**self._environment, WORKER_MARK: worker.mark},
                    path=self._workdir,
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
            self._ready.popleft().start(self._waiting.popleft())
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
