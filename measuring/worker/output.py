"""
Runs in the worker process: describing a job's computed results and writing its tables.

Each table goes to ``results/<job>/<name>.<ext>``; the folder appears complete or not at all
(``measuring.files``). Never imports twisted or ``measuring.server``.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from measuring import files
from measuring.errors import JobFailed, MeasuringError
from measuring.tables import has_own_index, json_value, records
from measuring.wire import OUTPUTS

if TYPE_CHECKING:
    import pandas as pd


PREVIEW_ROWS = 20


PREVIEW_BYTES = 64 * 1024


def as_frame(name: str, value: Any) -> tuple[str, Any]:
    """
    The kind of a computed result and, for tables, the frame to write (``None`` for a scalar).

    Column names become strings; a column of several levels becomes ``level1_level2``. The
    index is made plain (``plain_index``).
    """
    import pandas as pd

    if isinstance(value, pd.Index):
        value = value.to_series(index=pd.RangeIndex(len(value)))
    if isinstance(value, pd.Series):
        kind, frame = "Series", value.to_frame(name=str(name if value.name is None else value.name))
    elif isinstance(value, pd.DataFrame):
        kind, frame = "DataFrame", value.copy(deep=False)
        if isinstance(frame.columns, pd.MultiIndex):
            frame.columns = [
                "_".join(str(level) for level in col if level != "") for col in frame.columns
            ]
        frame.columns = [str(column) for column in frame.columns]
    elif value is None:
        raise JobFailed(f"formula {name!r} returned None; does it miss a return statement?")
    elif pd.api.types.is_scalar(value):
        return "Scalar", None
    else:
        raise JobFailed(
            f"formula {name!r} returned a {type(value).__name__}; a formula must return a "
            f"DataFrame, a Series or a single value (number, string, bool, time)"
        )
    return kind, plain_index(frame)


def plain_index(frame: Any) -> Any:
    """
    ``frame`` with an index every output format names the same way.

    An unnamed whole-number index holds row numbers from the dataset's partitions (so it differs
    between engines) and is dropped; other unnamed levels are called what pandas calls them as
    columns: ``index``, or ``level_0``, ``level_1``...
    """
    import pandas as pd

    index = frame.index
    if index.nlevels == 1 and index.name is None and pd.api.types.is_integer_dtype(index.dtype):
        return frame.reset_index(drop=True)
    if index.nlevels == 1:
        names = ["index" if index.name is None else str(index.name)]
    else:
        names = [f"level_{i}" if n is None else str(n) for i, n in enumerate(index.names)]
    frame.index = index.set_names(names)
    return frame


def preview(frame: Any) -> list[dict[str, Any]]:
    """The first rows as JSON records, as many of the first 20 as fit in 64 KiB."""
    rows = records(frame.head(PREVIEW_ROWS))
    while rows and len(json.dumps(rows)) > PREVIEW_BYTES:
        rows = rows[: len(rows) // 2]
    return rows


def summarize(
    values: dict[str, Any], job: str, directory: str, output: str, max_bytes: int | None = None
) -> dict[str, Any]:
    """Write the tables among ``values`` and describe every result for the answer."""
    described: dict[str, Any] = {}
    frames = {}
    for name, value in values.items():
        kind, frame = as_frame(name, value)
        if frame is None:
            described[name] = {"Kind": kind, "Value": json_value(value)}
            continue
        frames[name] = frame
        described[name] = {
            "Kind": kind,
            "File": None,
            "Rows": len(frame),
            "Columns": list(frame.columns),
            "Index": [str(level) for level in frame.index.names] if has_own_index(frame) else [],
            "Types": column_types(frame),
            "Preview": preview(frame),
        }
    try:
        files = write_results(directory, job, frames, output, max_bytes)
    except MeasuringError:
        raise
    except ResultsTooLarge as e:
        raise JobFailed(str(e)) from None
    except OSError as e:
        traceback.print_exception(type(e), e, e.__traceback__, file=sys.stderr)
        if e.errno == errno.EFBIG:
            raise JobFailed(
                f"a result file grew past {max_bytes} bytes, the most a job may write "
                f"(--max-result-bytes)"
            ) from None
        raise JobFailed(f"writing the results failed: {type(e).__name__}: {e}") from None
    except Exception as e:
        traceback.print_exception(type(e), e, e.__traceback__, file=sys.stderr)
        raise JobFailed(
            f"writing the results to {directory}/results failed: {type(e).__name__}: {e}"
        ) from None
    for name, file in files.items():
        described[name]["File"] = file
    return described


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
    files.results_folder(directory)
    partial = files.partial_dir(directory, job)
    shutil.rmtree(partial, ignore_errors=True)
    os.mkdir(partial)
    try:
        names, written = {}, 0
        for name, frame in frames.items():
            filename = name + OUTPUTS[output]
            path = os.path.join(partial, filename)
            _WRITERS[output](frame, path)
            files.fsync(path)
            written += os.path.getsize(path)
            if max_bytes is not None and written > max_bytes:
                raise ResultsTooLarge(
                    f"the results take {written} bytes by {name}, more than the "
                    f"{max_bytes} a job may write (--max-result-bytes)"
                )
            names[name] = files.result_file(job, name, output)
        files.publish(directory, job)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return names


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


_WRITERS: dict[str, Callable[[Any, str], None]] = {
    "parquet": _write_parquet,
    "csv": _write_csv,
    "json": _write_json,
}
