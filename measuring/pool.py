"""
Warm worker processes, parent side: start them, hand each one job, collect its answer and log.

The pool keeps ``size`` worker processes (``python -m measuring.worker``) started and warmed up in
advance. Each runs one job and exits; a new one is started in its place at once. Each worker leads
its own process group, so stopping a job kills everything it started. The pool never waits on a
process: everything arrives through the reactor. See ``messages`` for what crosses the pipes.
"""

from __future__ import annotations

import os
import signal
import sys
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorProcess, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

import measuring
from measuring.errors import Cancelled, Internal, JobFailed, MeasuringError, from_json
from measuring.messages import JOB_FD, REPLY_FD, Message, MessageBuffer, encode

LOG_BYTES = 64 * 1024
KILL_GRACE = 2.0
PIPE_GRACE = 1.0


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


def worker_environment(environ: Mapping[str, str], tmp: str) -> dict[str, str]:
    """
    The whole environment of a worker process: only what Python and the formulas need.

    Nothing of the server's own configuration or secrets is passed on.
    """
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(measuring.__file__)))
    env = {
        "PATH": environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
        "LANG": environ.get("LANG", "C.UTF-8"),
        "HOME": environ.get("HOME", tmp),
        "TMPDIR": tmp,
        "PYTHONPATH": package_root,
        "PYTHONUNBUFFERED": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
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
        self._timers: list[IDelayedCall] = []
        self.pid: int | None = None
        self.state = "starting"
        self.job: RunningJob | None = None
        self.ended: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:
        self.pid = self.transport.pid  # type: ignore[union-attr]
        self.transport.closeChildFD(0)  # type: ignore[union-attr]

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == REPLY_FD:
            try:
                messages = self._messages.feed(data)
            except ValueError as e:
                self._log.error("worker {pid} sent a bad message: {e}", pid=self.pid, e=e)
                self._answer = {"Type": "Error", "Error": Internal(str(e)).to_json()}
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
            pass
        except PermissionError:
            self._log.warn("cannot signal process group {pid}", pid=self.pid)

    def kill(self) -> None:
        """Ask the whole process group to end; force it after a grace period."""
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
        if self.job is not None:
            self._settle(self.job, reason)
        self._pool.ended(self, was, reason)
        self.ended.callback(None)

    def _settle(self, job: RunningJob, reason: Failure) -> None:
        answer = self._answer or {}
        if answer.get("Type") == "Done":
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


class WorkerPool(Service):
    """Keeps ``size`` warm worker processes and runs one job in each."""

    _log = Logger()

    def __init__(
        self,
        reactor: IReactorProcess,
        clock: IReactorTime,
        size: int,
        workdir: str,
        environment: dict[str, str],
        command: Sequence[str] | None = None,
    ) -> None:
        self._reactor = reactor
        self._clock = clock
        self.size = size
        self._workdir = workdir
        self._environment = environment
        self._command = list(command or [sys.executable, "-m", "measuring.worker"])
        self._workers: set[WorkerProcess] = set()
        self._ready: deque[WorkerProcess] = deque()
        self._waiting: deque[RunningJob] = deque()
        self._failures = 0
        self._respawn: IDelayedCall | None = None

    def startService(self) -> None:
        super().startService()
        self._fill()

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
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
        """Start worker processes until there are ``size`` of them."""
        self._respawn = None
        argv = [*self._command, str(os.getpid())]
        while self.running and len(self._workers) < self.size:
            worker = WorkerProcess(self, self._clock)
            self._workers.add(worker)
            self._reactor.spawnProcess(
                worker,
                argv[0],
                argv,
                env=self._environment,
                path=self._workdir,
                childFDs={0: "w", 1: "r", 2: "r", JOB_FD: "w", REPLY_FD: "r"},
            )

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
        while self._waiting and self._ready:
            self._ready.popleft().start(self._waiting.popleft())

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
        if not self.running:
            return
        if was == "busy":
            self._fill()
            return
        self._failures += 1
        self._log.error(
            "worker process {pid} {how} before it was ready (failure {n} in a row)",
            pid=worker.pid,
            how=describe_exit(reason),
            n=self._failures,
        )
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
