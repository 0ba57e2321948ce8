"""
Large data through a real server, beside what a user would pick instead: a report, not a test.

    python benchmarks/large.py [--rows 20M,120M] [--only server,polars,groupby] [--repeat 3]
                               [--data FOLDER] [--quick] [--json FILE]

Generates its own data (a Parquet file of row groups of 1M rows: ``time``, sorted timestamps one
every 100 ms; ``sensor``, one of 20 names; ``value``, normal(20, 5)), kept in ``--data`` and made
again only when missing. For each size it runs three works: the mean of ``value`` by sensor,
the hourly mean (``resample``), and a filter keeping about 70 % of the rows written as a table.
Each runs as a job of a real ``twistd -n measuring`` (through ``measuring.client.Client``), and
in a fresh process each with pandas + pyarrow, plain Dask with its defaults, Dask with
``split_row_groups=True``, polars (lazy, streaming) and DuckDB (``benchmarks/peers.py``). Sizes of
``--large-from`` rows and more run under ``--job-memory`` (1.5GB) and without pandas, which
would hold the whole table in memory.

Times are the work's seconds: a peer's from after its imports to its answer, the server's from
the client's request to the job's answer (the server has done the imports ahead of time). Peak
memory is the most resident memory seen, sampled every 20 ms, of the process tree doing the
work: the peer's process, or the job's process (as Info "Dask process" names it) and everything
below it.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any

import harness
from harness import PeakSampler, Run, count_label, mib
from peers import FORMULAS, SERVER_FORMULAS, TOOLS, WORKS

from measuring.client import Client, JobError

HERE = os.path.dirname(os.path.abspath(__file__))
FORMULA_FILE = "bench_formulas.py"
ALL_TOOLS = ("server", *TOOLS)
IN_MEMORY = ("pandas",)  # tools that hold the whole table: not run on the large sizes
SENSORS = [f"sensor-{i:02d}" for i in range(1, 21)]


@dataclass
class Case:
    """One size of data and how the server runs it."""

    rows: int
    row_group: int
    job_memory: str | None

    @property
    def label(self) -> str:
        memory = f", --job-memory {self.job_memory}" if self.job_memory else ""
        return f"{count_label(self.rows)} rows{memory}"


def dataset(folder: str, rows: int, row_group: int) -> str:
    """The Parquet file of ``rows`` rows in ``folder``, written now when it is not there yet."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    name = f"series-{count_label(rows)}-rg{count_label(row_group)}.parquet"
    path = os.path.join(folder, name)
    if os.path.exists(path):
        return name
    print(f"writing {name} ...", file=sys.stderr, flush=True)
    schema = pa.schema(
        [("time", pa.timestamp("us")), ("sensor", pa.string()), ("value", pa.float64())]
    )
    rng = np.random.default_rng(9)
    names = pa.array(SENSORS)
    start = np.datetime64("2026-01-01T00:00:00", "us")
    partial = path + ".partial"
    with pq.ParquetWriter(partial, schema) as writer:
        for first in range(0, rows, row_group):
            n = min(row_group, rows - first)
            times = start + np.arange(first, first + n, dtype=np.int64) * 100_000
            table = pa.table(
                {
                    "time": pa.array(times, pa.timestamp("us")),
                    "sensor": names.take(pa.array(rng.integers(0, len(SENSORS), n))),
                    "value": pa.array(rng.normal(20.0, 5.0, n)),
                },
                schema=schema,
            )
            writer.write_table(table, row_group_size=row_group)
    os.replace(partial, path)
    return name


def read_through(path: str) -> None:
    """Read the file once, so that every tool finds it in the page cache alike."""
    with open(path, "rb") as f:
        while f.read(16 * 2**20):
            pass


def _clear(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.remove(path)


class ServerRunner:
    """Runs the works as jobs of one real server and measures them."""

    def __init__(self, local: harness.LocalServer, folder: str) -> None:
        self.local, self.folder = local, folder
        self.indexed = "index" in inspect.signature(Client.run).parameters

    def run(self, base: str, work: str) -> Run:
        harness.settle(self.local)
        name = SERVER_FORMULAS[work]
        options: dict[str, Any] = {}
        if work == "hourly" and self.indexed:
            name, options = "hourly_indexed", {"index": "time"}
        job = None
        # A connection of its own: the server closes one left idle while the peers run.
        client = Client("127.0.0.1", self.local.port, timeout=3600.0)
        with PeakSampler(harness.job_processes(self.local)) as sampler:
            start = time.perf_counter()
            try:
                job = client.run(self.folder, base, FORMULA_FILE, functions=[name], **options)
            except JobError as e:
                error = f"{e.code}: {e.message}"
            seconds = time.perf_counter() - start
        if job is None:
            client.close()
            return Run(None, sampler.peak, error=error)
        try:
            result = job.results[name]
            report = {"rows": result.rows, "mean": None, "elapsed": job.status().get("Elapsed")}
            if work != "filter":
                values = result.to_pandas(source="file")
                report["mean"] = float(values.mean())
        finally:
            client.close()
            _clear(os.path.join(self.folder, "results", job.id))
        return Run(seconds, sampler.peak, sampler.cpu, report=report)


def run_peer(tool: str, work: str, folder: str, base: str) -> Run:
    out = os.path.join(folder, "bench-out", f"{tool}-{work}.parquet")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    _clear(out)
    try:
        return harness.run_python(
            [
                os.path.join(HERE, "peers.py"),
                tool,
                work,
                os.path.join(folder, base),
                out,
                os.path.join(folder, FORMULA_FILE),
            ]
        )
    finally:
        _clear(out)


def measure(case: Case, tools: list[str], works: list[str], folder: str, repeat: int) -> dict:
    """Every selected tool on every selected work for one size: {work: {tool: Run}}."""
    base = dataset(folder, case.rows, case.row_group)
    read_through(os.path.join(folder, base))
    table: dict[str, dict[str, Run]] = {work: {} for work in works}
    arguments = ["--job-memory", case.job_memory] if case.job_memory else []
    with harness.server(folder, *arguments) as local:
        runner = ServerRunner(local, folder)
        for work in works:
            for tool in tools:
                runs = []
                for _ in range(repeat):
                    harness.settle(local)
                    if tool == "server":
                        runs.append(runner.run(base, work))
                    else:
                        runs.append(run_peer(tool, work, folder, base))
                table[work][tool] = harness.summarize(runs)
                _progress(case, work, tool, table[work][tool])
    return table


def _progress(case: Case, work: str, tool: str, run: Run) -> None:
    figure = run.error or f"{run.seconds:.3f} s, {mib(run.peak)}, CPU {run.cpu or 0:.2f} s"
    print(f"  {case.label}: {work} / {tool}: {figure}", file=sys.stderr, flush=True)


def cell(run: Run | None, server: Run | None, is_server: bool) -> str:
    if run is None:
        return "—"
    if run.error is not None or run.seconds is None:
        code = (run.error or "failed").split(":")[0]
        return f"{code} · {mib(run.peak)}" if run.peak else code
    text = f"{run.seconds:.2f} s"
    if not is_server:
        ratio = f"{server.seconds / run.seconds:.2f}x" if server and server.seconds else "—"
        text += f" · {ratio}"
    cpu = "" if run.cpu is None else f" · CPU {run.cpu:.2f} s"
    return f"{text} · {mib(run.peak)}{cpu}"


def report(case: Case, table: dict[str, dict[str, Run]], tools: list[str]) -> None:
    print(f"\n### {case.label}\n")
    rows, notes = [], []
    for work, runs in table.items():
        server = runs.get("server")
        rows.append([work, *[cell(runs.get(tool), server, tool == "server") for tool in tools]])
        expected = next((run.report for run in runs.values() if run.report), None)
        for tool, run in runs.items():
            if run.error:
                notes.append(f"- {work} / {tool}: {run.error}")
            elif expected and not _agrees(expected, run.report, work):
                notes.append(f"- {work} / {tool}: answer differs: {run.report} vs {expected}")
    print(harness.markdown(["work", *tools], rows))
    print(
        "\nEach cell: seconds · the server's seconds ÷ this tool's (below 1: the server is"
        " faster) · peak resident memory of the process tree doing the work · the CPU time it"
        " used (all cores)."
    )
    harness.print_load()
    if notes:
        print("\n" + "\n".join(notes))


def _agrees(expected: dict, got: dict, work: str) -> bool:
    if expected.get("rows") != got.get("rows"):
        return False
    a, b = expected.get("mean"), got.get("mean")
    return a is None or b is None or abs(a - b) <= 1e-6 * max(1.0, abs(a))


def _cases(args: argparse.Namespace) -> list[Case]:
    if args.quick:
        sizes, row_group, large_from = [200_000, 1_200_000], 100_000, 1_000_000
    else:
        sizes = [harness.parse_count(size) for size in args.rows.split(",")]
        row_group, large_from = harness.parse_count(args.row_group), args.large_from
    return [
        Case(rows, row_group, args.job_memory if rows >= large_from else None) for rows in sizes
    ]


def _selection(only: str | None) -> tuple[list[str], list[str]]:
    names = [name.strip() for name in (only or "").split(",") if name.strip()]
    unknown = sorted(set(names) - set(ALL_TOOLS) - set(WORKS))
    if unknown:
        raise SystemExit(
            f"--only: unknown {', '.join(unknown)}; the tools: "
            f"{', '.join(ALL_TOOLS)}; the works: {', '.join(WORKS)}"
        )
    tools = [tool for tool in ALL_TOOLS if tool in names] or list(ALL_TOOLS)
    works = [work for work in WORKS if work in names] or list(WORKS)
    return tools, works


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", default="20M,120M", help="sizes, comma separated (20M,120M)")
    parser.add_argument("--row-group", default="1M", help="rows per row group (1M)")
    parser.add_argument(
        "--large-from",
        type=harness.parse_count,
        default=100_000_000,
        help="sizes from this many rows run under --job-memory (100M)",
    )
    parser.add_argument("--job-memory", default="1.5GB", help="the large sizes' job memory")
    parser.add_argument("--only", help="tools and works to run, comma separated (all)")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each; the median time")
    parser.add_argument("--data", help="folder for the data, kept between runs (a temp folder)")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke test")
    parser.add_argument("--json", help="also write every figure to this file")
    args = parser.parse_args()
    tools, works = _selection(args.only)
    folder = os.path.realpath(args.data or os.path.join(tempfile.gettempdir(), "measuring-bench"))
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, FORMULA_FILE), "w") as f:
        f.write(FORMULAS)
    print("## Large data: the server beside pandas, Dask, polars and DuckDB\n")
    harness.print_machine()
    figures = []
    for case in _cases(args):
        chosen = [t for t in tools if not (case.job_memory and t in IN_MEMORY)]
        table = measure(case, chosen, works, folder, args.repeat)
        report(case, table, chosen)
        figures.append(
            {
                "case": asdict(case),
                "runs": {w: {t: asdict(r) for t, r in runs.items()} for w, runs in table.items()},
            }
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": harness.machine(), "figures": figures}, f, indent=1)


if __name__ == "__main__":
    main()
