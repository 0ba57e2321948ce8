"""
Runs in the worker process: a job's results written to disk as they are computed, and described
for the answer.

A DataFrame or Series result is written partition by partition while Dask computes it, never
gathered whole in memory (``ResultWriter.stream``); rows are counted and the first ones kept for
the Preview as the parts are written. When the job's computation has ended, each table becomes
``results/<job>/<name>.<ext>``: one file when it is small (parts under ``SMALL_RESULT`` are
combined), else, for Parquet, a folder of that name holding its parts in order; CSV and JSON are
always one file. The folder appears complete or not at all (``measuring.files``); for a Directory
on object storage it is made in a local scratch folder, then uploaded (``measuring.storage``).
Never imports twisted or ``measuring.server``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from measuring import files, storage
from measuring.errors import JobFailed, MeasuringError
from measuring.tables import has_own_index, json_value, records
from measuring.wire import OUTPUTS, RESULTS

if TYPE_CHECKING:
    import pandas as pd

PREVIEW_ROWS = 20
PREVIEW_BYTES = 64 * 1024
#: Parquet parts of at most this many bytes in all are combined into one file.
SMALL_RESULT = 64 * 2**20
#: Rows a combined Parquet file gets per row group (as many, at least, as its parts allow).
GROUP_ROWS = 1 << 20
#: Where a job's parts wait, inside its partial folder, until they are put together.
PARTS = ".parts"


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


def preview(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """As many of the first 20 records as fit in 64 KiB."""
    rows = rows[:PREVIEW_ROWS]
    while rows and len(json.dumps(rows)) > PREVIEW_BYTES:
        rows = rows[: len(rows) // 2]
    return rows


class ResultsTooLarge(Exception):
    """A job's results are larger than it may write."""


class WriteFailed(Exception):
    """Writing a part of a table failed while Dask computed it (the cause says why)."""


@dataclass
class Part:
    """What writing one partition of a table gave: its rows, bytes and first records."""

    rows: int
    bytes: int
    head: list[dict[str, Any]]
    columns: list[str]
    index: list[str]
    types: dict[str, str]


@dataclass
class Table:
    """One table result being written: its kind and its parts by partition number."""

    name: str
    kind: str
    parts: dict[int, Part] = field(default_factory=dict)
    #: The Arrow schema every Parquet part is written with, so that the parts read as one table.
    schema: Any = None


class ResultWriter:
    """
    The tables of one job, written part by part into its partial folder, then put together and
    published (``finish``), or removed (``abandon``). Parts may be written from several threads.
    """

    def __init__(
        self,
        directory: str,
        job: str,
        output: str,
        max_bytes: int | None = None,
        small: int = SMALL_RESULT,
        upload: str | None = None,
    ) -> None:
        self.directory = directory
        #: A Directory on object storage the finished folder is published to; ``directory`` is
        #: then a local scratch folder of the job's own.
        self.upload = upload
        self.job = job
        self.output = output
        self.max_bytes = max_bytes
        self.small = small
        self.tables: dict[str, Table] = {}
        self._written = 0
        self._lock = threading.Lock()
        #: Parts being written now: ``abandon`` waits for them (Dask raises a task's error while
        #: other tasks still run), and no part starts once it has been called.
        self._writing = 0
        self._abandoned = False
        self._idle = threading.Condition(self._lock)
        self._partial: str | None = None
        self._made_results = False

    def _folder(self, name: str) -> str:
        """Where the parts of table ``name`` go, made with the partial folder on first use."""
        with self._lock:
            if self._partial is None:
                self._made_results = not os.path.isdir(os.path.join(self.directory, RESULTS))
                files.results_folder(self.directory)
                partial = files.partial_dir(self.directory, self.job)
                shutil.rmtree(partial, ignore_errors=True)
                os.makedirs(os.path.join(partial, PARTS))
                self._partial = partial
            folder = os.path.join(self._partial, PARTS, name)
            os.makedirs(folder, exist_ok=True)
            return folder

    def stream(self, name: str, collection: Any) -> Any:
        """
        A Dask collection that, computed, writes ``collection`` (a Dask DataFrame, Series or
        Index) one partition at a time; compute it together with the job's other results.
        """
        import dask.dataframe as dd
        import pandas as pd

        kind = "DataFrame" if isinstance(collection, dd.DataFrame) else "Series"
        self.tables[name] = Table(name, kind, schema=_schema(name, collection._meta))
        folder = self._folder(name)

        return collection.map_partitions(
            _PartWriter(self, name, folder),
            meta=pd.DataFrame({"rows": pd.Series([], dtype="int64")}),
            enforce_metadata=False,
            align_dataframes=False,
            clear_divisions=True,
        )

    def write(self, name: str, value: Any) -> str:
        """Write a computed table (a pandas DataFrame, Series or Index) as one part; its kind."""
        kind, frame = as_frame(name, value)
        if frame is None:
            return kind
        self.tables[name] = Table(name, kind)
        self.write_part(name, self._folder(name), 0, frame)
        return kind

    def write_part(self, name: str, folder: str, number: int, partition: Any) -> Part:
        """Write partition ``number`` of table ``name`` in ``folder``; what it held."""
        with self._lock:
            if self._abandoned:
                raise WriteFailed(f"part {number} of {name} not written: the job has failed")
            self._writing += 1
        try:
            return self._write_part(name, folder, number, partition)
        finally:
            with self._lock:
                self._writing -= 1
                self._idle.notify_all()

    def _write_part(self, name: str, folder: str, number: int, partition: Any) -> Part:
        _, frame = as_frame(name, partition)
        path = os.path.join(folder, f"part.{number:05d}{OUTPUTS[self.output]}")
        if self.output == "parquet":
            _write_parquet(frame, path, self.tables[name].schema)
        else:
            _PART_WRITERS[self.output](frame, path, number == 0)
        size = os.path.getsize(path)
        part = Part(
            rows=len(frame),
            bytes=size,
            head=records(frame.head(PREVIEW_ROWS)),
            columns=list(frame.columns),
            index=[str(level) for level in frame.index.names] if has_own_index(frame) else [],
            types=column_types(frame),
        )
        with self._lock:
            self._written += size
            self.tables[name].parts[number] = part
            written = self._written
        if self.max_bytes is not None and written > self.max_bytes:
            raise ResultsTooLarge(
                f"the results take {written} bytes by {name}, more than the "
                f"{self.max_bytes} a job may write (--max-result-bytes)"
            )
        return part

    def failure(self, error: BaseException) -> JobFailed:
        """What the job is told when writing its results raised ``error``."""
        if isinstance(error, WriteFailed) and error.__cause__ is not None:
            error = error.__cause__
        traceback.print_exception(type(error), error, error.__traceback__, file=sys.stderr)
        if isinstance(error, ResultsTooLarge):
            return JobFailed(str(error))
        if isinstance(error, OSError) and error.errno == errno.EFBIG:
            return JobFailed(
                f"a result file grew past {self.max_bytes} bytes, the most a job may write "
                f"(--max-result-bytes)"
            )
        if isinstance(error, OSError):
            return JobFailed(f"writing the results failed: {type(error).__name__}: {error}")
        return JobFailed(
            f"writing the results to {self.directory}/results failed: "
            f"{type(error).__name__}: {error}"
        )

    def finish(self) -> dict[str, dict[str, Any]]:
        """Put each table's parts together, publish the job's folder; each table described."""
        described: dict[str, dict[str, Any]] = {}
        if self._partial is None:
            return described
        try:
            for name, table in self.tables.items():
                described[name] = self._assemble(table)
            shutil.rmtree(os.path.join(self._partial, PARTS))
            files.fsync(self._partial)
            files.publish(self.directory, self.job)
            if self.upload is not None:
                storage.publish(files.result_dir(self.directory, self.job), self.upload, self.job)
        except BaseException:
            self.abandon()
            raise
        return described

    def _put_together(self, paths: list[str], parts: list[Part], target: str) -> int:
        """
        Make ``target`` of the parts at ``paths``: one file (the only part, or all combined),
        or, for Parquet larger than ``small``, a folder of the parts that hold rows, in order.
        How many files it is.
        """
        if self.output != "parquet":
            if len(paths) == 1 and self.output == "csv":
                os.rename(paths[0], target)
            else:
                _COMBINERS[self.output](paths, target)
            return 1
        held = [path for path, part in zip(paths, parts, strict=True) if part.rows] or paths[:1]
        if len(held) == 1:
            os.rename(held[0], target)
            return 1
        if sum(part.bytes for part in parts if part.rows) <= self.small:
            _combine_parquet(held, target)
            return 1
        os.mkdir(target)
        for number, path in enumerate(held):
            os.rename(path, os.path.join(target, f"part.{number:05d}{OUTPUTS['parquet']}"))
        return len(held)

    def abandon(self) -> None:
        """
        Remove whatever this job wrote (and the results folder, if it made it), once no part is
        being written.
        """
        with self._lock:
            self._abandoned = True
            while self._writing:
                self._idle.wait()
        if self._partial is not None:
            shutil.rmtree(self._partial, ignore_errors=True)
            if self._made_results:
                with contextlib.suppress(OSError):
                    os.rmdir(os.path.join(self.directory, RESULTS))

    def _assemble(self, table: Table) -> dict[str, Any]:
        """Table ``name``'s parts as its file (or folder), synced; its description."""
        assert self._partial is not None
        ext = OUTPUTS[self.output]
        folder = os.path.join(self._partial, PARTS, table.name)
        numbers = sorted(table.parts)
        paths = [os.path.join(folder, f"part.{n:05d}{ext}") for n in numbers]
        parts = [table.parts[n] for n in numbers]
        target = os.path.join(self._partial, table.name + ext)
        pieces = self._put_together(paths, parts, target)
        _sync(target)
        first = next((part for part in parts if part.rows), parts[0])
        head: list[dict[str, Any]] = []
        for part in parts:
            if len(head) >= PREVIEW_ROWS:
                break
            head += part.head
        entry: dict[str, Any] = {
            "Kind": table.kind,
            "File": files.result_file(self.job, table.name, self.output),
            "Rows": sum(part.rows for part in parts),
            "Columns": first.columns,
            "Index": first.index,
            "Types": first.types,
            "Preview": preview(head),
        }
        if pieces > 1:
            entry["Parts"] = pieces
        return entry


class _PartWriter:
    """The task writing one partition of a streamed table (``ResultWriter.stream``)."""

    def __init__(self, writer: ResultWriter, name: str, folder: str) -> None:
        self.writer, self.name, self.folder = writer, name, folder

    def __dask_tokenize__(self) -> tuple[str, str]:
        return (self.folder, self.name)

    def __call__(self, partition: Any, partition_info: dict[str, Any] | None = None) -> Any:
        import pandas as pd

        number = partition_info["number"] if partition_info else 0
        try:
            part = self.writer.write_part(self.name, self.folder, number, partition)
        except MeasuringError:
            raise
        except Exception as e:
            raise WriteFailed(f"writing part {number} of {self.name} failed") from e
        return pd.DataFrame({"rows": [part.rows]})


def _sync(path: str) -> None:
    if os.path.isdir(path):
        for name in os.listdir(path):
            files.fsync(os.path.join(path, name))
    files.fsync(path)


def _schema(name: str, meta: Any) -> Any:
    """
    The Arrow schema of a table whose partitions look like ``meta``, or None when some column's
    type shows only in the data (an empty column of Python objects).
    """
    import pyarrow as pa

    _, frame = as_frame(name, meta)
    try:
        schema = pa.Schema.from_pandas(frame, preserve_index=has_own_index(frame))
    except (pa.ArrowException, TypeError, ValueError):
        return None
    return None if any(pa.types.is_null(field.type) for field in schema) else schema


def _write_parquet(frame: pd.DataFrame, path: str, schema: Any = None) -> None:
    """A Parquet file of ``frame``: with ``schema`` when the frame fits it, as all parts do."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    index = has_own_index(frame)
    table = None
    if schema is not None:
        with contextlib.suppress(pa.ArrowException, TypeError, ValueError):
            table = pa.Table.from_pandas(frame, schema=schema, preserve_index=index)
    if table is None:
        table = pa.Table.from_pandas(frame, preserve_index=index)
    pq.write_table(table, path)


def _write_csv(frame: pd.DataFrame, path: str, first: bool) -> None:
    """A part of a CSV file; only the first holds the header."""
    frame.to_csv(path, index=has_own_index(frame), header=first)


def _write_json(frame: pd.DataFrame, path: str, first: bool) -> None:
    """
    Records, one per line, separated by ``,`` and a newline, without the brackets around them
    (``_combine_json`` adds them): exact floats, NaN and infinities as null.
    """
    table = frame.reset_index() if has_own_index(frame) else frame
    with open(path, "w", encoding="utf-8") as f:
        for start in range(0, len(table), 10_000):
            chunk = table.iloc[start : start + 10_000].reset_index(drop=True)
            lines = ",\n".join(json.dumps(row) for row in records(chunk))
            f.write((",\n" if start else "") + lines)


def _append(source: str, target: Any) -> None:
    """Copy the file ``source`` to the end of the open file ``target``, inside the kernel."""
    target.flush()
    with open(source, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        copied = 0
        while copied < size:
            done = os.copy_file_range(f.fileno(), target.fileno(), size - copied)
            if done == 0:
                break
            copied += done
    target.seek(0, os.SEEK_END)


def _combine_csv(paths: list[str], target: str) -> None:
    with open(target, "wb") as out:
        for path in paths:
            _append(path, out)


def _combine_json(paths: list[str], target: str) -> None:
    """A JSON array of the parts' records, one per line, as ``read_rows`` expects."""
    with open(target, "wb") as out:
        out.write(b"[")
        wrote = False
        for path in paths:
            if os.path.getsize(path) == 0:
                continue
            if wrote:
                out.write(b",\n")
            _append(path, out)
            wrote = True
        out.write(b"]\n")


def _combine_parquet(paths: list[str], target: str) -> None:
    """One Parquet file of the parts' rows, in order, read and written a few parts at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    writer = None
    pending: list[Any] = []

    def flush() -> None:
        nonlocal writer, pending
        if not pending:
            return
        table = pa.concat_tables(pending, promote_options="permissive")
        if writer is None:
            writer = pq.ParquetWriter(target, table.schema)
        writer.write_table(table.cast(writer.schema), row_group_size=GROUP_ROWS)
        pending = []

    try:
        for path in paths:
            pending.append(pq.read_table(path))
            if sum(table.num_rows for table in pending) >= GROUP_ROWS:
                flush()
        flush()
    finally:
        if writer is not None:
            writer.close()


_PART_WRITERS: dict[str, Callable[[Any, str, bool], None]] = {
    "csv": _write_csv,
    "json": _write_json,
}
_COMBINERS: dict[str, Callable[[list[str], str], None]] = {
    "csv": _combine_csv,
    "json": _combine_json,
}


def is_table(value: Any) -> bool:
    """True for a Dask DataFrame, Series or Index: a table to stream to disk."""
    import dask.dataframe as dd

    return isinstance(value, dd.DataFrame | dd.Series | dd.Index)


def summarize(values: dict[str, Any], writer: ResultWriter) -> dict[str, Any]:
    """
    Describe every computed result for the answer: a single value as itself, a table (streamed
    already, or computed whole and written now) by its file; the job's folder is published.
    """
    described: dict[str, Any] = {}
    with writing(writer):
        for name, value in values.items():
            if name not in writer.tables and writer.write(name, value) == "Scalar":
                described[name] = {"Kind": "Scalar", "Value": json_value(value)}
            else:
                described[name] = None
        tables = writer.finish()
    return {name: entry or tables[name] for name, entry in described.items()}


@contextlib.contextmanager
def writing(writer: ResultWriter) -> Iterator[None]:
    """Turn what goes wrong writing results into JobFailed saying so; nothing is left."""
    try:
        yield
    except BaseException as e:
        writer.abandon()
        if isinstance(e, MeasuringError):
            raise
        raise writer.failure(e) from None


def write_results(
    directory: str,
    job: str,
    frames: dict[str, pd.DataFrame],
    output: str,
    max_bytes: int | None = None,
) -> dict[str, str]:
    """
    Write each computed frame to ``results/<job>/<name>.<ext>`` and return the paths relative
    to directory: complete or not at all; past ``max_bytes`` in all, ResultsTooLarge is raised
    and nothing is left.
    """
    writer = ResultWriter(directory, job, output, max_bytes)
    try:
        for name, frame in frames.items():
            writer.write(name, frame)
    except BaseException:
        writer.abandon()
        raise
    return {name: entry["File"] for name, entry in writer.finish().items()}
