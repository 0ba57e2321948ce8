"""
The sample data and the formula files of a test's folder: a time series as pandas makes it,
written as Parquet, and formula sources written as files.
"""

from __future__ import annotations

import os
import textwrap
from typing import Any

from measuring.test.support.formulas import FORMULAS


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


def write_parts(folder: str, name: str = "data.parquet", rows: int = 10) -> str:
    """A dataset folder ``name`` in ``folder`` holding one small Parquet part; returns its path."""
    path = os.path.join(folder, name)
    os.makedirs(path)
    write_dataset(path, "part.0.parquet", sample_frame(rows))
    return path


def write_formulas(folder: str, source: str = FORMULAS, name: str = "work.py") -> str:
    """Write a formula file (dedented) in ``folder``; returns its path."""
    path = os.path.join(folder, name)
    with open(path, "w") as f:
        f.write(textwrap.dedent(source))
    return path
