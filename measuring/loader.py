"""
Files in and out: where a job's paths lead, reading its Parquet dataset, writing its results.

Path resolution (``resolve_job``) runs in the server before a job is accepted; reading and writing
run in the worker process. Nothing here imports the reactor; dask and pandas are imported only by
the functions that read and write, so the server never loads them.
"""

from __future__ import annotations

import datetime
import decimal
import json
import math
import os
import shutil
import stat
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from measuring.errors import BadRequest, Forbidden, NotFound

if TYPE_CHECKING:
    import dask.dataframe as dd
    import pandas as pd

ENGINES = ("pyarrow", "fastparquet")
OUTPUTS = {"parquet": ".parquet", "csv": ".csv", "json": ".json"}
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


def partial_dir(directory: str, job: str) -> str:
    """Where a job's results are written before they appear under their final name."""
    return os.path.join(directory, RESULTS, f".{job}.partial")


def result_file(job: str, name: str, output: str) -> str:
    """Where a formula's table is, relative to the job's Directory: results/<job>/<name>.<ext>."""
    return os.path.join(RESULTS, job, name + OUTPUTS[output])


def result_dir(directory: str, job: str) -> str:
    """Where a job's results appear, complete."""
    return os.path.join(directory, RESULTS, job)


def _old_dir(directory: str, job: str) -> str:
    return os.path.join(directory, RESULTS, f".{job}.old")


def remove_partial(directory: str, job: str) -> None:
    """Remove what a job that did not finish left half-written or half-replaced."""
    shutil.rmtree(partial_dir(directory, job), ignore_errors=True)
    shutil.rmtree(_old_dir(directory, job), ignore_errors=True)


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _results_folder(directory: str) -> str:
    """``<directory>/results``, made if missing, checked to stay inside ``directory``."""
    results = os.path.join(directory, RESULTS)
    os.makedirs(results, exist_ok=True)
    if not inside(os.path.realpath(results), os.path.realpath(directory)):
        raise Forbidden(f"{results} leads outside its Directory")
    return results


def _publish(directory: str, job: str) -> None:
    """Give the synced partial folder of ``job`` its final name, replacing an earlier run's."""
    partial, final = partial_dir(directory, job), result_dir(directory, job)
    _fsync(partial)
    if os.path.exists(final):
        old = _old_dir(directory, job)
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        os.rename(partial, final)
        shutil.rmtree(old)
    else:
        os.rename(partial, final)
    _fsync(os.path.join(directory, RESULTS))


class ResultsTooLarge(Exception):
    """A job's results are larger than it may write."""


def write_results(
    directory: str,
    job: str,
    frames: dict[str, pd.DataFrame],
    output: str,
    max_bytes: int | None = None,
) -> dict[str, str]:
    """
    Write each frame to ``results/<job>/<name>.<ext>`` and return the paths relative to directory.

    The folder appears complete or not at all: everything is written and synced in a partial
    folder beside it, which is then renamed. A job run again replaces the folder its earlier run
    wrote. Past ``max_bytes`` in all, ResultsTooLarge is raised and nothing is left.
    """
    if not frames:
        return {}
    _results_folder(directory)
    partial = partial_dir(directory, job)
    shutil.rmtree(partial, ignore_errors=True)
    os.mkdir(partial)
    try:
        names, written = {}, 0
        for name, frame in frames.items():
            filename = name + OUTPUTS[output]
            path = os.path.join(partial, filename)
            _WRITERS[output](frame, path)
            _fsync(path)
            written += os.path.getsize(path)
            if max_bytes is not None and written > max_bytes:
                raise ResultsTooLarge(
                    f"the results take {written} bytes by {name}, more than the "
                    f"{max_bytes} a job may write (--max-result-bytes)"
                )
            names[name] = result_file(job, name, output)
        _publish(directory, job)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return names


def place_results(outbox: str, directory: str, job: str) -> None:
    """
    Move the results a sandboxed worker wrote in its ``outbox`` into ``directory``, the same way
    they appear when written there: complete or not at all (copied when on another file system).
    """
    source = result_dir(outbox, job)
    if not os.path.lexists(source):
        return
    # What a sandboxed formula left must not lead the server (which sees everything) elsewhere.
    if os.path.realpath(source) != os.path.join(os.path.realpath(outbox), RESULTS, job):
        raise Forbidden(f"{source} leads outside the worker's outbox")
    for name in os.listdir(source):
        if not stat.S_ISREG(os.lstat(os.path.join(source, name)).st_mode):
            raise Forbidden(f"{name} in the results is not a plain file")
    _results_folder(directory)
    partial = partial_dir(directory, job)
    shutil.rmtree(partial, ignore_errors=True)
    try:
        try:
            os.rename(source, partial)
        except OSError:
            shutil.copytree(source, partial, symlinks=True)
            for name in os.listdir(partial):
                _fsync(os.path.join(partial, name))
        _publish(directory, job)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def column_types(frame: pd.DataFrame) -> dict[str, str]:
    """The dtype of each index level (when written) and column, by name: what JSON loses."""
    levels = (
        {
            str(name): str(frame.index.get_level_values(i).dtype)
            for i, name in enumerate(frame.index.names)
        }
        if has_own_index(frame)
        else {}
    )
    return {**levels, **{str(name): str(dtype) for name, dtype in frame.dtypes.items()}}


def has_own_index(frame: pd.DataFrame) -> bool:
    """True when the index carries data (a named or non-default index), so it must be kept."""
    import pandas as pd

    index = frame.index
    return not (
        isinstance(index, pd.RangeIndex)
        and index.name is None
        and index.start == 0
        and index.step == 1
    )


def _write_parquet(frame: pd.DataFrame, path: str) -> None:
    frame.to_parquet(path, engine="pyarrow", index=has_own_index(frame))


def _write_csv(frame: pd.DataFrame, path: str) -> None:
    frame.to_csv(path, index=has_own_index(frame))


def _write_json(frame: pd.DataFrame, path: str) -> None:
    """A JSON array of records, exact: floats keep every digit, NaN and infinities become null."""
    with open(path, "w", encoding="utf-8") as f:
        f.write("[")
        for start in range(0, len(frame), 10_000):
            rows = records(frame.iloc[start : start + 10_000])
            f.write(("," if start else "") + ",\n".join(json.dumps(row) for row in rows))
        f.write("]\n")


def records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """The rows of ``frame`` as JSON-ready records, its index first when it carries data."""
    if has_own_index(frame):
        frame = frame.reset_index(allow_duplicates=True)
    columns = [str(column) for column in frame.columns]
    return [
        {column: json_value(value) for column, value in zip(columns, row, strict=True)}
        for row in frame.itertuples(index=False, name=None)
    ]


def json_value(value: Any) -> Any:
    """
    ``value`` as plain JSON: numpy and pandas scalars unwrapped, times as ISO 8601 strings,
    NaN, infinities and missing values as null.
    """
    import numpy as np
    import pandas as pd

    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, np.datetime64 | np.timedelta64):
        value = pd.Timestamp(value) if isinstance(value, np.datetime64) else pd.Timedelta(value)
    if value is pd.NaT or value is pd.NA:
        return None
    if isinstance(value, np.generic):
        return json_value(value.item())
    if isinstance(value, datetime.date | datetime.time | pd.Timedelta):
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return pd.Timedelta(value).isoformat()
    if isinstance(value, decimal.Decimal):
        return json_value(float(value))
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, list | tuple | np.ndarray):
        return [json_value(item) for item in value]
    if isinstance(value, dict):
        return {str(key): json_value(item) for key, item in value.items()}
    return str(value)


_WRITERS: dict[str, Callable[[Any, str], None]] = {
    "parquet": _write_parquet,
    "csv": _write_csv,
    "json": _write_json,
}


def read_rows(directory: str, file: str, offset: int, limit: int) -> dict[str, Any]:
    """
    Rows ``offset`` to ``offset + limit`` of a result file, as JSON records, and how many in all.

    Reads only the row groups it needs from Parquet and streams CSV and JSON, so a page of a big
    result costs about the size of the page. ``file`` is relative to ``directory``.
    """
    import pandas as pd

    path = resolve_inside(directory, "File", file, os.path.isfile)
    if path.endswith(".parquet"):
        total, frame = _parquet_rows(path, offset, limit)
    elif path.endswith(".csv"):
        with open(path, "rb") as f:
            total = max(sum(1 for _ in f) - 1, 0)
        frame = pd.read_csv(path, skiprows=range(1, offset + 1), nrows=limit)
    else:
        # _write_json puts one record on each line: "[{...},", "{...},", ..., "{...}]".
        total, rows = 0, []
        with open(path, encoding="utf-8") as f:
            for line in f:
                text = line.strip().removeprefix("[").removesuffix("]").removesuffix(",")
                if not text:
                    continue
                if offset <= total < offset + limit:
                    rows.append(json.loads(text))
                total += 1
        frame = pd.DataFrame(rows)
    return {
        "File": file,
        "Rows": total,
        "Offset": offset,
        "Columns": [str(column) for column in frame.columns],
        "Records": records(frame),
    }


def _parquet_rows(path: str, offset: int, limit: int) -> tuple[int, pd.DataFrame]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    first, groups, start = None, [], 0
    for group in range(parquet.num_row_groups):
        rows = parquet.metadata.row_group(group).num_rows
        if start + rows > offset and start < offset + limit:
            first = start if first is None else first
            groups.append(group)
        start += rows
    if not groups:
        return start, parquet.schema_arrow.empty_table().to_pandas()
    table = pa.concat_tables([parquet.read_row_group(group) for group in groups])
    return start, table.slice(offset - (first or 0), limit).to_pandas()
