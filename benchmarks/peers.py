"""
The work of ``large.py``, as each tool a user might pick instead of the server does it.

    python benchmarks/peers.py TOOL WORK DATASET OUT FORMULAS

Runs one work (``groupby``, ``hourly``, ``filter``) with one tool in this fresh process and
prints one JSON line: ``seconds`` of work (the tool's imports are done before the clock starts,
as a warm server worker has done them), ``cpu`` seconds of it, ``rows`` and ``mean`` of the
answer (to check that every tool computed the same), ``maxrss`` (this process's peak resident
memory, in bytes). The server's own formulas are ``FORMULAS``; the Dask peers run those same
formulas, read their way.
"""

from __future__ import annotations

import importlib.util
import json
import os
import resource
import sys
import time
from collections.abc import Callable
from typing import Any

#: ``value`` is normal(20, 5): this keeps about 70 % of the rows.
THRESHOLD = 17.38
WORKS = ("groupby", "hourly", "filter")
TOOLS = ("pandas", "dask", "dask-split", "polars", "duckdb")
FORMULAS = f"""
THRESHOLD = {THRESHOLD}


def mean_by_sensor(df):
    return df.groupby("sensor").value.mean()


def hourly(df):
    return df.set_index("time", sorted=True).value.resample("1h").mean()


def hourly_indexed(df):
    return df.value.resample("1h").mean()


def kept(df):
    return df[df.value > THRESHOLD]
"""
#: The server's formula for each work (``hourly_indexed`` when the job has ``"Index": "time"``).
SERVER_FORMULAS = {"groupby": "mean_by_sensor", "hourly": "hourly", "filter": "kept"}

Work = Callable[[str, str], Any]


def _pandas(work: str) -> Work:
    import pandas as pd
    import pyarrow.parquet  # noqa: F401 (imported before the clock starts)

    def groupby(path: str, out: str) -> Any:
        return pd.read_parquet(path, columns=["sensor", "value"]).groupby("sensor").value.mean()

    def hourly(path: str, out: str) -> Any:
        frame = pd.read_parquet(path, columns=["time", "value"]).set_index("time")
        return frame.value.resample("1h").mean()

    def filter_(path: str, out: str) -> Any:
        frame = pd.read_parquet(path)
        frame[frame.value > THRESHOLD].to_parquet(out, index=False)

    return {"groupby": groupby, "hourly": hourly, "filter": filter_}[work]


def _dask(work: str, formulas: str, split: bool) -> Work:
    import dask.dataframe as dd

    spec = importlib.util.spec_from_file_location("bench_formulas", formulas)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    options = {"split_row_groups": True} if split else {}
    formula = getattr(module, SERVER_FORMULAS[work])

    def run(path: str, out: str) -> Any:
        result = formula(dd.read_parquet(path, **options))
        if work == "filter":
            return result.to_parquet(out, write_index=False)
        return result.compute()

    return run


def _polars(work: str) -> Work:
    import polars as pl

    def groupby(path: str, out: str) -> Any:
        query = pl.scan_parquet(path).group_by("sensor").agg(pl.col("value").mean())
        return query.collect(engine="streaming")

    def hourly(path: str, out: str) -> Any:
        query = pl.scan_parquet(path).set_sorted("time")
        query = query.group_by_dynamic("time", every="1h").agg(pl.col("value").mean())
        return query.collect(engine="streaming")

    def filter_(path: str, out: str) -> Any:
        pl.scan_parquet(path).filter(pl.col("value") > THRESHOLD).sink_parquet(out)

    return {"groupby": groupby, "hourly": hourly, "filter": filter_}[work]


def _duckdb(work: str) -> Work:
    import duckdb

    queries = {
        "groupby": "SELECT sensor, avg(value) FROM read_parquet('{path}') GROUP BY sensor",
        "hourly": "SELECT date_trunc('hour', time) AS hour, avg(value) FROM read_parquet('{path}')"
        " GROUP BY hour ORDER BY hour",
        "filter": "COPY (SELECT * FROM read_parquet('{path}') WHERE value > {threshold})"
        " TO '{out}' (FORMAT parquet)",
    }

    def run(path: str, out: str) -> Any:
        query = queries[work].format(path=path, out=out, threshold=THRESHOLD)
        connection = duckdb.connect()
        answer = connection.sql(query)
        return None if answer is None else answer.fetchall()

    return run


def prepare(tool: str, work: str, formulas: str) -> Work:
    """The tool's function for ``work``, its libraries imported."""
    if tool == "pandas":
        return _pandas(work)
    if tool in ("dask", "dask-split"):
        return _dask(work, formulas, split=tool == "dask-split")
    if tool == "polars":
        return _polars(work)
    if tool == "duckdb":
        return _duckdb(work)
    raise SystemExit(f"unknown tool {tool!r}; the tools: {', '.join(TOOLS)}")


def check(answer: Any, out: str) -> dict[str, Any]:
    """``rows`` and ``mean`` of an answer (or of the file written), however the tool gave it."""
    if os.path.exists(out):
        import pyarrow.parquet as pq

        return {"rows": pq.ParquetDataset(out).read(columns=[]).num_rows, "mean": None}
    if isinstance(answer, list):
        values = [row[-1] for row in answer]
    elif hasattr(answer, "to_series"):  # a polars frame
        values = answer.to_series(answer.width - 1).to_list()
    else:
        values = answer.tolist()
    present = [v for v in values if v is not None and v == v]
    return {"rows": len(values), "mean": sum(present) / len(present) if present else None}


def _cpu() -> float:
    """CPU seconds this process has used, all its threads together."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def high_water() -> int:
    """This process's peak resident memory in bytes (``VmHWM``: since its exec, unlike
    ``ru_maxrss``, which Linux carries over from the parent)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def main(argv: list[str]) -> None:
    tool, work, path, out, formulas = argv
    run = prepare(tool, work, formulas)
    start, cpu = time.perf_counter(), _cpu()
    try:
        answer = run(path, out)
    except Exception as e:  # a tool that cannot do the work is a figure too
        first = (str(e).splitlines() or [""])[0][:100]
        print(json.dumps({"error": f"{type(e).__name__}: {first}"}))
        return
    seconds, cpu = time.perf_counter() - start, _cpu() - cpu
    print(
        json.dumps({"seconds": seconds, "cpu": cpu, "maxrss": high_water(), **check(answer, out)})
    )


if __name__ == "__main__":
    main(sys.argv[1:])
