"""
Runs in the server's threads: a sandboxed worker's results placed into the job's Directory, and
result files read back for Job Result: a page at a time as JSON records, or whole (or a slice) as
an Arrow IPC stream spooled to a temporary file, which the connection then sends as raw bytes.

Results of a Directory on object storage are read the same way through fsspec: their ``File`` is
then the URL. Nothing here imports the reactor; pandas and pyarrow are imported inside the
functions.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from typing import IO, TYPE_CHECKING, Any

from measuring import files, storage
from measuring.errors import Forbidden, NotFound
from measuring.server.paths import resolve_inside
from measuring.tables import records
from measuring.wire import ARROW_STREAM, OUTPUTS, RESULTS

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa

#: Rows per record batch of an Arrow stream.
BATCH_ROWS = 64 * 1024


def place_results(outbox: str, directory: str, job: str) -> None:
    """
    Copy the results a sandboxed worker wrote in its ``outbox`` into ``directory``, the same way
    they appear when written there: complete or not at all, made in place, so that they get the
    folder's group and default ACLs as files written there do.
    """
    source = files.result_dir(outbox, job)
    if not os.path.lexists(source):
        return
    # What a sandboxed formula left must not lead the server (which sees everything) elsewhere.
    if os.path.realpath(source) != os.path.join(os.path.realpath(outbox), RESULTS, job):
        raise Forbidden(f"{source} leads outside the worker's outbox")
    placed = _placed_files(source)
    files.results_folder(directory)
    partial = files.partial_dir(directory, job)
    shutil.rmtree(partial, ignore_errors=True)
    try:
        os.mkdir(partial)
        for name in placed:
            if os.path.dirname(name) and not os.path.isdir(
                os.path.join(partial, os.path.dirname(name))
            ):
                os.mkdir(os.path.join(partial, os.path.dirname(name)))
            shutil.copyfile(os.path.join(source, name), os.path.join(partial, name))
            files.fsync(os.path.join(partial, name))
        for name in {os.path.dirname(name) for name in placed if os.path.dirname(name)}:
            files.fsync(os.path.join(partial, name))
        files.publish(directory, job)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def _placed_files(source: str) -> list[str]:
    """
    The files of a worker's results folder, relative to it: plain files, and ``.parquet``
    folders (a table written in parts) of plain files; anything else is Forbidden.
    """
    found = []
    for name in sorted(os.listdir(source)):
        mode = os.lstat(os.path.join(source, name)).st_mode
        if stat.S_ISDIR(mode) and name.endswith(OUTPUTS["parquet"]):
            for part in sorted(os.listdir(os.path.join(source, name))):
                if not stat.S_ISREG(os.lstat(os.path.join(source, name, part)).st_mode):
                    raise Forbidden(f"{name}/{part} in the results is not a plain file")
                found.append(os.path.join(name, part))
        elif stat.S_ISREG(mode):
            found.append(name)
        else:
            raise Forbidden(f"{name} in the results is not a plain file")
    return found


def read_rows(directory: str, file: str, offset: int, limit: int) -> dict[str, Any]:
    """
    Rows ``offset`` to ``offset + limit`` of a result file, as JSON records, and how many in all.

    Reads only the row groups it needs from Parquet (one file, or a folder of parts); reads CSV
    and JSON in one pass, keeping only the page (they hold no row count to skip by). ``file`` is
    relative to ``directory``.
    """
    import pandas as pd

    path, fs = _located(directory, file, lambda p: os.path.isfile(p) or p.endswith(".parquet"))
    opener = open if fs is None else fs.open
    if path.endswith(".parquet"):
        total, frame = _parquet_rows(path, offset, limit, fs)
    elif path.endswith(".csv"):
        page = io.StringIO()
        writer = csv.writer(page)
        with opener(path, "r", newline="", encoding="utf-8") as f:
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
        with opener(path, "r", encoding="utf-8") as f:
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


def _located(directory: str, file: str, is_kind: Any) -> tuple[str, Any]:
    """
    Where result ``file`` of a job of ``directory`` is, checked to lie inside it, and the fsspec
    file system it is on (None: a local file, which ``is_kind`` must accept).
    """
    if not storage.is_url(directory):
        return resolve_inside(directory, "File", file, is_kind), None
    url = storage.resolve((directory,), "File", file, directory)
    fs = storage.filesystem(url)
    if not fs.exists(url):
        raise NotFound(f"File {file!r} was not found in {directory}")
    return url, fs


def _parts(path: str, fs: Any) -> list[str]:
    """The Parquet files of a result: itself, or the parts of a result folder, in order."""
    if fs is None:
        return files.data_files(path) if os.path.isdir(path) else [path]
    return storage.data_files(fs, path) if fs.isdir(path) else [path]


def _parquet_file(part: str, fs: Any) -> Any:
    import pyarrow.parquet as pq

    return pq.ParquetFile(part if fs is None else fs.open(part, "rb"))


def _parquet_rows(path: str, offset: int, limit: int, fs: Any = None) -> tuple[int, pd.DataFrame]:
    """
    How many rows a Parquet result holds, and rows ``offset`` to ``offset + limit``: reading the
    footers of its files (its parts, in order, when it is a folder) and only the row groups the
    page needs.
    """
    import pyarrow as pa

    parts = [part for part in _parts(path, fs) if part.endswith(".parquet")]
    first, tables, start = None, [], 0
    schema = None
    for part in parts:
        parquet = _parquet_file(part, fs)
        schema = schema or parquet.schema_arrow
        for group in range(parquet.num_row_groups):
            rows = parquet.metadata.row_group(group).num_rows
            if start + rows > offset and start < offset + limit:
                first = start if first is None else first
                tables.append(parquet.read_row_group(group))
            start += rows
    if not tables:
        empty = schema.empty_table() if schema is not None else pa.table({})
        return start, empty.to_pandas()
    table = pa.concat_tables(tables, promote_options="permissive")
    return start, table.slice(offset - (first or 0), limit).to_pandas()


def arrow_stream(
    directory: str, file: str, offset: int, limit: int | None
) -> tuple[dict[str, Any], IO[bytes]]:
    """
    Rows ``offset`` to ``offset + limit`` (to the end for None) of a result as an Arrow IPC
    stream, in an unnamed temporary file (gone once closed), read from its start; and what the
    answer line says of it: ``Rows`` (in all), ``Offset``, ``Count``, ``Columns``, ``Bytes``.

    A Parquet result may be one file or a folder of parts (read in order, batch by batch, so a
    large result never sits in memory whole); CSV and JSON results are read whole.
    """
    path, fs = _located(directory, file, lambda p: os.path.isfile(p) or os.path.isdir(p))
    schema, total, batches = _batches(path, fs)
    spool = tempfile.TemporaryFile()  # noqa: SIM115 (the caller closes it once sent)
    count = 0
    try:
        import pyarrow as pa

        with pa.ipc.new_stream(spool, schema) as writer:
            for batch in _slice(batches, offset, limit):
                writer.write_batch(batch)
                count += batch.num_rows
        size = spool.tell()
        spool.seek(0)
    except BaseException:
        spool.close()
        raise
    meta = {
        "File": file,
        "Rows": total,
        "Offset": offset,
        "Count": count,
        "Columns": [str(name) for name in schema.names],
        "Format": "arrow",
        "MediaType": ARROW_STREAM,
        "Bytes": size,
    }
    return meta, spool


def _batches(path: str, fs: Any = None) -> tuple[pa.Schema, int, Iterator[pa.RecordBatch]]:
    """A result's schema, its rows in all, and its record batches in order."""
    import pyarrow as pa

    if path.endswith(".csv") or path.endswith(".json"):
        import pandas as pd

        frame = pd.read_csv(path) if path.endswith(".csv") else pd.read_json(path, orient="records")
        table = pa.Table.from_pandas(frame, preserve_index=False)
        return table.schema, table.num_rows, iter(table.to_batches(BATCH_ROWS))
    parts = [_parquet_file(part, fs) for part in _parts(path, fs)]
    if not parts:
        raise NotFound(f"the result folder {os.path.basename(path)} holds no Parquet files")
    schema = parts[0].schema_arrow
    total = sum(part.metadata.num_rows for part in parts)

    def read() -> Iterator[pa.RecordBatch]:
        for part in parts:
            with part:
                for batch in part.iter_batches(BATCH_ROWS):
                    yield batch if batch.schema.equals(schema) else batch.cast(schema)

    return schema, total, read()


def _slice(
    batches: Iterator[pa.RecordBatch], offset: int, limit: int | None
) -> Iterator[pa.RecordBatch]:
    """The rows ``offset`` to ``offset + limit`` of a sequence of batches."""
    start = 0
    for batch in batches:
        end = start + batch.num_rows
        low = max(offset - start, 0)
        high = batch.num_rows if limit is None else min(offset + limit - start, batch.num_rows)
        if high > low:
            yield batch.slice(low, high - low)
        start = end
        if limit is not None and start >= offset + limit:
            return
