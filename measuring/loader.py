"""
Files in: where a job's paths lead, and reading its Parquet dataset (``results`` writes out).

Path resolution (``resolve_job``) runs in the server before a job is accepted; reading runs in
the worker process. Nothing here imports the reactor; dask and pandas are imported only by the
functions that read, so the server never loads them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from measuring.errors import BadRequest, Forbidden, NotFound

if TYPE_CHECKING:
    import dask.dataframe as dd
    import pandas as pd

ENGINES = ("pyarrow", "fastparquet")
RESULTS = "results"


@dataclass(frozen=True)
class JobPaths:
    """A job's real, absolute paths, each checked to lie inside the data roots."""

    directory: str
    base: str
    file: str


def inside(path: str, folder: str) -> bool:
    """True when the real path ``path`` is ``folder`` or lies below it (both real and absolute)."""
    return os.path.commonpath([path, folder]) == folder


def _checked_text(field: str, value: str) -> str:
    if not value:
        raise BadRequest(f"{field} must not be empty")
    if "\0" in value:
        raise BadRequest(f"{field} must not contain a NUL character")
    return value


def resolve_directory(roots: tuple[str, ...], directory: str, private: tuple[str, ...] = ()) -> str:
    """
    The real path of ``Directory``: absolute inside a root, or relative to the first root; never
    inside one of the server's ``private`` folders (its state directory), and writable.
    """
    _checked_text("Directory", directory)
    real = os.path.realpath(os.path.join(roots[0], directory))
    if not any(inside(real, root) for root in roots):
        raise Forbidden(
            f"Directory {directory!r} is outside the data roots of this server ({', '.join(roots)})"
        )
    _not_private("Directory", directory, real, private)
    if not os.path.isdir(real):
        raise NotFound(f"Directory {directory!r} does not exist (looked for {real})")
    if not os.access(real, os.W_OK | os.X_OK):
        raise Forbidden(f"Directory {directory!r} is not writable by the server")
    return real


def resolve_inside(directory: str, field: str, name: str, is_kind: Callable[[str], bool]) -> str:
    """The real path of ``name`` (Base or File), which must exist inside ``directory``."""
    _checked_text(field, name)
    real = os.path.realpath(os.path.join(directory, name))
    if not inside(real, directory):
        raise Forbidden(f"{field} {name!r} leads outside its Directory {directory}")
    if not os.path.exists(real):
        raise NotFound(f"{field} {name!r} was not found in {directory}")
    if not is_kind(real):
        raise BadRequest(f"{field} {name!r} in {directory} is not a {_KINDS[field]}")
    return real


_KINDS = {"Base": "Parquet file or folder", "File": "file"}


def _not_private(field: str, name: str, real: str, private: tuple[str, ...]) -> None:
    if any(inside(real, folder) for folder in private):
        raise Forbidden(f"{field} {name!r} is in the server's own state directory")


def resolve_job(
    roots: tuple[str, ...], directory: str, base: str, file: str, private: tuple[str, ...] = ()
) -> JobPaths:
    """Check a Dask request's paths; raises BadRequest, Forbidden or NotFound naming the field."""
    real_directory = resolve_directory(roots, directory, private)
    results = os.path.realpath(os.path.join(real_directory, RESULTS))
    if not inside(results, real_directory):
        raise Forbidden(f"{real_directory}/{RESULTS} leads outside its Directory")
    if os.path.exists(results) and not os.path.isdir(results):
        raise BadRequest(f"{real_directory}/{RESULTS} exists and is not a folder; results go there")
    _not_private("Directory", f"{directory}/{RESULTS}", results, private)
    paths = JobPaths(
        directory=real_directory,
        base=resolve_inside(
            real_directory, "Base", base, lambda p: os.path.isfile(p) or os.path.isdir(p)
        ),
        file=resolve_inside(real_directory, "File", file, os.path.isfile),
    )
    _not_private("Base", base, paths.base, private)
    _not_private("File", file, paths.file, private)
    return paths


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
