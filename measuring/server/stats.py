"""
Counters of what the server has done since it started: for the ``All statistic`` answer and for
``/metrics`` (``measuring.server.web.metrics`` reads them as they are, at scrape time).

Updated on the reactor thread only (by dispatch and the scheduler); plain Python, each update a
few dictionary operations, so that counting never slows an answer.
"""

from __future__ import annotations

import bisect
from collections import Counter
from typing import Any

from measuring.wire import HEADERS

#: Upper bounds, in seconds, of the buckets of the job time histograms: from a formula over a
#: small file (a fraction of a second) to the longest job the default --job-timeout lets run.
SECONDS_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
                   3600.0)  # fmt: skip


class Histogram:
    """Observations counted in buckets (each count is of the observations up to its bound)."""

    def __init__(self, bounds: tuple[float, ...] = SECONDS_BUCKETS) -> None:
        self.bounds = bounds
        self._counts = [0] * (len(bounds) + 1)
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self._counts[bisect.bisect_left(self.bounds, value)] += 1
        self.count += 1
        self.sum += value

    def cumulative(self) -> list[tuple[float, int]]:
        """(bound, observations up to it) for each bound, and (inf, all of them) last."""
        totals, total = [], 0
        for bound, count in zip((*self.bounds, float("inf")), self._counts, strict=True):
            total += count
            totals.append((bound, total))
        return totals


class Stats:
    """
    Requests by Header, error answers by Code, answers by Header and Code; jobs by the state they
    entered, how long they waited in the queue and how long they ran.
    (How many jobs are on record is the job database's to say.)
    """

    def __init__(self) -> None:
        self.requests: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.answers: Counter[tuple[str, str]] = Counter()
        self.jobs: Counter[str] = Counter()
        self.waited = Histogram()
        self.ran = Histogram()

    def request(self, header: str) -> None:
        self.requests[header] += 1

    def error(self, code: str) -> None:
        self.errors[code] += 1

    def answered(self, answer: dict[str, Any]) -> None:
        """Count one answer by its Header (known ones only) and its Code (``OK`` when none)."""
        header = answer.get("Header")
        error = answer.get("Error")
        code = error.get("Code", "Internal") if isinstance(error, dict) else "OK"
        self.answers[(header if header in HEADERS else "Other", str(code))] += 1

    def job_queued(self) -> None:
        """A job was queued (accepted, or queued again at a start)."""
        self.jobs["queued"] += 1

    def job_started(self, waited: float) -> None:
        """A job left the queue after ``waited`` seconds and started."""
        self.jobs["running"] += 1
        self.waited.observe(max(0.0, waited))

    def job_ended(self, state: str, ran: float | None) -> None:
        """A job ended in ``state`` after running ``ran`` seconds (None: it never started)."""
        self.jobs[state] += 1
        if ran is not None:
            self.ran.observe(max(0.0, ran))

    def snapshot(self) -> dict[str, Any]:
        """The counters as JSON."""
        return {
            "Requests": {"Total": sum(self.requests.values()), **dict(self.requests)},
            "Errors": {"Total": sum(self.errors.values()), **dict(self.errors)},
        }
