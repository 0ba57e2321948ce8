"""
One job process seen from the server: its pipes, its messages, its end; and the job it runs.

``JobProcess`` is a job process forked by the template (``pool.template``): the server made its
pipes (stdout, stderr, the job's pipe and the reply pipe) and reads them through the reactor. It
reads the process's messages, keeps what the job prints, stops the job's whole process tree, and
tells how it went through two Deferreds: ``ready`` (settled in, with its pid; never fired if it
ended first) and ``ended`` (its process has exited and its pipes are closed, with an
``Ending``). It knows nothing of the pool.
``RunningJob`` is a job handed to the pool, from waiting for a process to its result.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.process import ProcessReader, ProcessWriter
from twisted.logger import Logger
from twisted.python.failure import Failure

from measuring import procfs
from measuring.errors import JobFailed, MeasuringError, from_json
from measuring.messages import JOB_FD, REPLY_FD, Message, MessageBuffer, encode
from measuring.server.jobs.records import Outcome
from measuring.server.threads import Runner
from measuring.wire import KINDS

LOG_BYTES = 64 * 1024
KILL_GRACE = 1.0
PIPE_GRACE = 1.0
Progress = Callable[[int, int], None]


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
    One job handed to the pool: waits for its process, then runs in it.

    ``result`` fires with the job's ``Outcome`` (its results or its error, and its log); it
    never fails. Killed while it waits, it ends at once, and the pool passes it by.
    """

    def __init__(self, message: Message) -> None:
        self.message = message
        self.result: defer.Deferred[Outcome] = defer.Deferred()
        #: Fires once the pool is done with the job's process (after ``result``).
        self.settled: defer.Deferred[None] = defer.Deferred()
        self.log = OutputLog()
        self.process: JobProcess | None = None
        self.started: float | None = None
        self.stop_error: MeasuringError | None = None
        self.on_progress: Progress | None = None
        self.peak_rss = 0
        #: How many times the job ran again because the template ended under it.
        self.reruns = 0

    @property
    def job(self) -> str:
        return str(self.message["Job"])

    def kill(self, reason: MeasuringError) -> None:
        """Stop the job (its whole process tree); its outcome is the error ``reason``."""
        if self.result.called or self.stop_error is not None:
            return
        self.stop_error = reason
        if self.process is None:
            self.fail(reason)
        else:
            self.process.kill()

    def progress(self, done: int, total: int) -> None:
        if self.on_progress is not None:
            self.on_progress(done, total)

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


@dataclass
class Ending:
    """How a job process ended."""

    #: Its last Done or Error message, if it sent one.
    answer: Message | None
    #: What was wrong with its messages, if anything was (the answer then does not count).
    garbled: JobFailed | None
    #: How its process exited; None when the template ended before it could tell.
    exit: Failure | None

    @property
    def done(self) -> bool:
        """True when the process answered Done with messages the server could use."""
        return self.garbled is None and (self.answer or {}).get("Type") == "Done"


def exit_reason(status: int | None) -> Failure | None:
    """A wait status as Twisted tells a process's end: ProcessDone or ProcessTerminated."""
    if status is None:
        return None
    if os.WIFSIGNALED(status):
        return Failure(ProcessTerminated(None, os.WTERMSIG(status), status))
    code = os.waitstatus_to_exitcode(status)
    return Failure(ProcessDone(status) if code == 0 else ProcessTerminated(code, None, status))


class JobProcess:
    """
    The server's side of one job process: ``starting`` (forked, settling in), ``running``
    (Ready: it has its job), ``ended``.

    The pipes are made here; ``child_fds`` are the ends the template passes to the process.
    ``forked`` tells the pid (from the template), ``exited`` the end (from the template too);
    ``start`` writes the job. Blocking /proc reads (ending the tree) go through ``blocking``.
    """

    _log = Logger()

    def __init__(
        self,
        reactor: Any,
        clock: IReactorTime,
        blocking: Runner,
        log: OutputLog,
        progress: Progress,
    ) -> None:
        self._clock = clock
        self._blocking = blocking
        self._output = log
        self._progress = progress
        self._messages = MessageBuffer()
        self._answer: Message | None = None
        self._garbled: JobFailed | None = None
        self._exit: Failure | None = None
        self._exited = False
        self._killing = False
        self._timers: list[IDelayedCall] = []
        self.pid: int | None = None
        self.state = "starting"
        self.ready: defer.Deferred[int] = defer.Deferred()
        self.ended: defer.Deferred[Ending] = defer.Deferred()
        pipes = {fd: os.pipe() for fd in (1, 2, JOB_FD, REPLY_FD)}
        #: The process's ends of its pipes: stdout, stderr, the job's pipe, the reply pipe.
        self.child_fds = [pipes[1][1], pipes[2][1], pipes[JOB_FD][0], pipes[REPLY_FD][1]]
        self._pipes: dict[int, ProcessReader | ProcessWriter] = {
            1: ProcessReader(reactor, self, 1, pipes[1][0]),
            2: ProcessReader(reactor, self, 2, pipes[2][0]),
            REPLY_FD: ProcessReader(reactor, self, REPLY_FD, pipes[REPLY_FD][0]),
            JOB_FD: ProcessWriter(reactor, self, JOB_FD, pipes[JOB_FD][1]),
        }

    def start(self, message: Message) -> None:
        """Hand the process its job (it reads it once it has settled in)."""
        writer = self._pipes.get(JOB_FD)
        if writer is not None:
            writer.write(encode(message))
            writer.loseConnection()

    def forked(self, pid: int) -> None:
        """The template forked the process: ``pid``. A kill asked for meanwhile goes out now."""
        self.pid = pid
        if self._killing:
            self._killing = False
            self.kill()

    def exited(self, status: int | None) -> None:
        """
        The process has exited with wait ``status`` (None: unknown, the template ended and the
        process with it). What it left in its group is ended; after that its pid may be
        anyone's, so nothing more is sent to it. Pipes a descendant still holds are closed soon.
        """
        if self._exited:
            return
        self._signal_group(signal.SIGKILL)
        self._exited = True
        self._exit = exit_reason(status)
        self._timers.append(self._clock.callLater(PIPE_GRACE, self._close_pipes))
        self._maybe_ended()

    def kill(self) -> None:
        """End the whole process tree: SIGTERM to its group, SIGKILL to all after a grace."""
        if self.state == "ended" or self._exited:
            return
        if self.pid is None:
            self._killing = True
            self._close_pipes()
            return
        pid = self.pid
        # Everything below it first (its subreaper holds all of it, also what left its group),
        # while it lives: once it has ended, what is below it is no longer found below it.
        ending = self._blocking.run(procfs.kill_tree, pid)
        ending.addErrback(
            lambda f: self._log.failure("ending the processes below job process {pid}", f, pid=pid)
        )
        ending.addCallback(lambda _: self._signal_group(signal.SIGTERM))
        self._timers.append(self._clock.callLater(KILL_GRACE, self._signal_group, signal.SIGKILL))

    def _signal_group(self, number: int) -> None:
        if self.pid is None or self._exited:
            return
        try:
            os.killpg(self.pid, number)
        except ProcessLookupError:
            # Not yet the leader of its own group (still settling in): signal the process.
            with contextlib.suppress(OSError):
                os.kill(self.pid, number)
        except PermissionError:
            self._log.warn("cannot signal process group {pid}", pid=self.pid)

    # -- the pipes (Twisted's ProcessReader and ProcessWriter call these)

    def childDataReceived(self, name: int, data: bytes) -> None:
        if name != REPLY_FD:
            self._output.append(data)
        elif self._garbled is None:
            try:
                messages = self._messages.feed(data)
            except ValueError as e:
                self._garble(f"the job's process sent what the server cannot read: {e}", str(e))
                return
            for message in messages:
                self._received(message)

    def childConnectionLost(self, name: int, reason: Failure) -> None:
        pipe = self._pipes.pop(name, None)
        if pipe is not None:
            with contextlib.suppress(OSError):
                os.close(pipe.fileno())
        self._maybe_ended()

    def _close_pipes(self) -> None:
        # A descendant that left the process group may still hold the pipes open.
        for pipe in list(self._pipes.values()):
            pipe.loseConnection()

    def _received(self, message: Message) -> None:
        # Formulas run in this process and can write here too: check every message's shape.
        problem = malformed(message)
        if problem is not None:
            self._garble(f"the job's process sent what the server cannot use: {problem}", problem)
        elif message["Type"] == "Ready" and self.state == "starting":
            self.state = "running"
            if self.pid is None and isinstance(message.get("Pid"), int):
                self.pid = message["Pid"]
            if self.pid is not None:
                self.ready.callback(self.pid)
        elif message["Type"] == "Progress" and self.state == "running":
            self._progress(message["Done"], message["Total"])
        elif message["Type"] in ("Done", "Error") and self.state == "running" and not self._answer:
            self._answer = message

    def _garble(self, error: str, problem: str) -> None:
        self._log.error("job process {pid} sent a bad message: {p}", pid=self.pid, p=problem)
        self._garbled = JobFailed(error)
        self.kill()

    def _maybe_ended(self) -> None:
        if self.state == "ended" or not self._exited or self._pipes:
            return
        for timer in self._timers:
            if timer.active():
                timer.cancel()
        self.state = "ended"
        self.ended.callback(Ending(self._answer, self._garbled, self._exit))


def settle(job: RunningJob, ending: Ending, problem: str | None) -> None:
    """
    Give ``job`` its result from how its process ended and from ``problem``, what went wrong
    putting its results in place (or None).
    """
    answer = ending.answer or {}
    if ending.garbled is not None:
        job.fail(ending.garbled)
    elif ending.done and problem is not None:
        job.fail(JobFailed(f"the results could not be put in their folder: {problem}"))
    elif ending.done:
        job.succeed(answer["Results"])
    elif job.stop_error is not None:
        job.fail(job.stop_error)
    elif answer.get("Type") == "Error":
        job.fail(from_json(answer["Error"]))
    else:
        how = describe_exit(ending.exit) if ending.exit is not None else "ended with the template"
        job.fail(
            JobFailed(
                f"the worker process running the formulas {how} before it finished (a crash in "
                f"native code, os._exit, or the system's out-of-memory killer can do this)"
            )
        )
