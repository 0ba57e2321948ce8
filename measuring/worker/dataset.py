"""
Runs in the worker process: a job's Parquet dataset as a Dask DataFrame, with either engine.

Never imports twisted or ``measuring.server``; dask and pandas are imported inside the
functions.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import dask.dataframe as dd
    import pandas as pd


def read_dataset(path: str, engine: str) -> dd.DataFrame:
    """The Parquet file or folder at ``path`` as a Dask DataFrame, read with ``engine``."""
    import dask.dataframe as dd

    if engine == "fastparquet":
        return _read_fastparquet(path)
    dataset = dd.read_parquet(path, engine="pyarrow", calculate_divisions=True)
    tz = getattr(dataset.index.dtype, "tz", None)
    if tz is not None and dataset.known_divisions:
        # Dask gives the divisions of a time-zoned index in UTC; resample needs the index's zone.
        import pandas as pd

        divisions = tuple(pd.DatetimeIndex(dataset.divisions).tz_convert(tz))
        name = dataset.index.name
        dataset = dataset.reset_index().set_index(name, sorted=True, divisions=divisions)
    return dataset


def _read_fastparquet(path: str) -> dd.DataFrame:
    """
    Dask 2026 reads Parquet only through pyarrow, so build the frame from fastparquet row groups.

    One partition per row group; each partition opens the file itself, so partitions read in
    parallel threads without sharing a file handle. Like the pyarrow reader, a sorted index gives
    known divisions (from the row groups' statistics), so that resample and index slicing work.
    """
    import dask.dataframe as dd
    import fastparquet

    parquet = fastparquet.ParquetFile(_parquet_files(path), root=path)
    meta = parquet.head(0)
    if not parquet.row_groups:
        return dd.from_pandas(meta, npartitions=1)
    return dd.from_map(
        _RowGroupReader(parquet),
        range(len(parquet.row_groups)),
        meta=meta,
        divisions=_divisions(parquet, meta),
        enforce_metadata=False,
    )


def _divisions(parquet: Any, meta: pd.DataFrame) -> tuple[Any, ...] | None:
    """Partition bounds from the row groups' index statistics, or None when not sorted."""
    import pandas as pd

    columns = (parquet.pandas_metadata or {}).get("index_columns", [])
    if len(columns) != 1 or not isinstance(columns[0], str):
        return None
    lows = parquet.statistics["min"].get(columns[0])
    highs = parquet.statistics["max"].get(columns[0])
    if not lows or any(value is None for value in [*lows, *highs]):
        return None
    if any(high >= low for high, low in zip(highs, lows[1:], strict=False)):
        return None
    bounds = pd.Index([*lows, highs[-1]])
    tz = getattr(meta.index.dtype, "tz", None)
    if tz is not None:
        bounds = bounds.tz_localize("UTC").tz_convert(tz)
    return tuple(bounds)


def _parquet_files(path: str) -> str | list[str]:
    """
    A folder's data files in the order Dask's own reader takes them (``part.2`` before
    ``part.10``), skipping names starting with ``_`` or ``.`` as pyarrow does.
    """
    from dask.utils import natural_sort_key

    if not os.path.isdir(path) or os.path.exists(os.path.join(path, "_metadata")):
        return path
    files = []
    for folder, folders, names in os.walk(path):
        folders[:] = [name for name in folders if not name.startswith(("_", "."))]
        files += [os.path.join(folder, name) for name in names if not name.startswith(("_", "."))]
    return sorted(files, key=natural_sort_key)


class _RowGroupReader:
    """Reads one row group of a fastparquet dataset into pandas; each call opens its own file."""

    def __init__(self, parquet: Any) -> None:
        self.parquet = parquet

    def __call__(self, index: int) -> pd.DataFrame:
        return self.parquet[index].to_pandas()
