"""
What several test modules share: sample time-series data, formula files, and a real server
(``measuring.local``, the same one the demo starts).
"""

from __future__ import annotations

import os
import textwrap
from typing import Any

from measuring.local import Connection, LocalServer, environment

__all__ = ["Connection", "Server", "environment", "sample_frame", "write_dataset", "write_formulas"]

FORMULAS = '''
def mean_by_sensor(df):
    """The mean value of each sensor."""
    return df.groupby("sensor").value.mean()


def peak(df):
    return df.value.max()


def hourly(df):
    return df.set_index("time", sorted=True).value.resample("1h").mean()


def count(df):
    return len(df)


def _helper(df):
    return 0
'''


def sample_frame(rows: int = 10_000, sensors: int = 3, seed: int = 1) -> Any:
    """A time series: one reading per second from several sensors, with a few NaN values."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(
        {
            "time": pd.date_range("2026-01-01", periods=rows, freq="s"),
            "sensor": rng.choice([f"s{i}" for i in range(1, sensors + 1)], rows),
            "value": rng.normal(20.0, 5.0, rows),
        }
    )
    frame.loc[frame.index[::997], "value"] = float("nan")
    return frame


def write_dataset(
    folder: str,
    name: str = "time_series.parquet",
    frame: Any = None,
    row_group_size: int | None = None,
) -> str:
    """Write ``frame`` (or ``sample_frame()``) as Parquet in ``folder``; returns its path."""
    frame = sample_frame() if frame is None else frame
    path = os.path.join(folder, name)
    frame.to_parquet(path, engine="pyarrow", index=False, row_group_size=row_group_size)
    return path


def write_formulas(folder: str, source: str = FORMULAS, name: str = "work.py") -> str:
    """Write a formula file (dedented) in ``folder``; returns its path."""
    path = os.path.join(folder, name)
    with open(path, "w") as f:
        f.write(textwrap.dedent(source))
    return path


class Server(LocalServer):
    """
    The real server for a test, in ``folder``; ``descendants`` shows what it left running.

    Jobs still running at the end of a test are given 2 s, not 30, to end when it stops (a test
    may pass its own ``--stop-grace``; the last one given wins).
    """

    def __init__(self, folder: str, *arguments: str, patience: float = 60.0) -> None:
        super().__init__(folder, "--stop-grace", "2", *arguments, patience=patience)

    def descendants(self) -> list[int]:
        """Pids of every process below the server."""
        import psutil

        try:
            return [p.pid for p in psutil.Process(self.process.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return []
