"""
A large result fetched over the network, as JSON pages and as Arrow: a report, not a test.

    python benchmarks/arrow.py [--rows 1M] [--repeat 1]

Runs a job on a real ``twistd -n measuring`` whose formula returns a table of ``--rows`` rows and
7 columns (a time, two strings, a category, a float, a whole number, a boolean), then fetches
that result through the server:

- as JSON pages (Job Result, 10,000 records a page, as ``Result.records()`` asks them), made
  into a pandas DataFrame; with the bytes on the wire and the client's share of the time
  (decoding the JSON and making the frame);
- as an Arrow IPC stream (Job Result with ``"Format": "arrow"``), when the server answers it:
  a JSON header line, then the stream; otherwise "not supported by this server";
- with ``Result.to_pandas(source="server")``, when the server has Arrow (without it, the client
  reads the same JSON pages);
- and, for scale, the result file read locally with ``pandas.read_parquet``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import time
from collections.abc import Callable
from typing import Any

import harness
from harness import median

from measuring.client import PAGE, Client

FORMULAS = """
def table(df):
    return df
"""
BASE, FILE, NAME = "wide.parquet", "work.py", "table"


def write_data(folder: str, rows: int) -> None:
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(14)
    frame = pd.DataFrame(
        {
            "time": pd.date_range("2026-01-01", periods=rows, freq="100ms"),
            "sensor": rng.choice([f"sensor-{i:02d}" for i in range(20)], rows),
            "site": pd.Categorical(rng.choice(["north", "south", "east", "west"], rows)),
            "value": rng.normal(20.0, 5.0, rows),
            "count": rng.integers(0, 1000, rows),
            "ok": rng.random(rows) > 0.1,
            "note": rng.choice(["", "calibrated", "maintenance", "spike"], rows),
        }
    )
    frame.to_parquet(os.path.join(folder, BASE), index=False, row_group_size=100_000)
    with open(os.path.join(folder, FILE), "w") as f:
        f.write(FORMULAS)


class Raw:
    """A plain socket to the server, to count bytes and read an answer that is not a JSON line."""

    def __init__(self, port: int) -> None:
        self.socket = socket.create_connection(("127.0.0.1", port), timeout=300.0)
        self.file = self.socket.makefile("rwb")

    def close(self) -> None:
        self.file.close()
        self.socket.close()

    def ask(self, request: dict[str, Any]) -> bytes:
        self.file.write(json.dumps(request).encode() + b"\n")
        self.file.flush()
        line: bytes = self.file.readline()
        return line


def json_pages(port: int, job: str, rows: int, columns: list[str]) -> tuple[Any, int, float]:
    """
    Every JSON page of the result (Job Result, ``PAGE`` records each, as ``Result.records()``
    asks them) made into a DataFrame; the bytes on the wire, and the client's seconds of decoding.
    """
    import pandas as pd

    raw = Raw(port)
    size, decoding, records = 0, 0.0, []
    try:
        for offset in range(0, rows, PAGE):
            line = raw.ask(
                {
                    "Header": "Job",
                    "Request": "Result",
                    "Job": job,
                    "Name": NAME,
                    "Offset": offset,
                    "Limit": PAGE,
                }
            )
            size += len(line)
            start = time.perf_counter()
            records.extend(json.loads(line)["Response"]["Records"])
            decoding += time.perf_counter() - start
    finally:
        raw.close()
    start = time.perf_counter()
    frame = pd.DataFrame.from_records(records, columns=columns)
    return frame, size, decoding + time.perf_counter() - start


def arrow_stream(port: int, job: str) -> tuple[Any, int] | str:
    """The result as an Arrow stream made into a DataFrame, and its bytes; or why not."""
    import pyarrow as pa

    raw = Raw(port)
    try:
        line = raw.ask(
            {"Header": "Job", "Request": "Result", "Job": job, "Name": NAME, "Format": "arrow"}
        )
        header = json.loads(line)
        if header.get("Status") == "Error":
            if header["Error"]["Code"] == "BadRequest" and "Format" in header["Error"]["Message"]:
                return "not supported by this server"
            return f"{header['Error']['Code']}: {header['Error']['Message']}"
        size = header.get("Bytes", header.get("Response", {}).get("Bytes"))
        if not isinstance(size, int):
            return f"an Arrow header this benchmark does not know: {line[:200]!r}"
        stream = raw.file.read(size)
    finally:
        raw.close()
    return pa.ipc.open_stream(stream).read_all().to_pandas(), size


def _size(path: str) -> int:
    """The bytes of a file, or of every file in a folder."""
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def timed(what: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    times, value = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        value = what()
        times.append(time.perf_counter() - start)
    return median(times), value


def main() -> None:
    import pandas as pd

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=harness.parse_count, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=1, help="runs of each; the median time")
    args = parser.parse_args()
    folder = harness.temporary_folder()
    write_data(folder, args.rows)
    print(f"## A result of {harness.count_label(args.rows)} rows x 7 columns over the network\n")
    harness.print_machine()
    with harness.server(folder) as local, Client("127.0.0.1", local.port, timeout=600) as client:
        job = client.run(folder, BASE, FILE, functions=[NAME])
        result = job.results[NAME]
        assert result.rows == args.rows and result.path is not None, result
        path = result.path
        local_file, expected = timed(lambda: pd.read_parquet(path), args.repeat)
        pages, (frame, size, decoding) = timed(
            lambda: json_pages(local.port, job.id, args.rows, result.columns), args.repeat
        )
        assert len(frame) == args.rows
        rows = [
            [
                "JSON pages → DataFrame",
                f"{pages:.2f} s",
                f"{size / 2**20:.0f} MiB",
                f"{decoding:.2f} s of it decoding",
                "1.00x",
            ]
        ]
        arrow = arrow_stream(local.port, job.id)
        if isinstance(arrow, str):
            rows.append(["Arrow stream → DataFrame", arrow, "", "", ""])
            rows.append(['Result.to_pandas(source="server")', "JSON pages, as above", "", "", ""])
        else:
            seconds, (frame, size) = timed(lambda: arrow_stream(local.port, job.id), args.repeat)
            same = "equal to the file" if frame.equals(expected) else "DIFFERS from the file"
            rows.append(
                [
                    "Arrow stream → DataFrame",
                    f"{seconds:.2f} s",
                    f"{size / 2**20:.0f} MiB",
                    same,
                    f"{pages / seconds:.1f}x",
                ]
            )
            # A connection of its own: the server closes one left idle for --idle-timeout.
            with Client("127.0.0.1", local.port, timeout=600) as fresh:
                again = fresh.job(job.id).results[NAME]
                seconds, _ = timed(lambda: again.to_pandas(source="server"), args.repeat)
            rows.append(
                [
                    'Result.to_pandas(source="server")',
                    f"{seconds:.2f} s",
                    "",
                    "",
                    f"{pages / seconds:.1f}x",
                ]
            )
        rows.append(
            [
                "the result file, read here (pandas)",
                f"{local_file:.2f} s",
                f"{_size(path) / 2**20:.0f} MiB",
                "",
                "",
            ]
        )
    print()
    print(harness.markdown(["fetched as", "time", "size", "", "faster than JSON pages"], rows))
    harness.print_load()


if __name__ == "__main__":
    main()
