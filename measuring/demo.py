"""
``python -m measuring.demo`` (also ``measuring-client demo``): the product's main job, end to end.

Writes a week of per-second readings from five sensors (about three million rows) as Parquet and a
formula file into a new temporary folder, starts the real server on a free loopback port, runs the
formulas through the client with a progress bar, prints the result tables and stops the server.
The folder is kept, to look at. With ``--json`` the run's answer lines go to stdout, the rest to
stderr.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import textwrap
from typing import Any

from measuring.client import Client, JobError
from measuring.local import LocalServer

SENSORS = ("pressure-1", "pressure-2", "pressure-3", "temperature-1", "temperature-2")
THRESHOLD = 31.0

FORMULAS = f'''\
"""Formulas for the measuring demo: each public function gets the dataset as a Dask DataFrame."""

THRESHOLD = {THRESHOLD}


def stats_by_sensor(df):
    """Count, mean, minimum and maximum of each sensor."""
    return df.groupby("sensor").value.agg(["count", "mean", "min", "max"])


def hourly_mean(df):
    """The hourly mean over all sensors (the data is indexed by time, so resample works)."""
    return df.value.resample("1h").mean()


def daily_peak_by_sensor(df):
    """Each sensor's highest reading of each day."""
    day = df.index.to_series().dt.floor("D")
    return df.assign(day=day).groupby(["sensor", "day"]).value.max()


def alarms(df):
    """Readings above the alarm threshold."""
    return df[df.value > THRESHOLD]


def alarm_count(df):
    """How many readings were above the threshold."""
    return (df.value > THRESHOLD).sum()


def peak(df):
    """The highest reading of the week."""
    return df.value.max()
'''


def write_sample(folder: str, days: int = 7) -> int:
    """Per-second readings of the sensors, indexed by time, and the formulas; returns the rows."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(2026)
    seconds = days * 86_400
    time = pd.date_range("2026-11-21", periods=seconds, freq="s", name="time")
    frames = []
    for number, sensor in enumerate(SENSORS):
        cycle = 5.0 * np.sin(np.linspace(0, 2 * np.pi * days, seconds) + number)
        value = 20.0 + number + cycle + rng.normal(0.0, 1.5, seconds)
        frames.append(pd.DataFrame({"sensor": sensor, "value": value}, index=time))
    data = pd.concat(frames).sort_index(kind="stable")
    data["sensor"] = data["sensor"].astype("category")
    data.to_parquet(os.path.join(folder, "time_series.parquet"), row_group_size=250_000)
    with open(os.path.join(folder, "work.py"), "w") as f:
        f.write(FORMULAS)
    return len(data)


def _answer_line(request: dict[str, Any], line: bytes) -> None:
    sys.stdout.buffer.write(line)
    sys.stdout.buffer.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m measuring.demo", description=__doc__)
    parser.add_argument("--folder", help="folder for the sample (default: a new temporary one)")
    parser.add_argument("--days", type=int, default=7, help="days of readings (default: 7)")
    parser.add_argument(
        "--json",
        action="store_true",
        help="the server's answer lines on stdout, the rest on stderr",
    )
    args = parser.parse_args(argv)
    say = functools.partial(print, file=sys.stderr if args.json else sys.stdout)
    folder = os.path.realpath(args.folder or tempfile.mkdtemp(prefix="measuring-demo-"))
    os.makedirs(folder, exist_ok=True)

    say(f"Writing {args.days} days of per-second readings from {len(SENSORS)} sensors", flush=True)
    rows = write_sample(folder, args.days)
    say(f"  {rows:,} rows in {folder}/time_series.parquet, formulas in work.py")
    say("Starting the server: twistd -n measuring --port tcp:0 ...", flush=True)
    server = LocalServer(folder, "--data-root", folder)
    try:
        say(f"Listening on {server.address}\n")
        request = {"Directory": folder, "Base": "time_series.parquet", "File": "work.py"}
        say("Running:", json.dumps({"Header": "Dask", "Request": request}), flush=True)
        with Client.from_address(server.address) as client:
            if args.json:
                client.record = _answer_line
            bar = sys.stderr.isatty() and not args.json
            try:
                job = client.run(folder, "time_series.parquet", "work.py", progress=bar or None)
            except JobError as e:
                print(f"The job failed: {e}", file=sys.stderr)
                return 1
            client.record = None  # with --json, the run's lines only
            _print_results(job.id, job.status(), job.results, say)
    finally:
        code = server.stop()
    say("\nServer stopped." if code in (0, -15) else f"\nServer stopped with exit code {code}.")
    say(f"The data, the formulas and the results are in {folder}")
    return 0


def _print_results(
    job: str, status: dict[str, Any], results: dict[str, Any], say: Any = print
) -> None:
    import pandas as pd

    say(f"\nJob {job}: {status['State']} in {status['Elapsed']} s")
    with pd.option_context("display.width", 100, "display.max_columns", 10):
        for name, result in results.items():
            if result.kind == "Scalar":
                say(f"\n{name}: {result.value}")
                continue
            say(f"\n{name} ({result.kind}, {result.rows:,} rows) in {result.file}:")
            say(textwrap.indent(result.to_pandas().head(8).to_string(), "  "))


if __name__ == "__main__":
    sys.exit(main())
