"""
``measuring-client``: the command line of ``measuring.client``.

Exit codes: 0 done; 1 the job failed, timed out, was cancelled or refused (Busy); 2 the command or
what it names is wrong (usage, BadRequest, Forbidden, NotFound); 3 the server cannot be reached or
talked to. ``run``, ``job wait`` and ``job status`` exit with the code of the job's end state.
Every error found while running is one line on stderr, ``error: ...`` (with ``--debug``, the
traceback too); only a wrong command line gets click's usage help. ``--json`` prints the server's
answer lines on stdout exactly as it sent them, errors included. Built on click, with tqdm's bars
on a terminal (``show`` prints everything else for people).
"""

from __future__ import annotations

import csv
import json
import os
import sys
import traceback
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

import click

from measuring.client import Client, ClientError, JobError, NotFound, show
from measuring.wire import ENGINES, FINISHED, INFO_REQUESTS, OUTPUTS, STATES, token_lines

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
#: Errors after which the job's log is worth a look (when it holds something).
_LOGGED = ("JobFailed", "Timeout", "MemoryLimit")
INTERRUPTED = 130


def exit_code(code: str) -> int:
    """The exit code for an error Code of the protocol."""
    return _EXITS.get(code, EXIT_SERVER)


class Refused(click.ClickException):
    """An error the client finds itself while running a command: one line, exit code 2."""

    exit_code = EXIT_USAGE

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"error: {self.message}", err=True)


@dataclass
class Settings:
    server: str
    token_file: str | None
    tls: bool
    cafile: str | None
    json: bool
    debug: bool

    def token(self) -> str | None:
        """The token of --token-file, if one is given."""
        if not self.token_file:
            return None
        try:
            with open(self.token_file, encoding="utf-8") as f:
                return next(iter(token_lines(f.read().splitlines())), None)
        except OSError as e:
            raise Refused(f"cannot read --token-file {self.token_file}: {e.strerror}") from None

    def client(self) -> Client:
        """A client for ``--server``; with ``--json`` it prints every answer line it gets."""
        try:
            client = Client.from_address(
                self.server, token=self.token(), tls=self.tls, cafile=self.cafile, timeout=60.0
            )
        except ValueError as e:
            raise click.UsageError(str(e)) from None
        if self.json:
            client.record = print_line
        return client

    @property
    def bars(self) -> bool:
        """Progress bars: on a terminal, not with --json."""
        return sys.stderr.isatty() and not self.json


def print_line(request: dict[str, Any], line: bytes) -> None:
    """An answer line on stdout, byte for byte as the server sent it."""
    out = sys.stdout.buffer
    out.write(line if line.endswith(b"\n") else line + b"\n")
    out.flush()


class Commands(click.Group):
    """Turns client errors into one line and the exit code that says what went wrong."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (JobError, ClientError) as e:
            settings = ctx.find_object(Settings)
            if settings is not None and settings.debug:
                traceback.print_exc()
            if not isinstance(e, JobError):
                click.echo(f"error: {e}", err=True)
                ctx.exit(EXIT_SERVER)
            click.echo(f"error: {e.code}: {e.message}", err=True)
            if e.job and e.code in _LOGGED and (e.log or "").strip():
                click.echo(f"what it printed: measuring-client job log {e.job}", err=True)
            ctx.exit(exit_code(e.code))


def _settings() -> Settings:
    return click.get_current_context().ensure_object(Settings)


def _human(show_it: Callable[[], None]) -> None:
    """Print for people; with --json the answer lines are printed already."""
    if not _settings().json:
        show_it()


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
@click.option(
    "--json", "as_json", is_flag=True, help="Print the server's answer lines as it sent them."
)
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
            f"up {show.duration(answer['Uptime'])}\n"
            f"jobs: {jobs['Running']} running, {jobs['Queued']} queued\n"
            f"workers: {workers['Busy']} of {workers['Size']} busy, template {workers['Template']}"
        )

    _human(human)


@main.command()
@click.option("--open", "open_browser", is_flag=True, help="Open it in the web browser too.")
def dashboard(open_browser: bool) -> None:
    """
    The address of the server's dashboard (--http), with your token: opening it logs the
    browser in.
    """
    settings = _settings()
    with settings.client() as client:
        where = client.status().get("Dashboard")
        host = client.host
    if not where:
        click.echo(
            f"error: the server at {settings.server} serves no dashboard: start it with "
            f"--http ENDPOINT (e.g. --http tcp:8766:interface=127.0.0.1)",
            err=True,
        )
        click.get_current_context().exit(EXIT_USAGE)
    url = dashboard_url(str(where), host, settings.token())
    click.echo(url)
    if open_browser:
        import webbrowser

        webbrowser.open(url)


def dashboard_url(where: str, host: str, token: str | None) -> str:
    """
    The dashboard's address as this client reaches it: the server's own address, with the
    client's host when the server listens on every interface, and ``?token=`` when there is one.
    """
    parts = urllib.parse.urlsplit(where)
    if parts.hostname in ("0.0.0.0", "::"):
        name = f"[{host}]" if ":" in host else host
        parts = parts._replace(netloc=f"{name}:{parts.port}")
    query = urllib.parse.urlencode({"token": token}) if token else ""
    return urllib.parse.urlunsplit(parts._replace(query=query))


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
    _human(lambda: click.echo(json.dumps(answer, indent=2, ensure_ascii=False)))


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
    click.option(
        "--index",
        metavar="COLUMN",
        help="Index the data by this column (e.g. time), for resample and rolling windows.",
    ),
    click.option("--timeout", type=float, help="Longest the job may run, in seconds."),
]


def _job_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The arguments and options of ``run`` and ``submit``."""
    for option in reversed(_JOB_OPTIONS):
        command = option(command)
    return command


def _interrupted(job: str | None) -> None:
    """Ctrl-C while waiting for a job: it runs on; say how to stop it."""
    if job is not None:
        click.echo(
            f"interrupted: job {job} goes on (measuring-client job cancel {job} stops it)",
            err=True,
        )
    sys.exit(INTERRUPTED)


@main.command()
@_job_options
def run(directory: str, base: str, file: str | None, code: str | None,
        functions: tuple[str, ...], output: str | None, engine: str | None, index: str | None,
        timeout: float | None) -> None:  # fmt: skip
    """Run the formulas of FILE (or --code) over BASE in DIRECTORY, wait, show the results."""
    settings = _settings()
    _formulas(file, code)
    started: list[str] = []

    def accepted(job: Any) -> None:
        started.append(job.id)
        if sys.stderr.isatty() and not settings.json:
            click.echo(f"job {job.id}", err=True)

    with settings.client() as client:
        try:
            job = client.run(_local(directory), base, file, list(functions) or None, output,
                             timeout, engine, progress=settings.bars or None,
                             accepted=accepted, index=index, code=code)  # fmt: skip
        except KeyboardInterrupt:
            _interrupted(started[0] if started else None)
        if not settings.json:
            status = job.status()
            show.results(job.id, status)


def _formulas(file: str | None, code: str | None) -> None:
    """A job names its formulas by FILE on the server or a local --code file, not both."""
    if (file is None) == (code is None):
        raise click.UsageError(
            "give FILE (a formula file in DIRECTORY on the server) or --code PATH (a local "
            "formula file, sent with the job), not both"
        )


def _local(directory: str) -> str:
    """A folder that exists here is sent as an absolute path (the server may run here too)."""
    return os.path.abspath(directory) if os.path.isdir(directory) else directory


@main.command()
@_job_options
def submit(directory: str, base: str, file: str | None, code: str | None,
           functions: tuple[str, ...], output: str | None, engine: str | None,
           index: str | None, timeout: float | None) -> None:  # fmt: skip
    """Queue a job and print its id."""
    _formulas(file, code)
    with _settings().client() as client:
        job = client.submit(
            _local(directory),
            base,
            file,
            list(functions) or None,
            output,
            timeout,
            engine,
            index,
            code,
        )
    _human(lambda: click.echo(job.id))


@main.group(cls=Commands)
def job() -> None:
    """Follow one job: status, wait, cancel, log."""


def _exit_for(status: dict[str, Any]) -> None:
    """Exit as a job that ended this way: 0 done (or not ended yet), else its error's code."""
    if status["State"] in FINISHED and status["State"] != "done":
        code = (status.get("Error") or {}).get("Code", "JobFailed")
        sys.exit(exit_code(code))


@job.command(name="status")
@click.argument("job_id", metavar="ID")
def job_status(job_id: str) -> None:
    """A job's state, times, and results or error; exits as ``job wait`` would once it ended."""
    with _settings().client() as client:
        answer = client.job(job_id).status()
    _human(lambda: show.job_status(job_id, answer))
    _exit_for(answer)


@job.command()
@click.argument("job_id", metavar="ID")
@click.option("--timeout", type=float, help="Give up waiting after this many seconds.")
def wait(job_id: str, timeout: float | None) -> None:
    """Wait for a job to end (with a progress bar on a terminal), then show its results."""
    settings = _settings()
    with settings.client() as client:
        found = client.job(job_id)
        record, client.record = client.record, None  # with --json, only the last Status
        failure: JobError | None = None
        waited = True
        try:
            found.wait(timeout, progress=settings.bars or None)
        except JobError as e:
            failure = e
        except TimeoutError as e:
            click.echo(f"error: {e}", err=True)
            waited = False
        except KeyboardInterrupt:
            _interrupted(job_id)
        finally:
            client.record = record
        status = found.status()
    if failure is not None:
        raise failure
    if not waited:
        sys.exit(EXIT_JOB)
    _human(lambda: show.results(job_id, status))


@job.command()
@click.argument("job_id", metavar="ID")
def cancel(job_id: str) -> None:
    """Cancel a job; prints the state it ends in."""
    with _settings().client() as client:
        state = client.job(job_id).cancel()
    _human(lambda: click.echo(state))


@job.command()
@click.argument("job_id", metavar="ID")
def log(job_id: str) -> None:
    """What a job's formulas printed."""
    with _settings().client() as client:
        text = client.job(job_id).log()
    _human(lambda: click.echo(text, nl=not text.endswith("\n")))


@main.command()
@click.option("--state", type=click.Choice(STATES))
@click.option("--limit", type=click.IntRange(1, 1000), default=20, show_default=True)
def jobs(state: str | None, limit: int) -> None:
    """The newest jobs: where, what, and why those that failed did."""
    with _settings().client() as client:
        found = client.jobs(state, limit)
    _human(lambda: click.echo(show.jobs(found)))


@main.command()
@click.argument("job_id", metavar="ID")
@click.argument("name")
@click.option("--limit", type=click.IntRange(1, 10_000), default=20, show_default=True)
@click.option("--offset", type=click.IntRange(0), default=0)
@click.option("--csv", "as_csv", is_flag=True, help="Print CSV instead of a table.")
def result(job_id: str, name: str, limit: int, offset: int, as_csv: bool) -> None:
    """Rows of one result of a job, fetched through the server."""
    if as_csv and _settings().json:
        raise click.UsageError("--csv and --json do not go together")
    with _settings().client() as client:
        page = client.job(job_id).result_page(name, offset, limit)
    if _settings().json:
        return
    if page["Kind"] == "Scalar":
        click.echo(page["Value"])
    elif as_csv:
        records = page["Records"]
        writer = csv.DictWriter(sys.stdout, fieldnames=list(records[0]) if records else [])
        writer.writeheader()
        writer.writerows(records)
    else:
        click.echo(
            f"{show.table(page['Records'])}\n({len(page['Records'])} of {page['Rows']} rows "
            f"from {offset})"
        )


@main.command()
@click.argument("job_id", metavar="ID")
@click.argument("name")
@click.option("-o", "--output", "out", help="Image file to write [default: JOB-NAME.png].")
def plot(job_id: str, name: str, out: str | None) -> None:
    """A chart of a result: lines over time, or bars for a grouped result; a panel per column."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise Refused("plot needs matplotlib: pip install 'measuring[plot]'") from None
    with _settings().client() as client:
        results = client.job(job_id).results
        if name not in results:
            raise NotFound(
                f"job {job_id} has no result {name!r} (its results: {', '.join(results)})", job_id
            )
        found = results[name]
        if found.kind == "Scalar":
            raise Refused(f"{name} is a single value ({found.value}); there is nothing to plot")
        data = found.to_pandas(progress=None if _settings().bars else False)
    out = out or f"{job_id}-{name}.png"
    try:
        show.plot(data, f"{name} (job {job_id})", out)
    except ValueError as e:
        raise Refused(f"cannot plot {name}: {e}") from None
    _human(lambda: click.echo(f"wrote {out}"))


@main.command()
@click.option("--folder", help="Folder for the sample (default: a new temporary one).")
@click.option("--days", type=click.IntRange(1, 60), default=7, show_default=True,
              help="Days of readings to write.")  # fmt: skip
def demo(folder: str | None, days: int) -> None:
    """Write sample data and formulas, start a local server, run them, show the results."""
    from measuring import demo as the_demo

    arguments = ["--days", str(days)] + (["--folder", folder] if folder else [])
    sys.exit(the_demo.main(arguments + ["--json"] * _settings().json))


if __name__ == "__main__":
    main()
