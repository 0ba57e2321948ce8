"""
What ``measuring-client`` prints for people: plain text tables, jobs, results, charts.

Standard library only at import (click's echo and the client); matplotlib and pandas are
imported only by ``plot``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import click

PREVIEW_ROWS = 5


def table(rows: Iterable[dict[str, Any]], columns: list[str] | None = None) -> str:
    """Rows as a plain text table, columns aligned."""
    rows = list(rows)
    columns = columns or list(dict.fromkeys(key for row in rows for key in row))
    cells = [[_cell(row.get(column)) for column in columns] for row in rows]
    widths = [
        max([len(column), *(len(line[i]) for line in cells)]) for i, column in enumerate(columns)
    ]
    lines = ["  ".join(column.ljust(width) for column, width in zip(columns, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in cells]
    return "\n".join(line.rstrip() for line in lines)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def duration(seconds: float) -> str:
    """``1d 2h 3m 4s``."""
    minutes, second = divmod(int(seconds), 60)
    hours, minute = divmod(minutes, 60)
    days, hour = divmod(hours, 24)
    parts = [f"{days}d"] * bool(days) + [f"{hour}h"] * bool(hours) + [f"{minute}m"] * bool(minutes)
    return " ".join([*parts, f"{second}s"])


def error_text(error: dict[str, Any] | None) -> str:
    """A job's ``{"Code", "Message"}`` as ``Code: message``."""
    return f"{error['Code']}: {error['Message']}" if error else ""


def within(path: str | None, directory: str | None) -> str | None:
    """``path`` relative to its job's Directory when it lies inside it."""
    if path and directory and path.startswith(directory.rstrip("/") + "/"):
        return os.path.relpath(path, directory)
    return path


def jobs(found: list[dict[str, Any]]) -> str:
    """The Job List as a table: id, state, submission time, where, what, and any error."""
    rows = [
        {
            **job,
            "Base": within(job.get("Base"), job.get("Directory")),
            "File": within(job.get("File"), job.get("Directory")),
            "Error": error_text(job.get("Error")),
        }
        for job in found
    ]
    columns = ["Job", "State", "Submitted", "Directory", "Base", "File"]
    return table(rows, columns + ["Error"] * any(row["Error"] for row in rows))


def job_status(job: str, answer: dict[str, Any]) -> None:
    """A Job Status Response for people."""
    click.echo(f"job {job}: {answer['State']} (attempts {answer['Attempts']})")
    for key in ("Submitted", "Started", "Finished", "Directory", "Base", "File"):
        if answer.get(key):
            click.echo(f"  {key.lower():<10} {answer[key]}")
    if answer.get("Functions"):
        click.echo(f"  {'formulas':<10} {', '.join(answer['Functions'])}")
    if answer.get("Progress"):
        click.echo(f"  progress   {answer['Progress']['Done']}/{answer['Progress']['Total']}")
    if answer.get("Error"):
        click.echo(f"  error      {error_text(answer['Error'])}")
    if answer.get("Results"):
        click.echo(f"  elapsed    {answer.get('Elapsed')} s")
        results(job, answer, heading=False)


def results(job: str, status: dict[str, Any], heading: bool = True) -> None:
    """A done job's results: one line each, then the first rows of each table."""
    if heading:
        click.echo(f"job {job}: {status['State']} in {status.get('Elapsed')} s")
    found = status.get("Results", {})
    summary = [
        {"result": name, "kind": r["Kind"], "rows": r.get("Rows"), "file or value":
         r.get("File") if r["Kind"] != "Scalar" else r.get("Value")}
        for name, r in found.items()
    ]  # fmt: skip
    click.echo(table(summary))
    for name, entry in found.items():
        if entry["Kind"] != "Scalar" and entry.get("Preview"):
            click.echo(f"\n{name} (first rows of {entry['Rows']}):")
            click.echo(table(entry["Preview"][:PREVIEW_ROWS]))


def plot(data: Any, title: str, out: str) -> None:
    """A chart of a table (``chart``) written to the image file ``out``."""
    import matplotlib.pyplot as plt

    figure = chart(data, title)
    figure.savefig(out)
    plt.close(figure)


def chart(data: Any, title: str) -> Any:
    """
    A matplotlib Figure of a table: a line over time, or bars for a grouped result; each numeric
    column of a DataFrame on an axis of its own, so that a count beside a mean does not flatten
    it. ValueError for a table with no numeric column.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    kind = "line" if isinstance(data.index, pd.DatetimeIndex) else "bar"
    if isinstance(data, pd.DataFrame):
        data = data.select_dtypes("number")
        if not len(data.columns):
            raise ValueError("it has no numeric column to plot")
    panels = data.shape[1] if data.ndim > 1 else 1
    figure, axes = plt.subplots(
        panels, 1, figsize=(9, 2.0 + 2.5 * panels), sharex=True, squeeze=False
    )
    columns = [data[column] for column in data.columns] if data.ndim > 1 else [data]
    for axis, column in zip(list(axes[:, 0]), columns, strict=True):
        column.plot(kind=kind, ax=axis, legend=False)
        axis.set_ylabel(str(column.name or ""))
    figure.suptitle(title)
    figure.tight_layout()
    return figure
