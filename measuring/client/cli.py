"""
``measuring-client``: the command line of ``measuring.client``.

Exit codes: 0 done; 1 the job failed, timed out, was cancelled or refused (Busy); 2 the command or
what it names is wrong (usage, BadRequest, Forbidden, NotFound); 3 the server cannot be reached or
talked to. An error from the server is one line on stderr (with ``--debug``, the traceback too); a
usage error is click's usual short usage and error line. ``--json`` prints
the server's answers as they are, for scripts. Built on click, with tqdm's bars on a terminal.
"""

from __future__ import annotations

import csv
import json
import os
import sys
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import click

from measuring.client import Client, ClientError, JobError, Result, bar
from measuring.wire import ENGINES, INFO_REQUESTS, OUTPUTS, STATES, token_lines

EXIT_JOB, EXIT_USAGE, EXIT_SERVER = 1, 2, 3
_EXITS = {
    "JobFailed": EXIT_JOB,
    "Timeout": EXIT_JOB,
    "Cancelled": EXIT_JOB,
    "MemoryLimit": EXIT_JOB,
    "Busy": EXIT_JOB,
    "Unavailable": EXIT_JOB,
    "BadRequest": EXIT_USAGE,
    "Forbidden": EXIT_USAGE,
    "NotFound": EXIT_USAGE,
}
PREVIEW_ROWS = 5


@dataclass
class Settings:
    server: str
    token_file: str | None
    tls: bool
    cafile: str | None
    json: bool
    debug: bool

    def client(self) -> Client:
        token = None
        if self.token_file:
            try:
                with open(self.token_file, encoding="utf-8") as f:
                    token = next(iter(token_lines(f.read().splitlines())), None)
            except OSError as e:
                raise click.UsageError(
                    f"cannot read --token-file {self.token_file}: {e.strerror}"
                ) from None
        try:
            return Client.from_address(
                self.server, token=token, tls=self.tls, cafile=self.cafile, timeout=60.0
            )
        except ValueError as e:
            raise click.UsageError(str(e)) from None


class Commands(click.Group):
    """Turns client errors into one line and the exit code that says what went wrong."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (JobError, ClientError) as e:
            settings = ctx.find_object(Settings)
            if settings is not None and settings.debug:
                traceback.print_exc()
            if isinstance(e, JobError):
                click.echo(f"error: {e.code}: {e.message}", err=True)
                if e.job and e.code in ("JobFailed", "Timeout", "MemoryLimit"):
                    click.echo(f"what it printed: measuring-client job log {e.job}", err=True)
                ctx.exit(_EXITS.get(e.code, EXIT_SERVER))
            click.echo(f"error: {e}", err=True)
            ctx.exit(EXIT_SERVER)


def _settings() -> Settings:
    return click.get_current_context().ensure_object(Settings)


def _show(value: Any, human: Callable[[], None]) -> None:
    """``value`` as JSON with --json; otherwise what ``human`` prints."""
    if _settings().json:
        click.echo(json.dumps(value, ensure_ascii=False))
    else:
        human()


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


@click.group(cls=Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--server",
    envvar="MEASURING_SERVER",
    default="127.0.0.1:8765",
    show_default=True,
    help="HOST:PORT of the server [env MEASURING_SERVER].",
)
@click.option(
    "--token-file",
    envvar="MEASURING_TOKEN_FILE",
    help="File holding the token: its first line that is not blank or a # comment "
    "[env MEASURING_TOKEN_FILE].",
)
@click.option("--tls", is_flag=True, help="Talk TLS to the server.")
@click.option("--cafile", help="Certificates to trust for --tls (e.g. a self-signed cert.pem).")
@click.option("--json", "as_json", is_flag=True, help="Print the server's answers as JSON.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@click.pass_context
def main(
    ctx: click.Context,
    server: str,
    token_file: str | None,
    tls: bool,
    cafile: str | None,
    as_json: bool,
    debug: bool,
) -> None:
    """Talk to a measuring server: run formulas over Parquet data and follow the jobs."""
    ctx.obj = Settings(server, token_file, tls or cafile is not None, cafile, as_json, debug)


@main.command()
def status() -> None:
    """Server status: state, version, uptime, jobs."""
    with _settings().client() as client:
        answer = client.status()

    def human() -> None:
        jobs, workers = answer["Jobs"], answer["Workers"]
        click.echo(
            f"measuring {answer['Version']} at {_settings().server}: {answer['State']}, "
            f"up {_duration(answer['Uptime'])}\n"
            f"jobs: {jobs['Running']} running, {jobs['Queued']} queued\n"
            f"workers: {workers['Size']} ({workers['Ready']} warm)"
        )

    _show(answer, human)


def _duration(seconds: float) -> str:
    minutes, second = divmod(int(seconds), 60)
    hours, minute = divmod(minutes, 60)
    days, hour = divmod(hours, 24)
    parts = [f"{days}d"] * bool(days) + [f"{hour}h"] * bool(hours) + [f"{minute}m"] * bool(minutes)
    return " ".join([*parts, f"{second}s"])


@main.command()
@click.argument("name")
def info(name: str) -> None:
    """Any Info request: status, dask-process, all-process, all-statistic (any case)."""
    names = {known.lower(): known for known in INFO_REQUESTS}
    known = names.get(name.lower().replace("-", " ").replace("_", " "))
    if known is None:
        raise click.BadParameter(
            f"{name!r} is none of {', '.join(INFO_REQUESTS)}", param_hint="NAME"
        )
    with _settings().client() as client:
        answer = client.info(known)
    _show(answer, lambda: click.echo(json.dumps(answer, indent=2, ensure_ascii=False)))


_JOB_OPTIONS = [
    click.argument("directory"),
    click.argument("base"),
    click.argument("file", required=False),
    click.option(
        "--code",
        type=click.Path(exists=True, dir_okay=False),
        help="A local formula file, sent with the job (instead of FILE on the server).",
    ),
    click.option(
        "-f", "--function", "functions", multiple=True, help="Run only this formula (repeatable)."
    ),
    click.option("--output", type=click.Choice(list(OUTPUTS)), help="How tables are written."),
    click.option("--engine", type=click.Choice(ENGINES), help="How the data is read."),
    click.option("--timeout", type=float, help="Longest the job may run, in seconds."),
]


def _job_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The arguments and options of ``run`` and ``submit``."""
    for option in reversed(_JOB_OPTIONS):
        command = option(command)
    return command


@main.command()
@_job_options
def run(directory: str, base: str, file: str | None, code: str | None,
        functions: tuple[str, ...], output: str | None, engine: str | None,
        timeout: float | None) -> None:  # fmt: skip
    """Run the formulas of FILE (or --code) over BASE in DIRECTORY, wait, show the results."""
    settings = _settings()
    name = os.path.basename(_formulas(file, code))
    progress = bar(name) if sys.stdout.isatty() and not settings.json else None
    started: list[str] = []

    def accepted(job: Any) -> None:
        started.append(job.id)
        if sys.stderr.isatty():
            click.echo(f"job {job.id}", err=True)

    with settings.client() as client:
        try:
            job = client.run(_local(directory), base, file, list(functions) or None, output,
                             timeout, engine, progress=progress, accepted=accepted,
                             code=code)  # fmt: skip
        except KeyboardInterrupt:
            if started:
                click.echo(
                    f"\ninterrupted: job {started[0]} goes on "
                    f"(measuring-client job cancel {started[0]} stops it)",
                    err=True,
                )
            sys.exit(130)
        status = job.status()
    _show(status, lambda: _print_results(job.id, status))


def _formulas(file: str | None, code: str | None) -> str:
    """The formula file a job names: FILE on the server or a local --code file, not both."""
    if (file is None) == (code is None):
        raise click.UsageError(
            "give FILE (a formula file in DIRECTORY on the server) or --code PATH (a local "
            "formula file, sent with the job), not both"
        )
    return str(file if code is None else code)


def _local(directory: str) -> str:
    """A folder that exists here is sent as an absolute path (the server may run here too)."""
    return os.path.abspath(directory) if os.path.isdir(directory) else directory


def _print_results(job: str, status: dict[str, Any], heading: bool = True) -> None:
    if heading:
        click.echo(f"job {job}: {status['State']} in {status.get('Elapsed')} s")
    results = status.get("Results", {})
    summary = [
        {"result": name, "kind": r["Kind"], "rows": r.get("Rows"), "file or value":
         r.get("File") if r["Kind"] != "Scalar" else r.get("Value")}
        for name, r in results.items()
    ]  # fmt: skip
    click.echo(table(summary))
    for name, entry in results.items():
        if entry["Kind"] != "Scalar" and entry.get("Preview"):
            click.echo(f"\n{name} (first rows of {entry['Rows']}):")
            click.echo(table(entry["Preview"][:PREVIEW_ROWS]))


@main.command()
@_job_options
def submit(directory: str, base: str, file: str | None, code: str | None,
           functions: tuple[str, ...], output: str | None, engine: str | None,
           timeout: float | None) -> None:  # fmt: skip
    """Queue a job and print its id."""
    _formulas(file, code)
    with _settings().client() as client:
        job = client.submit(
            _local(directory), base, file, list(functions) or None, output, timeout, engine, code
        )
    _show({"Job": job.id}, lambda: click.echo(job.id))


@main.group(cls=Commands)
def job() -> None:
    """Follow one job: status, wait, cancel, log."""


@job.command(name="status")
@click.argument("job_id", metavar="ID")
def job_status(job_id: str) -> None:
    """A job's state, times, and results or error."""
    with _settings().client() as client:
        answer = client.job(job_id).status()

    def human() -> None:
        click.echo(f"job {job_id}: {answer['State']} (attempts {answer['Attempts']})")
        for key in ("Submitted", "Started", "Finished", "Directory", "File"):
            if answer.get(key):
                click.echo(f"  {key.lower():<10} {answer[key]}")
        if answer.get("Progress"):
            click.echo(f"  progress   {answer['Progress']['Done']}/{answer['Progress']['Total']}")
        if answer.get("Error"):
            click.echo(f"  error      {answer['Error']['Code']}: {answer['Error']['Message']}")
        if answer.get("Results"):
            click.echo(f"  elapsed    {answer.get('Elapsed')} s")
            _print_results(job_id, answer, heading=False)

    _show(answer, human)


@job.command()
@click.argument("job_id", metavar="ID")
@click.option("--timeout", type=float, help="Give up waiting after this many seconds.")
def wait(job_id: str, timeout: float | None) -> None:
    """Wait for a job to end (with a progress bar on a terminal), then show its results."""
    settings = _settings()
    progress = bar(job_id) if sys.stdout.isatty() and not settings.json else None
    with settings.client() as client:
        found = client.job(job_id)
        try:
            found.wait(timeout, progress=progress)
        except TimeoutError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(EXIT_JOB)
        status = found.status()
    _show(status, lambda: _print_results(job_id, status))


@job.command()
@click.argument("job_id", metavar="ID")
def cancel(job_id: str) -> None:
    """Cancel a job; prints the state it ends in."""
    with _settings().client() as client:
        state = client.job(job_id).cancel()
    _show({"Job": job_id, "State": state}, lambda: click.echo(state))


@job.command()
@click.argument("job_id", metavar="ID")
def log(job_id: str) -> None:
    """What a job's formulas printed."""
    with _settings().client() as client:
        text = client.job(job_id).log()
    _show({"Job": job_id, "Log": text}, lambda: click.echo(text, nl=not text.endswith("\n")))


@main.command()
@click.option("--state", type=click.Choice(STATES))
@click.option("--limit", type=click.IntRange(1, 1000), default=20, show_default=True)
def jobs(state: str | None, limit: int) -> None:
    """The newest jobs."""
    with _settings().client() as client:
        found = client.jobs(state, limit)
    _show(found, lambda: click.echo(table(found, ["Job", "State", "Submitted", "File"])))


def _result(client: Client, job_id: str, name: str) -> Result:
    results = client.job(job_id).results
    if name not in results:
        raise click.UsageError(
            f"job {job_id} has no result {name!r} (it has: {', '.join(results)})"
        )
    return results[name]


@main.command()
@click.argument("job_id", metavar="ID")
@click.argument("name")
@click.option("--limit", type=click.IntRange(1, 10_000), default=20, show_default=True)
@click.option("--offset", type=click.IntRange(0), default=0)
@click.option("--csv", "as_csv", is_flag=True, help="Print CSV instead of a table.")
def result(job_id: str, name: str, limit: int, offset: int, as_csv: bool) -> None:
    """Rows of one result of a job, fetched through the server."""
    with _settings().client() as client:
        found = _result(client, job_id, name)
        if found.kind == "Scalar":
            _show({"Name": name, "Value": found.value}, lambda: click.echo(found.value))
            return
        page = found.rows_page(offset, limit)
    if as_csv:
        records = page["Records"]
        writer = csv.DictWriter(sys.stdout, fieldnames=list(records[0]) if records else [])
        writer.writeheader()
        writer.writerows(records)
        return
    _show(page, lambda: click.echo(
        f"{table(page['Records'])}\n({len(page['Records'])} of {page['Rows']} rows from "
        f"{offset})"
    ))  # fmt: skip


@main.command()
@click.argument("job_id", metavar="ID")
@click.argument("name")
@click.option("-o", "--output", "out", help="Image file to write [default: JOB-NAME.png].")
def plot(job_id: str, name: str, out: str | None) -> None:
    """A chart of a result: a line over time, or bars for a grouped result."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise click.UsageError("plot needs matplotlib: pip install 'measuring[plot]'") from None
    with _settings().client() as client:
        found = _result(client, job_id, name)
        if found.kind == "Scalar":
            raise click.UsageError(f"{name} is a single value ({found.value}); nothing to plot")
        data = found.to_pandas()
    figure, axes = plt.subplots(figsize=(9, 4.5))
    import pandas as pd

    kind = "line" if isinstance(data.index, pd.DatetimeIndex) else "bar"
    data.plot(kind=kind, ax=axes, title=f"{name} (job {job_id})", legend=data.ndim > 1)
    figure.tight_layout()
    out = out or f"{job_id}-{name}.png"
    figure.savefig(out)
    _show({"Plot": out}, lambda: click.echo(f"wrote {out}"))


@main.command()
@click.option("--folder", help="Folder for the sample (default: a new temporary one).")
@click.option("--days", type=click.IntRange(1, 60), default=7, show_default=True,
              help="Days of readings to write.")  # fmt: skip
def demo(folder: str | None, days: int) -> None:
    """Write sample data and formulas, start a local server, run them, show the results."""
    from measuring import demo as the_demo

    arguments = ["--days", str(days)] + (["--folder", folder] if folder else [])
    sys.exit(the_demo.main(arguments))


if __name__ == "__main__":
    main()
