"""
Progress bars of the client: a job's tasks, and large transfers of a result.

tqdm (which draws in terminals and notebooks alike) is imported only when a bar is first drawn.
Standard library only at import.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

#: Transfers from LARGE bytes (or LARGE_ROWS rows, as JSON pages) get a bar by themselves in a
#: terminal or a notebook.
LARGE = 32 << 20
LARGE_ROWS = 200_000
Progress = Callable[[int, int], None]


class Bar:
    """
    A progress bar (tqdm's, which draws in terminals and notebooks alike) as a Progress callback.
    Nothing is drawn until the first report; ``close`` leaves it showing where it stopped.
    """

    def __init__(self, description: str, unit: str = "task", scale: bool = False) -> None:
        self._description, self._unit, self._scale = description, unit, scale
        self._shown: Any = None

    def __call__(self, done: int, total: int) -> None:
        if self._shown is None:
            from tqdm.auto import tqdm

            self._shown = tqdm(
                desc=self._description, unit=self._unit, unit_scale=self._scale, leave=True
            )
        self._shown.total = total
        self._shown.n = done
        self._shown.refresh()

    def close(self) -> None:
        """End the bar's line (at once if it was never drawn)."""
        if self._shown is not None:
            self._shown.close()


def bar(description: str) -> Bar:
    """A progress bar of a job's tasks."""
    return Bar(description)


def reporter(progress: Progress | bool | None, description: str) -> Progress | None:
    if progress is True:
        return bar(description)
    return progress or None


def close(report: Progress | None) -> None:
    close = getattr(report, "close", None)
    if close is not None:
        close()


def interactive() -> bool:
    """True in a terminal or a notebook, where a bar is seen."""
    return sys.stderr.isatty() or "ipykernel" in sys.modules


def transfer(progress: Progress | bool | None, size: int, large: int, what: str) -> Progress | None:
    """The report of a transfer of ``size`` (bytes or rows); a bar by itself when it is large."""
    if progress is None and size >= large and interactive():
        progress = True
    if progress is True:
        return Bar(what, unit="B", scale=True) if large == LARGE else Bar(what, unit="row")
    return progress or None
