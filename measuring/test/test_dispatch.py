"""
Tests for ``measuring.dispatch``: routing requests by Header, checking every field a user sends,
and the one shape every answer has.

The dispatcher runs against the real ``JobManager`` (over a fake worker pool whose jobs the test
settles), the real ``Stats`` and a fake InfoService; path checks use real folders.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from measuring.dispatch import Dispatcher
from measuring.errors import JobFailed, TooLarge
from measuring.info import REQUESTS
from measuring.jobs import JobManager
from measuring.stats import Stats
from measuring.test.support import write_formulas
from measuring.threads import Synchronous


class FakeInfo:
    """The InfoService's one method: answers at once, or holds each answer for the test."""

    def __init__(self, error: Exception | None = None) -> None:
        self.asked: list[str] = []
        self.held: list[defer.Deferred[dict[str, Any]]] = []
        self.hold = False
        self._error = error

    def answer(self, request: str) -> defer.Deferred[dict[str, Any]]:
        self.asked.append(request)
        if self._error is not None:
            raise self._error
        if self.hold:
            self.held.append(defer.Deferred())
            return self.held[-1]
        return defer.succeed({"Asked": request})


class FakeRunningJob:
    """A job the fake pool runs: the test fires ``result``; ``kill`` fails it like the pool does."""

    def __init__(self, message: dict[str, Any]) -> None:
        self.message = message
        self.result: defer.Deferred[dict[str, Any]] = defer.Deferred()

    def kill(self, reason: Exception) -> None:
        self.result.errback(reason)


class FakePool:
    """A worker pool that starts nothing and remembers each job it was given."""

    def __init__(self) -> None:
        self.running: list[FakeRunningJob] = []

    def run(self, message: dict[str, Any]) -> FakeRunningJob:
        self.running.append(FakeRunningJob(message))
        return self.running[-1]


class Harness:
    """A Dispatcher over FakeInfo and the real JobManager (one worker, fake pool, fake clock)."""

    def __init__(
        self,
        roots: tuple[str, ...] = ("/",),
        job_timeout: float = 60.0,
        info: FakeInfo | None = None,
    ) -> None:
        self.clock = Clock()
        self.stats = Stats()
        self.info = FakeInfo() if info is None else info
        self.pool = FakePool()
        jobs = JobManager(self.pool, self.clock, 1, job_timeout, self.stats, Synchronous())
        self.dispatcher = Dispatcher(self.info, jobs, self.stats, roots)


class DispatcherTests(SynchronousTestCase):
    """Info routing, answer shapes, Internal errors and the counters."""

    def setUp(self) -> None:
        self.harness = Harness()

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
            self.answer({"Header": "Info", "Request": "Status", "Token": "x"}),
            "Info",
            "BadRequest",
            "'Token'",
            '"Header", "Request", "Id"',
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
        self.harness = Harness(info=FakeInfo(error=RuntimeError("psutil exploded")))
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
        os.makedirs(os.path.join(self.site, "data.parquet"))
        write_formulas(self.site)
        self.other_root = os.path.realpath(self.mktemp())
        os.makedirs(os.path.join(self.other_root, "data.parquet"))
        write_formulas(self.other_root)
        self.outside = os.path.realpath(self.mktemp())
        os.makedirs(self.outside)
        write_formulas(self.outside)
        self.harness = Harness((self.root, self.other_root), job_timeout=30.0)

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
        self.assertEqual(self.harness.pool.running, [])

    def test_jobStarted(self) -> None:
        """A valid request starts a job on the real, checked paths with the requested options."""
        self.answer(Functions=["peak", "count"], Output="csv", Engine="fastparquet")
        [job] = self.harness.pool.running
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
            },
        )

    def test_defaults(self) -> None:
        """Without Functions, Output and Engine a job runs every formula to Parquet via pyarrow."""
        self.answer(Functions=None)
        message = self.harness.pool.running[0].message
        self.assertEqual(
            (message["Functions"], message["Output"], message["Engine"]),
            (None, "parquet", "pyarrow"),
        )

    def test_directoryInAnyRoot(self) -> None:
        """An absolute Directory inside any data root is accepted."""
        self.answer(Directory=self.other_root)
        self.assertEqual(self.harness.pool.running[0].message["Directory"], self.other_root)

    def test_jobDone(self) -> None:
        """A finished job is an OK answer with its Job id and its Response, timed by the clock."""
        self.harness.clock.advance(1000)
        answer = self.answer()
        job = self.harness.pool.running[0]
        self.assertNoResult(answer)
        self.harness.clock.advance(2.5)
        job.result.callback({"Results": {"peak": "results/x/peak.parquet"}})
        self.assertEqual(
            self.successResultOf(answer),
            {
                "Header": "Dask",
                "Status": "OK",
                "Job": job.message["Job"],
                "Response": {"Results": {"peak": "results/x/peak.parquet"}, "Elapsed": 2.5},
            },
        )

    def test_jobErrorsCarryJob(self) -> None:
        """A job that fails or runs out of time is an error answer that still names its Job."""
        failing, slow = self.answer(), self.answer()
        self.harness.pool.running[0].result.errback(JobFailed("formula 'peak' raised KeyError"))
        self.harness.clock.advance(30)
        for answer, code, words in [
            (failing, "JobFailed", "formula 'peak' raised KeyError"),
            (slow, "Timeout", "longer than its limit of 30 s"),
        ]:
            job = self.harness.pool.running.pop(0).message["Job"]
            result = self.successResultOf(answer)
            self.assertEqual(set(result), {"Header", "Status", "Job", "Error"})
            self.assertEqual(
                (result["Header"], result["Status"], result["Job"], result["Error"]["Code"]),
                ("Dask", "Error", job, code),
            )
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
        self.assertEqual(self.harness.pool.running, [])

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
