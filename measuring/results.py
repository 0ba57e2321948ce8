"""
A job's results on disk: written complete or not at all, moved into place, read back a page at a
time, and turned into JSON.

``write_results`` runs in the worker; ``place_results`` (for a sandboxed worker), ``read_rows``
and ``remove_partial`` run in the server's threads. Nothing here imports the reactor; pandas and
pyarrow are imported only by the functions that need them.
"""

from __future__ import annotations

import csv
import datetime
import decimal
import io
import json
import math
import os
import shutil
import stat
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from measuring.errors import Forbidden
from measuring.loader import RESULTS, inside, resolve_inside

if TYPE_CHECKING:
    import pandas as pd

OUTPUTS = {"parquet": ".parquet", "csv": ".csv", "json": ".json"}


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
    Copy the results a sandboxed worker wrote in its ``outbox`` into ``directory``, the same way
    they appear when written there: complete or not at all, made in place, so that they get the
    folder's group and default ACLs as files written there do.
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
        os.mkdir(partial)
        for name in os.listdir(source):
            shutil.copyfile(os.path.join(source, name), os.path.join(partial, name))
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
    """
    A JSON array of records, one per line (``read_rows`` relies on that), exact: floats keep
    every digit, NaN and infinities become null.
    """
    table = frame.reset_index() if has_own_index(frame) else frame
    with open(path, "w", encoding="utf-8") as f:
        f.write("[")
        for start in range(0, len(table), 10_000):
            chunk = table.iloc[start : start + 10_000].reset_index(drop=True)
            lines = ",\n".join(json.dumps(row) for row in records(chunk))
            f.write((",\n" if start else "") + lines)
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

    Reads only the row groups it needs from Parquet; reads CSV and JSON in one pass, keeping
    only the page (they hold no row count to skip by). ``file`` is relative to ``directory``.
    """
    import pandas as pd

    path = resolve_inside(directory, "File", file, os.path.isfile)
    if path.endswith(".parquet"):
        total, frame = _parquet_rows(path, offset, limit)
    elif path.endswith(".csv"):
        page = io.StringIO()
        writer = csv.writer(page)
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)  # records, not lines: a value may hold a newline
            writer.writerow(next(reader, []))
            total = 0
            for total, row in enumerate(reader, start=1):
                if offset < total <= offset + limit:
                    writer.writerow(row)
        page.seek(0)
        frame = pd.read_csv(page)
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
