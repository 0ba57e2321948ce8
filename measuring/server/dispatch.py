"""
Requests to answers: validate each request, route it by ``Header``, turn every error into
``{"Code", "Message"}``.

``Dispatcher`` knows nothing about connections: it takes a request object and returns a Deferred
answer. ``_error_answer`` is the one place where an error becomes an answer. What a request names
on disk is checked (``submission``) through the blocking-call runner, never on the reactor.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import replace
from typing import Any, Protocol, TypeVar

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from measuring import wire
from measuring.errors import BadRequest, Internal, MeasuringError, Unauthorized
from measuring.server import submission
from measuring.server.access import Tokens
from measuring.server.framing import json_type
from measuring.server.jobs.records import Job, JobSpec
from measuring.server.paths import JobPaths
from measuring.server.protocol import Answer, Notify, Streamed
from measuring.server.stats import Stats
from measuring.server.threads import Runner, Synchronous
from measuring.server.throttle import Throttle
from measuring.wire import INFO_REQUESTS, JOB_REQUESTS, STATES

KEYS = {
    "Info": ("Header", "Request", "Id", "Token"),
    "Dask": ("Header", "Request", "Id", "Token"),
    "Job": ("Header", "Request", "Id", "Token", "Job", "State", "Limit", "Name", "Offset",
            "Format"),
}  # fmt: skip
DASK_FIELDS = (
    "Directory", "Base", "File", "Code", "Name", "Functions", "Output", "Engine", "Index",
    "Async", "Timeout", "Progress",
)  # fmt: skip
DEFAULT_LIST, MAX_LIST = 100, 1000
DEFAULT_ROWS, MAX_ROWS = 1000, 10_000
PATH_FIELDS = ("Directory", "Base")
#: The Name of formulas sent as Code: a file name, as a formula file would have.
CODE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}\.py")
DEFAULT_CODE_NAME = "formulas.py"
#: The kind of warning a request without a valid token logs (``throttle``).
UNAUTHORIZED_WARNINGS = "requests without a valid token"


def _one_of(values: tuple[str, ...] | list[str]) -> str:
    return ", ".join(f'"{value}"' for value in values)


def _only(fields: dict[str, Any], accepted: tuple[str, ...], what: str) -> None:
    unknown = [key for key in fields if key not in accepted]
    if unknown:
        raise BadRequest(
            f"{what} has an unknown key {unknown[0]!r} (accepted: {_one_of(accepted)})"
        )


def _choice(fields: dict[str, Any], name: str, choices: tuple[str, ...], default: str) -> str:
    value = fields.get(name, default)
    if value not in choices:
        raise BadRequest(f'"{name}" must be one of {_one_of(choices)}, not {value!r}')
    return str(value)


def _functions(value: object) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise BadRequest('"Functions" must be a non-empty array of formula names (strings)')
    if len(set(value)) != len(value):
        raise BadRequest('"Functions" names a formula more than once')
    return tuple(value)


def _index(value: object) -> str | None:
    """The column to index the dataset by (whether it exists, the worker finds out)."""
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise BadRequest(
            f'"Index" must be the name of a column of the dataset, such as "time", not '
            f"{json_type(value) if not isinstance(value, str) else 'an empty string'}"
        )
    return value


Check = Callable[
    [tuple[str, ...], str, str, str, tuple[str, ...] | None, tuple[str, ...]], JobPaths
]


Counted = TypeVar("Counted", dict[str, Any], Streamed)


class Info(Protocol):
    """What answers Info requests (``measuring.server.info.InfoService``)."""

    def answer(self, request: str) -> defer.Deferred[dict[str, Any]]: ...


class Jobs(Protocol):
    """What runs jobs (``measuring.server.jobs.scheduler.Scheduler``)."""

    def submit(self, spec: JobSpec) -> defer.Deferred[Job]: ...

    def cancel(self, job: str) -> defer.Deferred[str]: ...


class Queries(Protocol):
    """What answers for jobs (``measuring.server.jobs.queries.JobQueries``)."""

    def status(self, job: str) -> defer.Deferred[dict[str, Any]]: ...

    def log(self, job: str) -> defer.Deferred[str]: ...

    def recent(self, state: str | None, limit: int) -> defer.Deferred[list[dict[str, Any]]]: ...

    def result(
        self, job: str, name: str, offset: int, limit: int | None, form: str = ...
    ) -> defer.Deferred[Any]: ...


def _formulas(fields: dict[str, Any]) -> tuple[str | None, str | None, str | None]:
    """
    Where a Dask request's formulas are: ``(File, None, None)``, or ``(None, Code, Name)`` for
    formulas sent with the request (their size is bounded by ``--max-request-bytes``).
    """
    has_file, has_code = "File" in fields, "Code" in fields
    if not has_file and not has_code:
        raise BadRequest(
            'the Dask Request has no "File" (a formula file in Directory), nor "Code" (the '
            "formulas' Python source)"
        )
    if has_file and has_code:
        raise BadRequest('the Dask Request has both "File" and "Code": send one of them')
    if has_file:
        if "Name" in fields:
            raise BadRequest('"Name" names formulas sent as "Code"; a "File" has its own name')
        if not isinstance(fields["File"], str):
            raise BadRequest(f'"File" must be a string, not {json_type(fields["File"])}')
        return fields["File"], None, None
    code, name = fields["Code"], fields.get("Name", DEFAULT_CODE_NAME)
    if not isinstance(code, str):
        raise BadRequest(f'"Code" must be a string of Python source, not {json_type(code)}')
    if "\0" in code:
        raise BadRequest('"Code" must not contain a NUL character')
    if not isinstance(name, str) or not CODE_NAME.fullmatch(name):
        raise BadRequest(
            f'"Name" must be a file name ending in .py (letters, digits, _ . -), not {name!r}'
        )
    return None, code, name


def _flag(fields: dict[str, Any], name: str) -> bool:
    value = fields.get(name, False)
    if not isinstance(value, bool):
        raise BadRequest(f'"{name}" must be true or false, not {json_type(value)}')
    return value


def _number(fields: dict[str, Any], name: str, low: float, high: float | None, default: Any) -> Any:
    """
    A number from ``low`` to ``high`` (no upper bound for None), whole when ``low`` is an int;
    ``default`` when absent.
    """
    value = fields.get(name, default)
    whole = isinstance(low, int)
    if value is default:
        return value
    if (
        isinstance(value, bool)
        or not isinstance(value, int if whole else int | float)
        or not low <= value <= (high if high is not None else value)
    ):
        what = "a whole number" if whole else "a number"
        bounds = f"from {low} to {high}" if high is not None else f"of at least {low}"
        raise BadRequest(f'"{name}" must be {what} {bounds}, not {value!r}')
    return value


def _text(fields: dict[str, Any], name: str, what: str) -> str:
    value = fields.get(name)
    if not isinstance(value, str) or not value:
        raise BadRequest(f'{what} needs "{name}": a string, not {json_type(value)}')
    return value


class Dispatcher:
    """Validates requests, routes them to Info or the jobs, and shapes every answer."""

    _log = Logger()

    def __init__(
        self,
        info: Info,
        jobs: Jobs,
        queries: Queries,
        stats: Stats,
        data_roots: tuple[str, ...],
        private: tuple[str, ...] = (),
        tokens: Tokens | None = None,
        blocking: Runner | None = None,
        check: Check = submission.check_job,
        throttle: Throttle | None = None,
    ) -> None:
        """
        ``blocking`` runs the checks of a Dask request's files (``check``, which may block on a
        slow disk) off the reactor; synchronously when not given, for tests.
        """
        self._info = info
        self._jobs = jobs
        self._queries = queries
        self._stats = stats
        self._data_roots = data_roots
        self._private = private
        self._tokens = tokens or Tokens()
        # Anyone who can connect can send requests without a token: their warnings are held to
        # a rate (the counters of All statistic count every one).
        self._throttle = throttle or Throttle(None)
        self._blocking = blocking or Synchronous()
        self._check = check
        self._routes: dict[str, Callable[[dict[str, Any], Notify], defer.Deferred[Any]]] = {
            "Info": self._info_request,
            "Dask": self._dask_request,
            "Job": self._job_request,
        }

    def handle(
        self, request: dict[str, Any], notify: Notify, client: str = "a client"
    ) -> defer.Deferred[Answer]:
        """The answer to one request; never fails (errors become error answers)."""
        header = request.get("Header")
        if not self._tokens.valid(request.get("Token")):
            self._throttle.warn(
                UNAUTHORIZED_WARNINGS,
                "refused a request without a valid token from {client}",
                client=client,
            )
            return defer.succeed(
                self._counted(
                    self._error_answer(
                        Unauthorized('this server needs a valid "Token" in every request'), header
                    )
                )
            )
        answer = defer.maybeDeferred(self._route, header, request, notify)
        return answer.addErrback(self._failed, header).addCallback(self._counted)

    def refuse(self, error: MeasuringError) -> Answer:
        """The answer to something that could not be read as a request."""
        return self._counted(self._error_answer(error, None))

    def _counted(self, answer: Counted) -> Counted:
        """Count ``answer`` (a line, or the line of a streamed one) and pass it on."""
        self._stats.answered(answer.answer if isinstance(answer, Streamed) else answer)
        return answer

    def _route(
        self, header: object, request: dict[str, Any], notify: Notify
    ) -> defer.Deferred[Answer]:
        if not isinstance(header, str) or header not in self._routes:
            self._stats.request("Other")
            what = f"an unknown Header {header!r}" if "Header" in request else 'no "Header"'
            raise BadRequest(
                f"the request has {what}; it must be one of {_one_of(list(self._routes))}"
            )
        self._stats.request(header)
        _only(request, KEYS[header], f"the {header} request")
        return self._routes[header](request, notify)

    def _failed(self, reason: Failure, header: object) -> Answer:
        error = reason.value
        if not isinstance(error, MeasuringError):
            self._log.failure("request with Header {header!r} failed", reason, header=header)
            error = Internal("the server failed answering this request; the details are in its log")
        return self._error_answer(error, header)

    def _error_answer(self, error: MeasuringError, header: object, **fields: Any) -> Answer:
        """The one place an error becomes an answer; ``fields`` (``Job``, ``Log``) go with it."""
        self._stats.error(error.code)
        return {
            "Header": header if isinstance(header, str) else "Error",
            "Status": "Error",
            **fields,
            "Error": error.to_json(),
        }

    def _job_failed(self, reason: Failure, header: str, job: str) -> Answer | Failure:
        """An error about one job, answered with the job's id."""
        if isinstance(reason.value, MeasuringError):
            return self._error_answer(reason.value, header, Job=job)
        return reason

    def _info_request(self, request: dict[str, Any], notify: Notify) -> defer.Deferred[Answer]:
        name = request.get("Request")
        if not isinstance(name, str) or name not in INFO_REQUESTS:
            raise BadRequest(
                f'an Info "Request" must be one of {_one_of(INFO_REQUESTS)}, not {name!r}'
            )
        return self._info.answer(name).addCallback(
            lambda response: {
                "Header": "Info",
                "Request": name,
                "Status": "OK",
                "Response": response,
            }
        )

    def _dask_request(self, request: dict[str, Any], notify: Notify) -> defer.Deferred[Answer]:
        fields = request.get("Request")
        checked = self.dask_spec(fields)  # checks Async and Progress too
        assert isinstance(fields, dict)
        background, progress = fields.get("Async", False), fields.get("Progress", False)

        def submitted(job: Job) -> Answer | defer.Deferred[Answer]:
            if progress:
                job.listen(
                    lambda done, total: notify(
                        {"Header": "Progress", "Job": job.id, "Done": done, "Total": total}
                    )
                )
            final = job.when_finished().addCallbacks(
                self._ended_answer, self._job_failed, errbackArgs=("Dask", job.id)
            )
            accepted = {"Header": "Dask", "Status": "Accepted", "Job": job.id}
            if not background:
                return final
            if progress:
                # Accepted now; the job's own answer, when it ends, is this request's last line.
                notify(accepted)
                return final
            final.addErrback(lambda _: None)
            return accepted

        return checked.addCallback(self._jobs.submit).addCallback(submitted)

    def _ended_answer(self, job: Job) -> Answer:
        """The answer to a Dask request whose job has ended: its Response, or its error."""
        if job.error is not None or job.response is None:
            error = job.error or Internal(f"job {job.id} ended without results")
            return self._error_answer(error, "Dask", Job=job.id, Log=job.log)
        return {"Header": "Dask", "Status": "OK", "Job": job.id, "Response": job.response}

    def dask_spec(self, fields: object) -> defer.Deferred[JobSpec]:
        """
        Check the ``Request`` object of a Dask request; then, in the blocking-call runner, resolve
        its paths and check its files. Raises at once for a bad field; the Deferred fails with
        the error a file check found.
        """
        if not isinstance(fields, dict):
            raise BadRequest(
                'a Dask request needs "Request": {"Directory": ..., "Base": ..., "File": ...}, '
                f"not {json_type(fields)}"
            )
        _only(fields, DASK_FIELDS, "the Dask Request")
        for name in PATH_FIELDS:
            if name not in fields:
                raise BadRequest(f'the Dask Request has no "{name}"')
            if not isinstance(fields[name], str):
                raise BadRequest(f'"{name}" must be a string, not {json_type(fields[name])}')
        file, code, code_name = _formulas(fields)
        functions = _functions(fields.get("Functions"))
        output = _choice(fields, "Output", tuple(wire.OUTPUTS), "parquet")
        engine = _choice(fields, "Engine", wire.ENGINES, "pyarrow")
        timeout = _number(fields, "Timeout", 0.001, None, None)
        index = _index(fields.get("Index"))
        _flag(fields, "Async")
        _flag(fields, "Progress")
        checked = self._blocking.run(
            self._check,
            self._data_roots,
            fields["Directory"],
            fields["Base"],
            file,
            functions,
            self._private,
        )
        if code is not None and code_name is not None:
            checked.addCallback(self._check_code, code, code_name, functions)
        return checked.addCallback(
            lambda paths: JobSpec(
                paths=replace(paths, source=None),
                functions=functions,
                output=output,
                engine=engine,
                timeout=timeout,
                index=index,
                # A formula file on object storage travels as Code, read at the check.
                code=code if paths.source is None else paths.source,
                name=code_name if paths.source is None else str(paths.file).rpartition("/")[2],
            )
        )  # fmt: skip

    def _check_code(
        self, paths: JobPaths, code: str, name: str, functions: tuple[str, ...] | None
    ) -> defer.Deferred[JobPaths]:
        """Check formulas sent as Code as a formula file is checked (in the blocking runner)."""
        checked = self._blocking.run(submission.check_code, code, name, functions)
        return checked.addCallback(lambda _: paths)

    def _job_request(self, request: dict[str, Any], notify: Notify) -> defer.Deferred[Any]:
        name = request.get("Request")
        if not isinstance(name, str) or name not in JOB_REQUESTS:
            raise BadRequest(
                f'a Job "Request" must be one of {_one_of(JOB_REQUESTS)}, not {name!r}'
            )

        def answer(response: Any, **extra: Any) -> Answer | Streamed:
            body = None
            if isinstance(response, tuple):  # an Arrow stream: the fields, and the bytes after
                response, body = response
            line = {"Header": "Job", "Request": name, "Status": "OK", **extra, "Response": response}
            return line if body is None else Streamed(line, body, response["Bytes"])

        if name == "List":
            state = request.get("State")
            if state is not None and state not in STATES:
                raise BadRequest(f'"State" must be one of {_one_of(STATES)}, not {state!r}')
            limit = _number(request, "Limit", 1, MAX_LIST, DEFAULT_LIST)
            return self._queries.recent(state, limit).addCallback(
                lambda jobs: answer({"Jobs": jobs})
            )
        job = _text(request, "Job", f"a Job {name} request")
        if name == "Status":
            found = self._queries.status(job)
        elif name == "Cancel":
            found = self._jobs.cancel(job).addCallback(lambda state: {"State": state})
        elif name == "Log":
            found = self._queries.log(job).addCallback(lambda log: {"Log": log})
        else:
            result = _text(request, "Name", "a Job Result request")
            form = _choice(request, "Format", wire.RESULT_FORMATS, "json")
            offset = _number(request, "Offset", 0, None, 0)
            if form == "arrow":  # the whole result, or as many rows as asked for
                limit = _number(request, "Limit", 1, None, None)
            else:
                limit = _number(request, "Limit", 1, MAX_ROWS, DEFAULT_ROWS)
            found = self._queries.result(job, result, offset, limit, form)

        return found.addCallbacks(
            lambda response: answer(response, Job=job), self._job_failed, errbackArgs=("Job", job)
        )
