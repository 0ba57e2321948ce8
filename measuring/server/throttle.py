"""
Warnings that anyone who can connect can cause (a request without a valid token), held to a rate:
so that no client can grow the server's log without bound by reconnecting.

``Throttle.warn`` logs the first ``burst`` warnings of a kind in each ``period`` as they come;
the rest are counted, and one line at the end of the period says how many were not logged. Time
comes from the injected clock. Counters that must be exact (``All statistic``) are kept
elsewhere (``stats``), not here.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger, LogLevel

#: Warnings of one kind logged one by one in a period; then counted.
BURST = 10
PERIOD = 60.0


class Throttle:
    """Logs at most ``burst`` warnings of each kind per ``period`` seconds, then a count."""

    def __init__(
        self,
        clock: IReactorTime | None,
        burst: int = BURST,
        period: float = PERIOD,
        log: Logger | None = None,
    ) -> None:
        self._clock = clock
        self._burst = burst
        self._period = period
        self._log = log or Logger()
        self._logged: dict[str, int] = {}
        self._held: dict[str, int] = {}
        self._window: IDelayedCall | None = None

    def warn(self, kind: str, format: str, **fields: Any) -> None:
        """
        Log ``format`` with ``fields`` as a warning unless ``burst`` lines of ``kind`` (a few
        words, such as "requests without a valid token") were logged in this period; count it
        if not. Without a clock every line is logged.
        """
        self._emit(LogLevel.warn, kind, format, fields)

    def info(self, kind: str, format: str, **fields: Any) -> None:
        """Like ``warn``, at the info level."""
        self._emit(LogLevel.info, kind, format, fields)

    def _emit(self, level: LogLevel, kind: str, format: str, fields: dict[str, Any]) -> None:
        if self._clock is None:
            self._log.emit(level, format, **fields)
            return
        if self._window is None:
            self._window = self._clock.callLater(self._period, self._close_window)
        logged = self._logged.get(kind, 0)
        if logged < self._burst:
            self._logged[kind] = logged + 1
            self._log.emit(level, format, **fields)
        else:
            self._held[kind] = self._held.get(kind, 0) + 1

    def _close_window(self) -> None:
        self._window = None
        held, self._held, self._logged = self._held, {}, {}
        for kind, count in held.items():
            self._log.warn(
                "{count} more {kind} in the last {period:g} s (not logged one by one)",
                count=count,
                kind=kind,
                period=self._period,
            )
