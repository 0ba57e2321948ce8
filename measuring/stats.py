"""
Counters of what the server has done since it started, for the ``All statistic`` answer.

Updated on the reactor thread only (by dispatch and jobs); plain Python.
"""

from __future__ import annotations

from collections import Counter
from typing import Any


class Stats:
    """Requests by Header, errors by Code, finished jobs by how they ended."""

    def __init__(self) -> None:
        self.requests: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.jobs: Counter[str] = Counter()
        self._job_seconds = 0.0

    def request(self, header: str) -> None:
        self.requests[header] += 1

    def error(self, code: str) -> None:
        self.errors[code] += 1

    def job_finished(self, state: str, seconds: float) -> None:
        self.jobs[state] += 1
        self._job_seconds += seconds

    def snapshot(self) -> dict[str, Any]:
        """The counters as JSON."""
        finished = sum(self.jobs.values())
        return {
            "Requests": {"Total": sum(self.requests.values()), **dict(self.requests)},
            "Errors": {"Total": sum(self.errors.values()), **dict(self.errors)},
            "Jobs": {
                "Finished": finished,
                **{state.capitalize(): count for state, count in self.jobs.items()},
                "MeanSeconds": round(self._job_seconds / finished, 3) if finished else None,
            },
        }
