"""
Tests for ``measuring.server.dispatch``: routing requests by Header, checking every field a user
sends, and the one shape every answer has.

The dispatcher runs against the real ``Scheduler`` (over a fake worker pool whose jobs the test
settles), the real ``Stats`` and a fake InfoService; path checks use real folders.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from measuring.errors import JobFailed, TooLarge
from measuring.server.dispatch import Dispatcher
from measuring.server.jobs.queries import JobQueries
from measuring.server.jobs.scheduler import Scheduler
from measuring.server.jobs.store import JobDatabase, JobStore
from measuring.server.stats import Stats
from measuring.server.threads import Synchronous
from measuring.test.support import write_formulas, write_parts
from measuring.test.support.fakes import FakeInfo, FakePool, limits
from measuring.wire import INFO_REQUESTS as REQUESTS


class Harness:
    """
    A Dispatcher over FakeInfo and the real Scheduler: one worker, a fake pool, a fake clock,
    and the real job database in a folder of the test's own, started (recovery done).
    """

    def __init__(
        self,
        case: SynchronousTestCase,
        roots: tuple[str, ...] = ("/",),
        info: FakeInfo | None = None,
        **overrides: Any,
    ) -> None:
        self.clock = Clock()
        self.stats = Stats()
        self.info = FakeInfo() if info is None else info
        self.pool = FakePool()
        self.database = JobDatabase(os.path.abspath(case.mktemp()) + ".sqlite")
        case.addCleanup(self.database.close)
        store = JobStore(self.database, Synchronous())
        held = limits(**{"workers": 1, "job_timeout": 60.0, **overrides})
        self.jobs = Scheduler(self.pool, store, self.clock, held, Synchronous())
        self.jobs.startService()
        self.queries = JobQueries(self.jobs, store, self.clock, Synchronous(), held)
        self.dispatcher = Dispatcher(self.info, self.jobs, self.queries, self.stats, roots)


class DispatcherTests(SynchronousTestCase):
    """Info routing, answer shapes, Internal errors and the counters."""

    def setUp(self) -> None:
        self.harness = Harness(self)

    def answer(self, request: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self.successResultOf(
            self.harness.dispatcher.handle(request, lambda answer: None)
        )
        return result

    def assertError(self, answer: dict[str, Any], header: str, code: str, *words: str) -> None:
        """``answer`` is an error answer with this Header and Code whose Message has ``words``."""
        self.assertEqual(set(answer), {"Header", "Status", "Error"})
        self.assertEqual((answer["Header"], answer["Status"]), (header, "Error"))
        self.assertEqual(set(answer["Error"]), {"Code", "Message"})
        self.assertEqual(answer["Error"]["Code"], code)
        for word in words:
            self.assertIn(word, answer["Error"]["Message"])

    def test_infoRequestsRouted(self) -> None:
        """Each Info request goes to InfoService and its Response comes back in an OK answer."""
        for name in REQUESTS:
            self.assertEqual(
                self.answer({"Header": "Info", "Request": name, "Id": 3}),
                {"Header": "Info", "Request": name, "Status": "OK", "Response": {"Asked": name}},
            )
        self.assertEqual(self.harness.info.asked, list(REQUESTS))

    def test_unknownInfoRequest(self) -> None:
        """An unknown or missing Info Request is BadRequest listing the four accepted ones."""
        for request in ["Statuss", 5, None]:
            self.assertError(
                self.answer({"Header": "Info", "Request": request}),
                "Info",
                "BadRequest",
                repr(request),
                *(f'"{name}"' for name in REQUESTS),
            )
        self.assertEqual(self.harness.info.asked, [])

    def test_unknownHeader(self) -> None:
        """An unknown Header is BadRequest listing the accepted Headers, and is echoed back."""
        self.assertError(
            self.answer({"Header": "Jobs", "Request": "Status"}),
            "Jobs",
            "BadRequest",
            "unknown Header 'Jobs'",
            '"Info", "Dask"',
        )

    def test_missingHeader(self) -> None:
        """A request without a string Header is answered with the Header "Error"."""
        self.assertError(
            self.answer({"Request": "Status"}), "Error", "BadRequest", 'no "Header"', '"Info"'
        )
        self.assertError(
            self.answer({"Header": ["Info"]}), "Error", "BadRequest", "unknown Header ['Info']"
        )

    def test_unknownTopLevelKey(self) -> None:
        """An unknown key beside Header is BadRequest naming it and the accepted keys."""
        self.assertError(
            self.answer({"Header": "Info", "Request": "Status", "Tokn": "x"}),
            "Info",
            "BadRequest",
            "'Tokn'",
            '"Header", "Request", "Id", "Token"',
        )

    def test_keysPerHeader(self) -> None:
        """Each Header takes only its own keys: a Job request's key elsewhere is BadRequest."""
        cases: list[tuple[dict[str, Any], str]] = [
            ({"Header": "Info", "Request": "Status", "Job": "20270115-080000-abcdef"}, "Job"),
            ({"Header": "Dask", "Request": {}, "State": "queued"}, "State"),
            ({"Header": "Job", "Request": "List", "Functions": ["peak"]}, "Functions"),
        ]
        for request, key in cases:
            header = request["Header"]
            self.assertError(
                self.answer(request),
                header,
                "BadRequest",
                f"the {header} request has an unknown key {key!r}",
            )

    def test_refuse(self) -> None:
        """What could not be read as a request is answered under the Header "Error"."""
        self.assertEqual(
            self.harness.dispatcher.refuse(TooLarge("the request is longer than 10 bytes")),
            {
                "Header": "Error",
                "Status": "Error",
                "Error": {"Code": "TooLarge", "Message": "the request is longer than 10 bytes"},
            },
        )

    def test_unexpectedErrorIsInternal(self) -> None:
        """An exception that is no protocol error is logged and answered as Internal."""
        self.harness = Harness(self, info=FakeInfo(error=RuntimeError("psutil exploded")))
        answer = self.answer({"Header": "Info", "Request": "Status"})
        self.assertError(answer, "Info", "Internal", "log")
        self.assertNotIn("psutil", answer["Error"]["Message"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(self.harness.stats.errors["Internal"], 1)

    def test_counters(self) -> None:
        """Stats counts requests by Header (unknown ones as Other) and errors by Code."""
        self.answer({"Header": "Info", "Request": "Status"})
        self.answer({"Header": "Info", "Request": "Nope"})
        self.answer({"Header": "Dask", "Request": None})
        self.answer({"Header": "Nope"})
        self.harness.dispatcher.refuse(TooLarge("too long"))
        snapshot = self.harness.stats.snapshot()
        self.assertEqual(snapshot["Requests"], {"Total": 4, "Info": 2, "Dask": 1, "Other": 1})
        self.assertEqual(snapshot["Errors"], {"Total": 4, "BadRequest": 3, "TooLarge": 1})


class DaskTests(SynchronousTestCase):
    """Dask requests: field checks, path checks against the data roots, and the job's answer."""

    def setUp(self) -> None:
        self.root = os.path.realpath(self.mktemp())
        self.site = os.path.join(self.root, "site")
        write_parts(self.site)
        write_formulas(self.site)
        self.other_root = os.path.realpath(self.mktemp())
        write_parts(self.other_root)
        write_formulas(self.other_root)
        self.outside = os.path.realpath(self.mktemp())
        os.makedirs(self.outside)
        write_formulas(self.outside)
        self.harness = Harness(self, (self.root, self.other_root), job_timeout=30.0)

    def dask(self, request: object) -> defer.Deferred[dict[str, Any]]:
        """The answer to a Dask request with this ``Request``."""
        return self.harness.dispatcher.handle(
            {"Header": "Dask", "Request": request}, lambda answer: None
        )

    def answer(self, **fields: Any) -> defer.Deferred[dict[str, Any]]:
        """The answer to a valid Dask request on ``site``, changed by ``fields``."""
        return self.dask({"Directory": "site", "Base": "data.parquet", "File": "work.py", **fields})

    def assertRefused(self, fields: dict[str, Any], code: str, *words: str) -> None:
        """The Dask request with ``fields`` is refused with ``code``, and no job is started."""
        answer = self.successResultOf(self.answer(**fields))
        self.assertEqual((answer["Header"], answer["Status"]), ("Dask", "Error"), fields)
        self.assertEqual(answer["Error"]["Code"], code, answer)
        for word in words:
            self.assertIn(word, answer["Error"]["Message"], fields)
        self.assertEqual(self.harness.pool.runs, [])

    def test_jobStarted(self) -> None:
        """A valid request starts a job on the real, checked paths with the requested options."""
        self.answer(Functions=["peak", "count"], Output="csv", Engine="fastparquet", Index="time")
        [job] = self.harness.pool.runs
        self.assertEqual(
            job.message,
            {
                "Type": "Job",
                "Job": job.message["Job"],
                "Directory": self.site,
                "Base": os.path.join(self.site, "data.parquet"),
                "File": os.path.join(self.site, "work.py"),
                "Functions": ["peak", "count"],
                "Output": "csv",
                "Engine": "fastparquet",
                "Index": "time",
            },
        )

    def test_defaults(self) -> None:
        """Without Functions, Output and Engine a job runs every formula to Parquet via pyarrow."""
        self.answer(Functions=None)
        message = self.harness.pool.runs[0].message
        self.assertEqual(
            (message["Functions"], message["Output"], message["Engine"]),
            (None, "parquet", "pyarrow"),
        )

    def test_directoryInAnyRoot(self) -> None:
        """An absolute Directory inside any data root is accepted."""
        self.answer(Directory=self.other_root)
        self.assertEqual(self.harness.pool.runs[0].message["Directory"], self.other_root)

    def test_jobDone(self) -> None:
        """A finished job is an OK answer with its Job id and its Response, timed by the clock."""
        self.harness.clock.advance(1000)
        answer = self.answer()
        job = self.harness.pool.runs[0]
        self.assertNoResult(answer)
        self.harness.clock.advance(2.5)
        job.print("hello\n")
        job.succeed({"peak": {"Kind": "Scalar", "Value": 41.5}})
        self.assertEqual(
            self.successResultOf(answer),
            {
                "Header": "Dask",
                "Status": "OK",
                "Job": job.job,
                "Response": {
                    "Results": {"peak": {"Kind": "Scalar", "Value": 41.5}},
                    "Log": "hello\n",
                    "Elapsed": 2.5,
                },
            },
        )

    def test_jobErrorsCarryJobAndLog(self) -> None:
        """A job that fails or runs out of time is an error answer with its Job and its Log."""
        failing, slow = self.answer(), self.answer()
        self.harness.pool.runs[0].print("Traceback ...\n")
        self.harness.pool.runs[0].fail(JobFailed("formula 'peak' raised KeyError"))
        self.harness.pool.runs[1].print("started\n")
        self.harness.clock.advance(30)
        for answer, code, words, log in [
            (failing, "JobFailed", "formula 'peak' raised KeyError", "Traceback ...\n"),
            (slow, "Timeout", "longer than its limit of 30 s", "started\n"),
        ]:
            job = self.harness.pool.runs.pop(0).job
            result = self.successResultOf(answer)
            self.assertEqual(set(result), {"Header", "Status", "Job", "Log", "Error"})
            self.assertEqual(
                (result["Header"], result["Status"], result["Job"], result["Log"]),
                ("Dask", "Error", job, log),
            )
            self.assertEqual(result["Error"]["Code"], code)
            self.assertIn(words, result["Error"]["Message"])

    def test_badFields(self) -> None:
        """Each malformed Dask field is BadRequest naming the field and what it must be."""
        cases: list[tuple[dict[str, Any], list[str]]] = [
            ({"Functoins": ["peak"]}, ["unknown key 'Functoins'", '"Functions"', '"Engine"']),
            ({"Directory": 5}, ['"Directory" must be a string', "number"]),
            ({"Base": None}, ['"Base" must be a string', "null"]),
            ({"File": ["work.py"]}, ['"File" must be a string', "array"]),
            ({"Directory": ""}, ["Directory must not be empty"]),
            ({"File": "work\0.py"}, ["File must not contain a NUL"]),
            ({"Functions": "peak"}, ['"Functions" must be a non-empty array']),
            ({"Functions": []}, ['"Functions" must be a non-empty array']),
            ({"Functions": ["peak", 3]}, ['"Functions"', "names (strings)"]),
            ({"Functions": ["peak", "peak"]}, ['"Functions"', "more than once"]),
            ({"Output": "xlsx"}, ['"Output" must be one of "parquet", "csv", "json"', "'xlsx'"]),
            ({"Output": 1}, ['"Output" must be one of']),
            ({"Engine": "polars"}, ['"Engine" must be one of "pyarrow", "fastparquet"']),
            ({"Index": 3}, ['"Index" must be the name of a column', "not a number"]),
            ({"Index": ""}, ['"Index" must be the name of a column', "not an empty string"]),
            ({"Index": ["time"]}, ['"Index" must be the name of a column', "not an array"]),
            ({"Timeout": 0}, ['"Timeout" must be a number of at least 0.001', "not 0"]),
            ({"Timeout": -5}, ['"Timeout" must be a number', "not -5"]),
            ({"Timeout": "10"}, ['"Timeout" must be a number', "not '10'"]),
            ({"Timeout": True}, ['"Timeout" must be a number']),
            ({"Async": "yes"}, ['"Async" must be true or false', "not a string"]),
            ({"Progress": 1}, ['"Progress" must be true or false', "not a number"]),
            ({"File": "data.parquet"}, ["File 'data.parquet'", "is not a file"]),
        ]
        for fields, words in cases:
            self.assertRefused(fields, "BadRequest", *words)

    def test_missingFields(self) -> None:
        """A Dask request without its Request object or one of its paths names what is missing."""
        for name in ["Directory", "Base", "File"]:
            fields = {"Directory": "site", "Base": "data.parquet", "File": "work.py"}
            del fields[name]
            answer = self.successResultOf(self.dask(fields))
            self.assertEqual(answer["Error"]["Code"], "BadRequest")
            self.assertIn(f'the Dask Request has no "{name}"', answer["Error"]["Message"])
        for request in [None, "site/work.py"]:
            answer = self.successResultOf(self.dask(request))
            self.assertEqual(answer["Error"]["Code"], "BadRequest")
            self.assertIn('needs "Request": {"Directory"', answer["Error"]["Message"])
        self.assertEqual(self.harness.pool.runs, [])

    def test_resultsNotAFolder(self) -> None:
        """A file where the results folder should be is BadRequest naming it."""
        with open(os.path.join(self.site, "results"), "w"):
            pass
        self.assertRefused({}, "BadRequest", "results exists and is not a folder")

    def test_outsideTheDataRoots(self) -> None:
        """A path that leads outside the data roots, by name or by symlink, is Forbidden."""
        os.symlink(self.outside, os.path.join(self.site, "escape"))
        os.symlink(os.path.join(self.outside, "work.py"), os.path.join(self.site, "linked.py"))
        cases: list[tuple[dict[str, Any], list[str]]] = [
            ({"Directory": ".."}, ["Directory '..'", "outside the data roots", self.root]),
            ({"Directory": self.outside}, ["outside the data roots"]),
            ({"Directory": "site/escape"}, ["Directory 'site/escape'", "outside the data roots"]),
            ({"Base": "../../x.parquet"}, ["Base '../../x.parquet'", "leads outside"]),
            ({"File": "linked.py"}, ["File 'linked.py'", "leads outside its Directory"]),
        ]
        for fields, words in cases:
            self.assertRefused(fields, "Forbidden", *words)

    def test_missingPaths(self) -> None:
        """A Directory, Base or File that does not exist is NotFound naming it."""
        cases: list[tuple[dict[str, Any], list[str]]] = [
            ({"Directory": "elsewhere"}, ["Directory 'elsewhere' does not exist"]),
            ({"Base": "other.parquet"}, ["Base 'other.parquet' was not found", self.site]),
            ({"File": "other.py"}, ["File 'other.py' was not found"]),
        ]
        for fields, words in cases:
            self.assertRefused(fields, "NotFound", *words)
