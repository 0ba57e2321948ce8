"""
The parent side of one worker process: the process itself, the job it runs, what it prints.

``WorkerProcess`` is the ProcessProtocol of one ``python -m measuring.worker``: it reads the
worker's messages, keeps what the job prints, stops the job's whole process group, and tells its
``WorkerPool`` when the process is ready and when it has ended. ``RunningJob`` is a job handed to
the pool, from waiting for a worker to its result.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from measuring.errors import JobFailed, MeasuringError, from_json
from measuring.messages import JOB_FD, REPLY_FD, Message, MessageBuffer, encode
from measuring.server.jobs.records import Outcome
from measuring.wire import KINDS

if TYPE_CHECKING:
    from measuring.server.pool.pool import WorkerPool

LOG_BYTES = 64 * 1024
KILL_GRACE = 1.0
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


class RunningJob:
    """
    One job handed to the pool: waits for a ready worker, then runs in it.

    ``result`` fires with the job's ``Outcome`` (its results or its error, and its log); it
    never fails.
    """

    def __init__(self, pool: WorkerPool, message: Message) -> None:
        self._pool = pool
        self.message = message
        self.result: defer.Deferred[Outcome] = defer.Deferred()
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
        self.result.callback(Outcome(results, None, self.log.text()))

    def fail(self, reason: MeasuringError) -> None:
        self.result.callback(Outcome(None, reason, self.log.text()))


def malformed(message: Message) -> str | None:
    """What is wrong with a worker's message, or None when it has the shape ``messages`` says."""
    kind = message.get("Type")
    if kind == "Ready":
        return None
    if kind == "Progress":
        done, total = message.get("Done"), message.get("Total")
        counts = [type(count) is int and count >= 0 for count in (done, total)]
        return None if all(counts) else "a Progress message without whole Done and Total"
    if kind == "Error":
        error = message.get("Error")
        ok = isinstance(error, dict) and all(
            isinstance(error.get(k), str) for k in ("Code", "Message")
        )
        return None if ok else "an Error message without a Code and a Message"
    if kind == "Done":
        results = message.get("Results")
        if not isinstance(results, dict):
            return "a Done message without Results"
        for name, entry in results.items():
            if not (name.isidentifier() and isinstance(entry, dict) and entry.get("Kind") in KINDS):
                return f"a result {name[:40]!r} that is not a formula's result"
        return None
    return f"a message of unknown type {str(kind)[:40]!r}"


class WorkerProcess(ProcessProtocol):
    """The parent side of one worker process: starting, then ready, then busy with one job."""

    _log = Logger()

    def __init__(self, pool: WorkerPool, clock: IReactorTime) -> None:
        self._pool = pool
        self._clock = clock
        self._messages = MessageBuffer()
        self._answer: Message | None = None
        self._garbled: MeasuringError | None = None
        self._exited = False
        self._timers: list[IDelayedCall] = []
        self.pid: int | None = None
        self.mark = secrets.token_hex(16)
        #: With a sandbox: the one folder the worker may write, where its results are written.
        self.outbox: str | None = None
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
        # Formulas run in this process and can write here too: check every message's shape.
        problem = malformed(message)
        if problem is not None:
            self._log.error("worker {pid} sent a bad message: {problem}", pid=self.pid,
                            problem=problem)  # fmt: skip
            self._garbled = JobFailed(
                f"the job's process sent what the server cannot use: {problem}"
            )
            self.kill()
        elif message["Type"] == "Ready" and self.state == "starting":
            self.state = "ready"
            self._pool.ready(self)
        elif message["Type"] == "Progress" and self.job is not None:
            if self.job.on_progress is not None:
                self.job.on_progress(message["Done"], message["Total"])
        elif message["Type"] in ("Done", "Error") and self.state == "busy" and not self._answer:
            self._answer = message

    def start(self, job: RunningJob, limits: dict[str, int]) -> None:
        """Hand this ready worker its one job, with the job's ``limits`` and its outbox."""
        self.state = "busy"
        self.job = job
        job.worker = self
        job.started = self._clock.seconds()
        message = {**job.message, "Limits": limits, "Outbox": self.outbox}
        self.transport.writeToChild(JOB_FD, encode(message))  # type: ignore[union-attr]
        self.transport.closeChildFD(JOB_FD)  # type: ignore[union-attr]

    def _signal_group(self, signal_number: int) -> None:
        if self.pid is None or self._exited:
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
        self._pool.end_below(self)
        self._signal_group(signal.SIGTERM)
        self._timers.append(self._clock.callLater(KILL_GRACE, self._signal_group, signal.SIGKILL))

    def processExited(self, reason: Failure) -> None:
        # Whatever the worker started and left behind in its group ends with it; after that its
        # pid may be anyone's, so nothing more is sent to it.
        self._signal_group(signal.SIGKILL)
        self._exited = True
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
        done = self._garbled is None and (self._answer or {}).get("Type") == "Done"
        finished = self._pool.finish(self, job, place=done and self.outbox is not None)
        finished.addCallback(lambda problem: self._settle(job, reason, problem))
        finished.addBoth(lambda _: self.ended.callback(None))

    def _settle(self, job: RunningJob, reason: Failure, problem: str | None) -> None:
        answer = self._answer or {}
        if self._garbled is not None:
            job.fail(self._garbled)
        elif answer.get("Type") == "Done" and problem is not None:
            job.fail(JobFailed(f"the results could not be put in their folder: {problem}"))
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
