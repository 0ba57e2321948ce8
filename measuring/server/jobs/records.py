"""
What a job is: its request (``JobSpec``), its record (``Job``), and how both look on disk and in
answers.

Plain data and Deferreds for those waiting on a job's end; no reactor, no I/O.
"""

from __future__ import annotations

import datetime
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from twisted.internet import defer

from measuring.errors import MeasuringError, from_json
from measuring.messages import Message
from measuring.server.paths import JobPaths
from measuring.wire import FINISHED

#: States a job ends in, and all its states.
Progress = Callable[[int, int], None]
#: Seconds between two Progress lines of a job, at least (whatever its worker sends).
PROGRESS_EVERY = 0.25


def iso(seconds: float | None) -> str | None:
    """Seconds since the epoch as an ISO 8601 UTC time."""
    if seconds is None:
        return None
    return datetime.datetime.fromtimestamp(seconds, tz=datetime.UTC).isoformat(timespec="seconds")


def new_job_id(now: float) -> str:
    """A job id that sorts by submission time: ``20261128-084150-3f9a2c`` (UTC)."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime(now)) + "-" + secrets.token_hex(3)


def stored_response(response: dict[str, Any] | None) -> dict[str, Any] | None:
    """A job's Response as the database keeps it: without the Log, which has its own column."""
    if response is None:
        return None
    return {key: value for key, value in response.items() if key != "Log"}


@dataclass(frozen=True)
class JobSpec:
    """A checked Dask request: what to run, on what, how to write it, and for how long at most."""

    paths: JobPaths
    functions: tuple[str, ...] | None = None
    output: str = "parquet"
    engine: str = "pyarrow"
    timeout: float | None = None
    #: The column the dataset is indexed by, if the request names one.
    index: str | None = None
    #: Formulas sent with the request, and the file name they go by (``paths.file`` is None).
    code: str | None = None
    name: str | None = None

    def message(self, job: str) -> Message:
        """The Job message a worker process runs."""
        return {
            **({"Code": self.code, "Name": self.name} if self.code is not None else {}),
            "Type": "Job",
            "Job": job,
            "Directory": self.paths.directory,
            "Base": self.paths.base,
            "File": self.paths.file,
            "Functions": list(self.functions) if self.functions is not None else None,
            "Output": self.output,
            "Engine": self.engine,
            **({"Index": self.index} if self.index is not None else {}),
        }

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "functions": self.functions and list(self.functions)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> JobSpec:
        functions = data.get("functions")
        return cls(
            paths=JobPaths(**data["paths"]),
            functions=tuple(functions) if functions is not None else None,
            output=data.get("output", "parquet"),
            engine=data.get("engine", "pyarrow"),
            timeout=data.get("timeout"),
            index=data.get("index"),
            code=data.get("code"),
            name=data.get("name"),
        )


@dataclass
class Job:
    """One job and what became of it; times are seconds since the epoch."""

    id: str
    spec: JobSpec
    submitted: float
    state: str = "queued"
    started: float | None = None
    finished: float | None = None
    attempts: int = 0
    response: dict[str, Any] | None = None
    error: MeasuringError | None = None
    log: str = ""
    _waiting: list[defer.Deferred[Job]] = field(default_factory=list, repr=False)
    _listeners: list[Progress] = field(default_factory=list, repr=False)
    #: The last (done, total) its running computation reported.
    last_progress: tuple[int, int] | None = field(default=None, repr=False)
    _progress_told: float | None = field(default=None, repr=False)
    _interrupted: MeasuringError | None = field(default=None, repr=False)

    @property
    def ended(self) -> bool:
        return self.state in FINISHED

    def when_finished(self) -> defer.Deferred[Job]:
        """
        Fires with the job once it has ended (done or not: see ``response`` and ``error``), or
        fails with why it will not end now (the server stops).
        """
        if self.ended:
            return defer.succeed(self)
        if self._interrupted is not None:
            return defer.fail(self._interrupted)
        waiting: defer.Deferred[Job] = defer.Deferred()
        self._waiting.append(waiting)
        return waiting

    def listen(self, progress: Progress) -> None:
        """Call ``progress(done, total)`` as the job's tasks complete, until it ends."""
        if not self.ended:
            self._listeners.append(progress)

    def progress(self, done: int, total: int, now: float) -> None:
        """
        Pass on the job's progress (``now`` from the server's clock): at most
        ``PROGRESS_EVERY`` seconds apart, and the end. The one place progress is throttled.
        """
        self.last_progress = (done, total)
        told = self._progress_told
        if done < total and told is not None and now - told < PROGRESS_EVERY:
            return
        self._progress_told = now
        for listener in list(self._listeners):
            listener(done, total)

    def settle(
        self, state: str, response: dict[str, Any] | None, error: MeasuringError | None
    ) -> None:
        """Record how the job ended and tell everyone waiting."""
        self.state, self.response, self.error = state, response, error
        waiting, self._waiting, self._listeners = self._waiting, [], []
        for d in waiting:
            d.callback(self)

    def interrupt(self, error: MeasuringError) -> None:
        """Tell everyone waiting, and anyone who asks later, that the job will not end now."""
        self._interrupted = error
        waiting, self._waiting, self._listeners = self._waiting, [], []
        for d in waiting:
            d.errback(error)

    def record(self) -> dict[str, Any]:
        """The job as a row of the job database."""
        return {
            "id": self.id,
            "state": self.state,
            "spec": self.spec.to_json(),
            "submitted": self.submitted,
            "started": self.started,
            "finished": self.finished,
            "attempts": self.attempts,
            "response": stored_response(self.response),
            "error": self.error.to_json() if self.error is not None else None,
            "log": self.log,
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Job:
        error, response = record.get("error"), record.get("response")
        log = record.get("log") or ""
        return cls(
            id=record["id"],
            spec=JobSpec.from_json(record["spec"]),
            submitted=record["submitted"],
            state=record["state"],
            started=record.get("started"),
            finished=record.get("finished"),
            attempts=record.get("attempts", 0),
            response={**response, "Log": log} if response is not None else None,
            error=from_json(error) if error is not None else None,
            log=log,
        )

    def summary(self) -> dict[str, Any]:
        """The job as a line of a List answer (with its Error when it ended without results)."""
        summary: dict[str, Any] = {
            "Job": self.id,
            "State": self.state,
            "Submitted": iso(self.submitted),
            "Directory": self.spec.paths.directory,
            "Base": self.spec.paths.base,
            "File": self.spec.paths.file,
            **({"Name": self.spec.name} if self.spec.code is not None else {}),
        }
        if self.error is not None:
            summary["Error"] = self.error.to_json()
        return summary

    def status(self) -> dict[str, Any]:
        """The Response of a Job Status request."""
        status: dict[str, Any] = {
            **self.summary(),
            "Functions": list(self.spec.functions) if self.spec.functions else None,
            "Started": iso(self.started),
            "Finished": iso(self.finished),
            "Attempts": self.attempts,
        }
        del status["Job"]
        if self.state == "running" and self.last_progress is not None:
            status["Progress"] = dict(zip(("Done", "Total"), self.last_progress, strict=True))
        if self.response is not None:
            status["Results"] = self.response["Results"]
            status["Elapsed"] = self.response.get("Elapsed")
        return status


@dataclass(frozen=True)
class Limits:
    """
    How much work the server takes on, and how long it keeps what is done: the settings of the
    same names (``measuring.server.settings``), which also hold their defaults.
    """

    workers: int
    job_timeout: float
    max_queued: int
    stop_grace: float
    keep_jobs: float
    keep_results: float | None


@dataclass(frozen=True)
class Outcome:
    """What running a job gave: its results or its error, and what it printed."""

    results: dict[str, Any] | None
    error: MeasuringError | None
    log: str
