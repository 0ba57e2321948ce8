"""
What the scheduler works with, as it sees it: the pool that runs jobs, the store that keeps their
records, and the limits it holds jobs to. Protocols and plain data; nothing here runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from twisted.internet import defer

from measuring.errors import MeasuringError
from measuring.messages import Message
from measuring.server.jobs.records import Progress


class RunningJob(Protocol):
    """What the pool gives back for a job it runs (``measuring.server.pool.process.RunningJob``)."""

    result: defer.Deferred[dict[str, Any]]
    on_progress: Progress | None

    def kill(self, reason: MeasuringError) -> None: ...

    def log_text(self) -> str: ...


class Pool(Protocol):
    """Where jobs run (``measuring.server.pool.pool.WorkerPool``)."""

    def run(self, message: Message) -> RunningJob: ...


class Store(Protocol):
    """Where job records live (``measuring.server.jobs.store.JobStore``)."""

    def add(self, record: dict[str, Any]) -> defer.Deferred[None]: ...

    def update(self, job: str, **fields: Any) -> defer.Deferred[None]: ...

    def get(self, job: str) -> defer.Deferred[dict[str, Any] | None]: ...

    def recent(self, state: str | None, limit: int) -> defer.Deferred[list[dict[str, Any]]]: ...

    def recover(self, most: int, now: float) -> defer.Deferred[list[dict[str, Any]]]: ...

    def expired_results(self, before: float) -> defer.Deferred[list[dict[str, Any]]]: ...

    def mark_cleaned(self, jobs: list[str]) -> defer.Deferred[None]: ...

    def sweep(self, before: float, cleaned_only: bool) -> defer.Deferred[int]: ...

    def counters(self, since: float) -> defer.Deferred[dict[str, Any]]: ...


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
