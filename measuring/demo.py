"""
``python -m measuring.demo``: the product's main job, end to end, on its defaults.

Writes a day of per-second readings from three sensors as Parquet and a formula file into a new
temporary folder, starts the real server on a free loopback port, sends the Dask request over TCP,
prints the answer and the result tables, and stops the server. The folder is kept, to look at.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import textwrap
from typing import Any

from measuring.local import LocalServer

FORMULAS = '''\
"""Formulas for the measuring demo: each public function gets the dataset as a Dask DataFrame."""


def mean_by_sensor(df):
    """Mean reading of each sensor."""
    return df.groupby("sensor").value.mean()


def stats_by_sensor(df):
    """Count, mean, min and max per sensor."""
    return df.groupby("sensor").value.agg(["count", "mean", "min", "max"])


def hourly_mean(df):
    """Hourly mean of all sensors (the file is indexed by time, so resample works)."""
    return df.value.resample("1h").mean()


def events_over_threshold(df):
    """Readings above 30, the alarm threshold."""
    return df[df.value > 30.0]


def peak(df):
    """The highest reading of the day."""
    return df.value.max()
'''


def write_sample(folder: str, seconds: int = 86_400) -> None:
    """A day of per-second readings from three sensors (time-indexed Parquet) and the formulas."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(2026)
    sensors = ["pressure-1", "pressure-2", "temperature-1"]
    frames = []
    for number, sensor in enumerate(sensors):
        time = pd.date_range("2026-11-27", periods=seconds, freq="s", name="time")
        daily = 5.0 * np.sin(np.linspace(0, 2 * np.pi, seconds) + number)
        value = 20.0 + number * 2 + daily + rng.normal(0.0, 1.5, seconds)
        frames.append(pd.DataFrame({"sensor": sensor, "value": value}, index=time))
    data = pd.concat(frames).sort_index(kind="stable")
    data.to_parquet(os.path.join(folder, "time_series.parquet"), row_group_size=100_000)
    with open(os.path.join(folder, "work.py"), "w") as f:
        f.write(FORMULAS)


def _summary(answer: dict[str, Any]) -> str:
    """One line per result: name, kind, rows and file, or the value."""
    response = answer["Response"]
    lines = [f"Job {answer['Job']}: {answer['Status']} in {response['Elapsed']} s"]
    for name, result in response["Results"].items():
        if result["Kind"] == "Scalar":
            lines.append(f"  {name:<24} Scalar     {result['Value']}")
        else:
            rows = f"{result['Rows']} rows"
            lines.append(f"  {name:<24} {result['Kind']:<10} {rows:<11} {result['File']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m measuring.demo", description=__doc__)
    parser.add_argument("--folder", help="folder for the sample (default: a new temporary one)")
    args = parser.parse_args(argv)
    folder = os.path.realpath(args.folder or tempfile.mkdtemp(prefix="measuring-demo-"))
    os.makedirs(folder, exist_ok=True)

    print(f"Writing a day of readings from three sensors and work.py into {folder}")
    write_sample(folder)
    print("Starting the server: twistd -n measuring --port tcp:0 ...", flush=True)
    server = LocalServer(folder, "--data-root", folder)
    try:
        print(f"Listening on 127.0.0.1:{server.port}\n")
        request = {
            "Header": "Dask",
            "Request": {"Directory": folder, "Base": "time_series.parquet", "File": "work.py"},
        }
        print("Request:\n" + json.dumps(request, indent=2), flush=True)
        answer = server.ask(request)
        line = json.dumps(answer)
        print(f"\nAnswer (one line, {len(line)} bytes):\n{line[:300]} ...")
    finally:
        code = server.stop()
    print("\nServer stopped." if code in (0, -15) else f"\nServer stopped with exit code {code}.")
    if answer.get("Status") != "OK":
        print(f"The job failed: {answer['Error']['Message']}", file=sys.stderr)
        return 1
    print(_summary(answer))
    _print_tables(folder, answer["Response"]["Results"])
    print(f"\nThe data, the formulas and the results are in {folder}")
    return 0


def _print_tables(folder: str, results: dict[str, Any]) -> None:
    import pandas as pd

    with pd.option_context("display.width", 100, "display.max_columns", 10):
        for name, result in results.items():
            if result["Kind"] == "Scalar":
                print(f"\n{name}: {result['Value']}")
                continue
            table = pd.read_parquet(os.path.join(folder, result["File"]))
            print(f"\n{name} ({result['Kind']}, {result['Rows']} rows) from {result['File']}:")
            print(textwrap.indent(table.head(10).to_string(), "  "))


if __name__ == "__main__":
    sys.exit(main())
