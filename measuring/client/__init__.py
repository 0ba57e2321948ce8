"""
A light client for measuring servers: plain sockets and JSON, for scripts and notebooks.

    from measuring.client import Client

    with Client("127.0.0.1", 8765) as server:
        job = server.run("/srv/data/plant", "time_series.parquet", "work.py", progress=True)
        job.results["mean_by_sensor"].to_pandas()

Importing this module imports neither Dask nor Twisted nor pyarrow; pandas is imported only by
``Result.to_pandas``, pyarrow only by it (when installed: it then fetches the result as an Arrow
stream, else as JSON pages), tqdm only for progress bars. Every server error is raised as a
``JobError`` subclass named after its Code, carrying ``code``, ``message``, ``job``, ``log`` and
the answer line itself.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from typing import Any

from measuring.client.progress import Bar, Progress, bar, close, reporter
from measuring.client.result import PAGE, Result
from measuring.wire import DEFAULT_HOST, DEFAULT_PORT, WAITING

__all__ = [
    "PAGE",
    "BadRequest",
    "Bar",
    "Busy",
    "Cancelled",
    "Client",
    "ClientError",
    "Internal",
    "Job",
    "JobError",
    "JobFailed",
    "MemoryLimit",
    "NotFound",
    "Result",
    "Timeout",
    "TooLarge",
    "Unauthorized",
    "bar",
    "error_from",
    "parse_address",
]  # fmt: skip

#: Bytes read at a time from an Arrow stream.
CHUNK = 1 << 20
#: Called with each request and each raw line answering it (for ``--json``).
Record = Callable[[dict[str, Any], bytes], None]


class ClientError(Exception):
    """The server cannot be reached, or does not speak the protocol."""


class JobError(Exception):
    """An error answer from the server: ``code`` (the protocol's Code), ``message``, ``job``."""

    code = "Error"

    def __init__(
        self,
        message: str,
        job: str | None = None,
        log: str | None = None,
        answer: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.job = job
        self.log = log
        #: The answer this error came in (an error answer, or the Status of a job that failed).
        self.answer = answer

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


def _error_class(code: str) -> type[JobError]:
    return type(code, (JobError,), {"code": code, "__doc__": f"The server answered {code}."})


BadRequest = _error_class("BadRequest")
TooLarge = _error_class("TooLarge")
Unauthorized = _error_class("Unauthorized")
Forbidden = _error_class("Forbidden")
NotFound = _error_class("NotFound")
Busy = _error_class("Busy")
Timeout = _error_class("Timeout")
Cancelled = _error_class("Cancelled")
MemoryLimit = _error_class("MemoryLimit")
JobFailed = _error_class("JobFailed")
Unavailable = _error_class("Unavailable")
Internal = _error_class("Internal")
ERRORS = {cls.code: cls for cls in JobError.__subclasses__()}


def error_from(answer: dict[str, Any]) -> JobError:
    """The JobError an error answer stands for."""
    error = answer.get("Error") or {}
    cls = ERRORS.get(str(error.get("Code")), JobError)
    return cls(str(error.get("Message", "")), answer.get("Job"), answer.get("Log"), answer)


def parse_address(address: str) -> tuple[str, int]:
    """``host:port``, ``host``, ``:port`` or ``[v6]:port`` as (host, port)."""
    text = address.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest.removeprefix(":")
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host, port = text, ""
    try:
        return host or DEFAULT_HOST, int(port) if port else DEFAULT_PORT
    except ValueError:
        raise ValueError(f"{address!r} is not HOST:PORT") from None


class Client:
    """One connection to a measuring server; reconnects by itself when it is lost."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        token: str | None = None,
        tls: bool | ssl.SSLContext = False,
        timeout: float = 60.0,
        cafile: str | None = None,
    ) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self._token = token
        if tls is True:
            tls = ssl.create_default_context(cafile=cafile)
        self._tls = tls or None
        self._socket: socket.socket | None = None
        self._file: Any = None
        self._ids = itertools.count(1)
        #: Called with each request and each raw line answering it, when set.
        self.record: Record | None = None

    @classmethod
    def from_address(cls, address: str, **options: Any) -> Client:
        """A client for ``host:port``."""
        host, port = parse_address(address)
        return cls(host, port, **options)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({self.host!r}, {self.port})"

    def close(self) -> None:
        if self._socket is not None:
            self._file.close()
            self._socket.close()
            self._socket = self._file = None

    # -- the wire

    def _connect(self) -> None:
        try:
            raw = socket.create_connection((self.host, self.port), timeout=self.timeout)
            if self._tls is not None:
                raw = self._tls.wrap_socket(raw, server_hostname=self.host)
        except (OSError, ssl.SSLError) as e:
            raise ClientError(f"cannot reach the server at {self.host}:{self.port}: {e}") from None
        self._socket, self._file = raw, raw.makefile("rwb")

    def _lines(self, request: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """Send ``request`` and yield the lines answering it (other requests' are dropped)."""
        if self._socket is None:
            self._connect()
        request_id = next(self._ids)
        request = {**request, "Id": request_id}
        if self._token is not None:
            request["Token"] = self._token
        try:
            self._file.write(json.dumps(request).encode("utf-8") + b"\n")
            self._file.flush()
            while True:
                line = self._file.readline()
                if not line:
                    raise ClientError("the server closed the connection")
                answer = json.loads(line)
                if answer.get("Id") != request_id:
                    self._skip_body(answer)  # a stream answering a request given up on
                    continue
                if self.record is not None:
                    self.record(request, line)
                yield answer
        except (OSError, ValueError) as e:
            self.close()
            raise ClientError(f"lost the server at {self.host}:{self.port}: {e}") from None
        except ClientError:
            self.close()
            raise

    def _skip_body(self, answer: dict[str, Any]) -> None:
        response = answer.get("Response")
        if isinstance(response, dict) and response.get("Format") == "arrow":
            self._body(int(response["Bytes"]), None)

    def _body(self, size: int, report: Progress | None) -> bytearray:
        """The ``size`` raw bytes that follow an answer line (an Arrow stream)."""
        data = bytearray(size)
        view, got = memoryview(data), 0
        try:
            while got < size:
                read = self._file.readinto(view[got : got + CHUNK])
                if not read:
                    raise ClientError("the server closed the connection in the middle of a result")
                got += read
                if report is not None:
                    report(got, size)
        except OSError as e:
            self.close()
            raise ClientError(f"lost the server at {self.host}:{self.port}: {e}") from None
        except BaseException:
            self.close()  # the rest of the stream is still coming: this connection is done
            raise
        return data

    def request(self, request: dict[str, Any], progress: Progress | None = None) -> dict[str, Any]:
        """Send one request; its final answer (Progress lines go to ``progress``)."""
        for answer in self._lines(request):
            if answer.get("Header") == "Progress":
                if progress is not None:
                    progress(answer["Done"], answer["Total"])
                continue
            if answer.get("Status") == "Error":
                raise error_from(answer)
            return answer
        raise ClientError("no answer")  # pragma: no cover - _lines never ends without one

    # -- what a user asks

    def status(self) -> dict[str, Any]:
        """The server's Status: State, Version, Uptime, Jobs, Workers, Limits..."""
        return self.info("Status")

    def info(self, name: str) -> dict[str, Any]:
        """Any Info request: "Status", "Dask process", "All process", "All statistic"."""
        response: dict[str, Any] = self.request({"Header": "Info", "Request": name})["Response"]
        return response

    def _dask(
        self, directory: str, base: str, file: str | None, code: str | None, **options: Any
    ) -> dict[str, Any]:
        fields: dict[str, Any] = {"Directory": directory, "Base": base, **formulas(file, code)}
        names = {"functions": "Functions", "output": "Output", "engine": "Engine",
                 "timeout": "Timeout", "index": "Index"}  # fmt: skip
        for name, value in options.items():
            if value is not None:
                fields[names[name]] = list(value) if name == "functions" else value
        return fields

    def submit(
        self,
        directory: str,
        base: str,
        file: str | None = None,
        functions: list[str] | None = None,
        output: str | None = None,
        timeout: float | None = None,
        engine: str | None = None,
        index: str | None = None,
        code: str | None = None,
    ) -> Job:
        """
        Queue a job and return at once (the job runs in the background). The formulas are
        ``file`` in ``directory`` on the server, or ``code``: a local file's path, or Python
        source, sent with the job. ``index`` names the column to index the dataset by
        (``"time"``), for resample and rolling windows.
        """
        fields = self._dask(directory, base, file, code, functions=functions, output=output,
                            timeout=timeout, engine=engine, index=index)  # fmt: skip
        answer = self.request({"Header": "Dask", "Request": {**fields, "Async": True}})
        return Job(self, answer["Job"])

    def run(
        self,
        directory: str,
        base: str,
        file: str | None = None,
        functions: list[str] | None = None,
        output: str | None = None,
        timeout: float | None = None,
        engine: str | None = None,
        progress: Progress | bool | None = None,
        accepted: Callable[[Job], None] | None = None,
        index: str | None = None,
        code: str | None = None,
    ) -> Job:
        """
        Run a job and return it once it has ended, done; raise its error otherwise.

        The formulas are ``file`` in ``directory`` on the server, or ``code``: a local file's
        path, or Python source, sent with the job. ``progress`` is a callable ``(done, total)``,
        or True for a progress bar; ``accepted`` is called with the Job as soon as the server has
        recorded it; ``index`` names the column to index the dataset by (``"time"``), for
        resample and rolling windows.
        """
        fields = self._dask(directory, base, file, code, functions=functions, output=output,
                            timeout=timeout, engine=engine, index=index)  # fmt: skip
        report = reporter(progress, fields.get("Name") or os.path.basename(fields["File"]))
        request = {"Header": "Dask", "Request": {**fields, "Async": True, "Progress": True}}
        lines = self._lines(request)
        answer = next(lines)
        if answer.get("Status") == "Error":
            raise error_from(answer)
        job = Job(self, answer["Job"])
        if accepted is not None:
            accepted(job)
        try:
            job._done(_follow(lines, report))
        except ClientError:
            return job.wait(progress=report)  # the connection broke; the job runs on
        except JobError as e:
            if e.log is None:  # a job stopped by the server: its answer has no log
                e.log = job._quiet_log()
            raise
        finally:
            if progress is True:
                close(report)
        return job

    def jobs(self, state: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """The newest jobs on record (in ``state``, when given)."""
        request: dict[str, Any] = {"Header": "Job", "Request": "List", "Limit": limit}
        if state is not None:
            request["State"] = state
        jobs: list[dict[str, Any]] = self.request(request)["Response"]["Jobs"]
        return jobs

    def job(self, job: str) -> Job:
        """A job already on record, by its id."""
        return Job(self, job)

    def _job_request(self, name: str, job: str, **fields: Any) -> dict[str, Any]:
        answer = self.request({"Header": "Job", "Request": name, "Job": job, **fields})
        response: dict[str, Any] = answer["Response"]
        return response


def formulas(file: str | None, code: str | None) -> dict[str, str]:
    """
    The fields naming a job's formulas: ``File`` (on the server), or ``Code`` and ``Name`` when
    ``code`` is the path of a local file (named after it) or Python source (``formulas.py``).
    """
    if (file is None) == (code is None):
        raise ValueError("give the formulas either as file (on the server) or as code, not both")
    if code is None:
        return {"File": str(file)}
    if "\n" not in code and os.path.isfile(code):
        with open(code, encoding="utf-8") as f:
            return {"Code": f.read(), "Name": os.path.basename(code)}
    return {"Code": code, "Name": "formulas.py"}


def _follow(lines: Iterator[dict[str, Any]], report: Progress | None) -> dict[str, Any]:
    """
    Read a job's Progress lines and then its answer; the Response, or its error raised. The
    progress ends at done == total when the job is done; otherwise it stays where the job stopped.
    """
    total = 0
    for answer in lines:
        if answer.get("Header") == "Progress":
            total = answer["Total"]
            if report is not None:
                report(answer["Done"], total)
        elif answer.get("Status") == "Error":
            raise error_from(answer)
        else:
            if report is not None:
                report(total, total)
            response: dict[str, Any] = answer["Response"]
            return response
    raise ClientError("the server sent no answer")


class Job:
    """A job on a server: ``id``, ``state``, ``wait()``, ``cancel()``, ``log()``, ``results``."""

    def __init__(self, client: Client, job: str) -> None:
        self._client = client
        self.id = job
        self._status: dict[str, Any] | None = None

    def __repr__(self) -> str:
        state = self._status["State"] if self._status else "?"
        return f"<Job {self.id} {state}>"

    def _done(self, response: dict[str, Any]) -> None:
        self._status = {"State": "done", **response}

    def status(self) -> dict[str, Any]:
        """The job's Status answer, asked now."""
        self._status = self._client._job_request("Status", self.id)
        return self._status

    @property
    def state(self) -> str:
        """queued, running, done, failed, cancelled or timeout (asked of the server now)."""
        return str(self.status()["State"])

    def wait(self, timeout: float | None = None, progress: Progress | bool | None = None) -> Job:
        """
        Wait until the job has ended; return it when done, raise its error otherwise.

        Raises TimeoutError (Python's) when ``timeout`` seconds pass first.
        """
        report = reporter(progress, self.id)
        try:
            return self._wait(timeout, report)
        finally:
            if progress is True:
                close(report)

    def _wait(self, timeout: float | None, report: Progress | None) -> Job:
        deadline = None if timeout is None else time.monotonic() + timeout
        pause, total = 0.1, 0
        while True:
            status = self.status()
            if status.get("Progress") and report is not None:
                total = status["Progress"]["Total"]
                report(status["Progress"]["Done"], total)
            if status["State"] == "done":
                if report is not None:
                    report(total, total)
                return self
            if status["State"] not in WAITING:
                raise self.error(status)
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {self.id} is still {status['State']} after {timeout} s")
            time.sleep(pause)
            pause = min(pause * 1.5, 2.0)

    def error(self, status: dict[str, Any]) -> JobError:
        """The error a job that ended without results (its ``status``) stands for, with its log."""
        error = status.get("Error") or {"Code": "JobFailed", "Message": status["State"]}
        found = error_from({"Error": error, "Job": self.id, "Log": self._quiet_log()})
        found.answer = {"Header": "Job", "Request": "Status", "Job": self.id, "Response": status}
        return found

    def cancel(self) -> str:
        """Cancel the job; returns the state it ends in."""
        state: str = self._client._job_request("Cancel", self.id)["State"]
        return state

    def result_page(self, name: str, offset: int = 0, limit: int = 1000) -> dict[str, Any]:
        """One page of the result ``name`` as JSON records (for a single value, its Value)."""
        return self._client._job_request("Result", self.id, Name=name, Offset=offset, Limit=limit)

    def _quiet_log(self) -> str | None:
        """The log, asked without recording the answer; None when it cannot be had."""
        record, self._client.record = self._client.record, None
        try:
            return self.log()
        except (JobError, ClientError):
            return None
        finally:
            self._client.record = record

    def log(self) -> str:
        """What the job's formulas printed (so far)."""
        log: str = self._client._job_request("Log", self.id)["Log"]
        return log

    @property
    def results(self) -> dict[str, Result]:
        """The job's results by formula name (the job must be done)."""
        status = self._status if self._status and "Results" in self._status else self.status()
        if "Results" not in status:
            raise NotFound(f"job {self.id} has no results: it is {status['State']}", self.id)
        directory = status.get("Directory") or self.status().get("Directory")
        return {
            name: Result(self._client, self.id, name, entry, directory)
            for name, entry in status["Results"].items()
        }
