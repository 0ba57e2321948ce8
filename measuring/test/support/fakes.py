"""
Honest fakes of the server's parts, for the unit tests: each behaves as the real part does seen
from outside, and ``test_fakes`` holds each to the interface of the part it stands for.

- ``FakeRunningJob`` / ``FakePool``: the worker pool (``measuring.server.pool``) as the scheduler
  sees it: ``run`` gives a job whose result fires when the test says the job ended.
- ``RecordingRunner`` / ``HeldRunner``: the blocking-call runner (``threads.Runner``), recording
  or holding calls until the test releases them.
- ``FakeInfo``: what answers Info requests (``InfoService``).
- ``limits``: the scheduler's limits at the declared defaults, with overrides.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.python.failure import Failure

from measuring.errors import MeasuringError
from measuring.messages import Message
from measuring.server.jobs.records import Job, Outcome, Progress
from measuring.server.jobs.scheduler import Limits
from measuring.server.settings import BY_NAME


def finished(job: Job) -> defer.Deferred[dict[str, Any]]:
    """The job's Response once it is done, or its error as a failure (also the server's stop)."""

    def response(ended: Job) -> dict[str, Any] | Failure:
        if ended.error is not None:
            return Failure(ended.error)
        assert ended.response is not None
        return ended.response

    return job.when_finished().addCallback(response)


def limits(**overrides: Any) -> Limits:
    """The scheduler's limits: each at its declared default unless given."""
    names = [field for field in Limits.__dataclass_fields__]
    values = {name: BY_NAME[name.replace("_", "-")].default for name in names}
    return Limits(**{**values, **overrides})


class FakeRunningJob:
    """A job handed to ``FakePool``; the test ends it with ``succeed``, ``fail`` or ``exited``."""

    def __init__(self, message: Message, in_worker: bool) -> None:
        self.message = message
        self.in_worker = in_worker
        self.result: defer.Deferred[Outcome] = defer.Deferred()
        self.on_progress: Progress | None = None
        self.killed_with: MeasuringError | None = None
        self.printed = ""

    @property
    def job(self) -> str:
        return str(self.message["Job"])

    def kill(self, reason: MeasuringError) -> None:
        """
        Like the real RunningJob: a job still waiting for a worker fails with ``reason`` at once;
        one in a worker fails once its worker has exited (``exited``).
        """
        if self.result.called or self.killed_with is not None:
            return
        self.killed_with = reason
        if not self.in_worker:
            self.fail(reason)

    def exited(self) -> None:
        """The worker of a killed job has exited: the job fails with the kill's reason."""
        assert self.killed_with is not None, "the job was not killed"
        self.fail(self.killed_with)

    def print(self, text: str) -> None:
        """The formulas print ``text``."""
        self.printed += text

    def log_text(self) -> str:
        return self.printed

    def progress(self, done: int, total: int) -> None:
        """The worker reports that ``done`` of ``total`` Dask tasks are complete."""
        if self.on_progress is not None:
            self.on_progress(done, total)

    def succeed(self, results: dict[str, Any] | None = None) -> None:
        self.result.callback(Outcome(results or {}, None, self.printed))

    def fail(self, reason: MeasuringError) -> None:
        self.result.callback(Outcome(None, reason, self.printed))


class FakePool:
    """Records every job it is asked to run; ``in_worker`` says whether a worker takes it."""

    def __init__(self) -> None:
        self.runs: list[FakeRunningJob] = []
        self.in_worker = False

    def run(self, message: Message) -> FakeRunningJob:
        self.runs.append(FakeRunningJob(message, self.in_worker))
        return self.runs[-1]

    def started(self) -> list[str]:
        """The ids of the jobs run so far, in the order they were started."""
        return [running.job for running in self.runs]


class RecordingRunner:
    """Runs blocking calls at once, like ``threads.Synchronous``, and remembers each one."""

    def __init__(self) -> None:
        self.calls: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []

    def run(self, f: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        self.calls.append((f, args))
        return defer.maybeDeferred(f, *args)


class HeldRunner:
    """Like the store's one thread: runs calls in the order given, but only when the test says."""

    def __init__(self) -> None:
        self.held: deque[tuple[Callable[..., Any], tuple[Any, ...], defer.Deferred[Any]]] = deque()

    def run(self, f: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        done: defer.Deferred[Any] = defer.Deferred()
        self.held.append((f, args, done))
        return done

    def step(self) -> None:
        """Run the oldest held call."""
        f, args, done = self.held.popleft()
        defer.maybeDeferred(f, *args).chainDeferred(done)

    def release(self) -> None:
        """Run every held call, and those they lead to."""
        while self.held:
            self.step()


class FakeInfo:
    """The InfoService's one method: answers at once, or holds each answer for the test."""

    def __init__(self, error: Exception | None = None) -> None:
        self.asked: list[str] = []
        self.held: list[defer.Deferred[dict[str, Any]]] = []
        self.hold = False
        self._error = error

    def answer(self, request: str) -> defer.Deferred[dict[str, Any]]:
        self.asked.append(request)
        if self._error is not None:
            raise self._error
        if self.hold:
            self.held.append(defer.Deferred())
            return self.held[-1]
        return defer.succeed({"Asked": request})
