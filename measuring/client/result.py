"""
One formula's result seen from the client: its description, and its table as pandas, read from
the file or fetched through the server (an Arrow stream when pyarrow is installed, else JSON
pages). pandas and pyarrow are imported only inside the functions that hand back tables.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from measuring.client.progress import LARGE, LARGE_ROWS, Progress, close, transfer

if TYPE_CHECKING:
    from measuring.client import Client

#: Records a JSON page holds, fetching a whole result.
PAGE = 10_000


class Result:
    """One formula's result: ``kind``, ``file``, ``rows``, ``value``, ``to_pandas()``."""

    def __init__(
        self, client: Client, job: str, name: str, entry: dict[str, Any], directory: str | None
    ) -> None:
        self._client = client
        self.job, self.name, self.entry = job, name, entry
        self.kind: str = entry["Kind"]
        self.file: str | None = entry.get("File")
        self.rows: int | None = entry.get("Rows")
        self.columns: list[str] = entry.get("Columns", [])
        self.index: list[str] = entry.get("Index", [])
        self.preview: list[dict[str, Any]] = entry.get("Preview", [])
        #: How many files the table is in: 1, or the parts of a Parquet folder (``file``).
        self.parts: int = entry.get("Parts", 1)
        self.value: Any = entry.get("Value")
        #: The dtype of each index level and column, by name, as the server computed it.
        self.types: dict[str, str] = entry.get("Types", {})
        self.directory = directory

    def __repr__(self) -> str:
        if self.kind == "Scalar":
            return f"<Result {self.name} = {self.value!r}>"
        return f"<Result {self.name}: {self.kind}, {self.rows} rows, {self.file}>"

    @property
    def path(self) -> str | None:
        """The result file's path on the server's machine, or its URL on object storage."""
        if self.file is not None and "://" in self.file:
            return self.file
        if self.file is None or self.directory is None:
            return None
        return os.path.join(self.directory, self.file)

    def rows_page(self, offset: int = 0, limit: int = 1000) -> dict[str, Any]:
        """One page of rows, fetched through the server (``Records``, ``Rows``, ``Columns``)."""
        return self._client.job(self.job).result_page(self.name, offset, limit)

    def records(self, progress: Progress | bool | None = None) -> Iterator[dict[str, Any]]:
        """
        Every row as a JSON record, fetched from the server page by page; ``progress`` as for
        ``to_pandas``, counting rows.
        """
        report = transfer(progress, self.rows or 0, LARGE_ROWS, self.name)
        offset = 0
        try:
            while True:
                page = self.rows_page(offset, PAGE)
                yield from page["Records"]
                offset += len(page["Records"])
                if report is not None:
                    report(offset, page["Rows"])
                if not page["Records"] or offset >= page["Rows"]:
                    return
        finally:
            close(report)

    def to_arrow(self, progress: Progress | bool | None = None) -> Any:
        """
        The result as a pyarrow Table, fetched through the server as one Arrow stream (needs
        pyarrow). ``progress``: a callable ``(bytes, of bytes)``, True for a bar, False for none;
        None (the default) draws a bar for a large transfer in a terminal or a notebook.
        """
        import pyarrow as pa

        request = {"Header": "Job", "Request": "Result", "Job": self.job, "Name": self.name,
                   "Format": "arrow"}  # fmt: skip
        response = self._client.request(request)["Response"]
        report = transfer(progress, int(response["Bytes"]), LARGE, self.name)
        try:
            data = self._client._body(int(response["Bytes"]), report)
        finally:
            close(report)
        return pa.ipc.open_stream(pa.py_buffer(data)).read_all()

    def to_pandas(self, source: str = "auto", progress: Progress | bool | None = None) -> Any:
        """
        The result as a pandas DataFrame (a Series for a Series result, the value for a scalar).

        ``source``: ``"file"`` reads the file (it must be reachable from here); ``"server"``
        fetches it through the server, as an Arrow stream when pyarrow is installed, else as JSON
        pages (``"arrow"`` and ``"json"`` choose one); ``"auto"`` reads the file when it can, else
        fetches it. A result on object storage (its ``file`` an ``s3://`` URL) is fetched through
        the server unless ``"file"`` asks pandas to read the URL itself (it needs s3fs here, and
        the AWS settings that reach the storage). ``progress`` (for a fetch): a callable
        ``(done, total)``, True for a bar, False for none; None draws one for a large transfer in
        a terminal or a notebook.
        """
        import pandas as pd

        if self.kind == "Scalar":
            return self.value
        path = self.path
        local = path is not None and "://" not in path and os.path.exists(path)
        if source == "file" or (source == "auto" and local):
            if path is None:
                from measuring.client import ClientError

                raise ClientError(f"result {self.name} has no file")
            frame = _read(path)
        elif source == "arrow" or (source in ("auto", "server") and _has_pyarrow()):
            frame = self.to_arrow(progress).to_pandas()
        else:
            records = list(self.records(progress))
            frame = pd.DataFrame.from_records(records, columns=[*self.index, *self.columns])
        frame = _typed(frame, self.types)
        if self.index and set(self.index) <= set(frame.columns):
            frame = frame.set_index(self.index)
        if self.kind == "Series" and len(frame.columns) == 1:
            return frame[frame.columns[0]]
        return frame


def _has_pyarrow() -> bool:
    """True when pyarrow can be imported (importing it, which pandas does anyway)."""
    try:
        import pyarrow.ipc  # noqa: F401
    except ImportError:
        return False
    return True


def _typed(frame: Any, types: dict[str, str]) -> Any:
    """Times and durations, which JSON and CSV carry as text, back as times and durations."""
    import pandas as pd

    for column, dtype in types.items():
        if column not in frame.columns or frame[column].dtype.kind in "mM":
            continue
        if dtype.startswith("datetime64"):
            times = pd.to_datetime(frame[column], format="ISO8601", utc=", " in dtype)
            if ", " in dtype:
                times = times.dt.tz_convert(dtype.split(", ", 1)[1].rstrip("]"))
            frame[column] = times
        elif dtype.startswith("timedelta64"):
            frame[column] = pd.to_timedelta(frame[column])
    return frame


def _read(path: str) -> Any:
    import pandas as pd

    if path.endswith(".parquet") or os.path.isdir(path):  # a file, or a folder of parts
        return pd.read_parquet(path)
    if path.endswith(".csv"):
        return pd.read_csv(path)
    return pd.read_json(path, orient="records")
