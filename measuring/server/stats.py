"""
Counters of what the server has done since it started, for the ``All statistic`` answer.

Updated on the reactor thread only (by dispatch); plain Python.
"""

from __future__ import annotations

from collections import Counter
from typing import Any


class Stats:
    """Requests by Header, and error answers by Code. (Jobs are counted in their database.)"""

    def __init__(self) -> None:
        self.requests: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()

    def request(self, header: str) -> None:
        self.requests[header] += 1

    def error(self, code: str) -> None:
        self.errors[code] += 1

    def snapshot(self) -> dict[str, Any]:
        """The counters as JSON."""
        return {
            "Requests": {"Total": sum(self.requests.values()), **dict(self.requests)},
            "Errors": {"Total": sum(self.errors.values()), **dict(self.errors)},
        }
