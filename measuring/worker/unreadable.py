"""
Runs in the job process: which file of a Parquet dataset cannot be read, and which row group.

A truncated or damaged file makes the readers fail with words that name neither the file nor
the place (``OSError: [Errno 22] Invalid argument``, ``Corrupt snappy compressed data``); the
job's error names them instead. ``from_reading`` tells whether an error came from reading the
data; ``locate`` reads the dataset again, file by file and row group by row group, with the job's
engine, and says where it fails. Only on the way to an error, and within a time budget. Never
imports twisted or ``measuring.server``; pyarrow and fastparquet are imported inside.
"""

from __future__ import annotations

import os
import time
import traceback

#: Where in a traceback a reading error comes from: the readers and their decompressors.
READERS = ("/pyarrow/", "/fastparquet/", "/cramjam/", "/thrift", "measuring/worker/dataset.py")
#: Seconds ``locate`` may read before it gives up.
BUDGET = 60.0


def from_reading(error: BaseException) -> bool:
    """True when ``error`` (or what it was raised from) was raised reading Parquet data."""
    seen: BaseException | None = error
    while seen is not None:
        for frame in traceback.extract_tb(seen.__traceback__):
            if any(reader in frame.filename for reader in READERS):
                return True
        seen = seen.__cause__ or seen.__context__
    return False


def _row_groups(path: str, engine: str) -> tuple[int, object]:
    """How many row groups ``path`` has, and what reads them (the file opened with ``engine``)."""
    if engine == "fastparquet":
        import fastparquet

        opened = fastparquet.ParquetFile(path)
        return len(opened.row_groups), opened
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    return parquet.num_row_groups, parquet


def _read(opened: object, engine: str, group: int) -> None:
    if engine == "fastparquet":
        opened[group].to_pandas()  # type: ignore[index]
    else:
        opened.read_row_group(group, use_threads=False)  # type: ignore[attr-defined]


def _said(error: BaseException) -> str:
    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def locate(base: str, engine: str = "pyarrow", budget: float = BUDGET) -> str | None:
    """
    What cannot be read in the Parquet file or folder ``base``: ``plant/part.3.parquet is not
    readable Parquet (row group 2 of 4): OSError: Corrupt snappy compressed data`` (row groups
    counted from 1), the file named from ``base``'s folder; None when every file reads (or
    ``budget`` seconds were not enough to find the one that does not).
    """
    from measuring.worker.dataset import parquet_files

    deadline = time.monotonic() + budget
    above = os.path.dirname(os.path.normpath(base))
    for path in parquet_files(base):
        name = os.path.relpath(path, above)
        try:
            groups, opened = _row_groups(path, engine)
        except Exception as e:
            return f"{name} is not readable Parquet (its footer cannot be read): {_said(e)}"
        for group in range(groups):
            if time.monotonic() > deadline:
                return None
            try:
                _read(opened, engine, group)
            except Exception as e:
                return (
                    f"{name} is not readable Parquet (row group {group + 1} of {groups}): "
                    f"{_said(e)}"
                )
    return None
