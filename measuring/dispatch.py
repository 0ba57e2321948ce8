"""
Requests to answers: validate each request, route it by ``Header``, turn every error into
``{"Code", "Message"}``.

``Dispatcher`` knows nothing about connections: it takes a request object and returns a Deferred
answer. ``_error_answer`` is the one place where an error becomes an answer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from measuring import loader
from measuring.errors import BadRequest, Internal, MeasuringError
from measuring.info import REQUESTS
from measuring.jobs import Job, JobSpec
from measuring.protocol import Answer, Notify, json_type
from measuring.stats import Stats

TOP_LEVEL = ("Header", "Request", "Id")
DASK_FIELDS = ("Directory", "Base", "File", "Functions", "Output", "Engine")
PATH_FIELDS = ("Directory", "Base", "File")


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


class Info(Protocol):
    """What answers Info requests (``measuring.info.InfoService``)."""

    def answer(self, request: str) -> defer.Deferred[dict[str, Any]]: ...


class Jobs(Protocol):
    """What runs jobs (``measuring.jobs.JobManager``)."""

    def submit(self, spec: JobSpec) -> Job: ...


class Dispatcher:
    """Validates requests, routes them to Info or the jobs, and shapes every answer."""

    _log = Logger()

    def __init__(self, info: Info, jobs: Jobs, stats: Stats, data_roots: tuple[str, ...]) -> None:
        self._info = info
        self._jobs = jobs
        self._stats = stats
        self._data_roots = data_roots
        self._routes: dict[str, Callable[[dict[str, Any], Notify], defer.Deferred[Answer]]] = {
            "Info": self._info_request,
            "Dask": self._dask_request,
        }

    def handle(self, request: dict[str, Any], notify: Notify) -> defer.Deferred[Answer]:
        """The answer to one request; never fails (errors become error answers)."""
        header = request.get("Header")
        answer = defer.maybeDeferred(self._route, header, request, notify)
        return answer.addErrback(self._failed, header)

    def refuse(self, error: MeasuringError) -> Answer:
        """The answer to something that could not be read as a request."""
        return self._error_answer(error, None)

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
        _only(request, TOP_LEVEL, "the request")
        return self._routes[header](request, notify)

    def _failed(self, reason: Failure, header: object) -> Answer:
        error = reason.value
        if not isinstance(error, MeasuringError):
            self._log.failure("request with Header {header!r} failed", reason, header=header)
            error = Internal("the server failed answering this request; the details are in its log")
        return self._error_answer(error, header)

    def _error_answer(self, error: MeasuringError, header: object) -> Answer:
        self._stats.error(error.code)
        return {
            "Header": header if isinstance(header, str) else "Error",
            "Status": "Error",
            **error.extra,
            "Error": error.to_json(),
        }

    def _info_request(self, request: dict[str, Any], notify: Notify) -> defer.Deferred[Answer]:
        name = request.get("Request")
        if not isinstance(name, str) or name not in REQUESTS:
            raise BadRequest(f'an Info "Request" must be one of {_one_of(REQUESTS)}, not {name!r}')
        return self._info.answer(name).addCallback(
            lambda response: {
                "Header": "Info",
                "Request": name,
                "Status": "OK",
                "Response": response,
            }
        )

    def _dask_request(self, request: dict[str, Any], notify: Notify) -> defer.Deferred[Answer]:
        job = self._jobs.submit(self.dask_spec(request.get("Request")))
        return job.when_finished().addCallback(
            lambda response: {"Header": "Dask", "Status": "OK", "Job": job.id, "Response": response}
        )

    def dask_spec(self, fields: object) -> JobSpec:
        """Check the ``Request`` object of a Dask request and resolve its paths."""
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
        functions = _functions(fields.get("Functions"))
        output = _choice(fields, "Output", tuple(loader.OUTPUTS), "parquet")
        engine = _choice(fields, "Engine", loader.ENGINES, "pyarrow")
        paths = loader.resolve_job(
            self._data_roots, fields["Directory"], fields["Base"], fields["File"]
        )
        return JobSpec(paths=paths, functions=functions, output=output, engine=engine)
