"""
Tests for ``measuring.server.dispatch`` answering for jobs: Dask requests with Async, Progress and
Timeout, the Busy answer, and every Job request with the checks on its fields.

Same setting as ``test_dispatch``: the real Dispatcher, Scheduler and job database, a fake pool.
Every line a connection would get (Progress lines, answers sent later, the answer) is collected
in order in ``lines``.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from measuring.errors import JobFailed
from measuring.server.dispatch import JOB_REQUESTS
from measuring.server.jobs.store import JobDatabase
from measuring.test.support import write_formulas, write_parts
from measuring.test.support.fakes import FakeRunningJob
from measuring.test.unit.test_dispatch import Harness
from measuring.wire import STATES

DASK = {"Directory": ".", "Base": "data.parquet", "File": "work.py"}
UNKNOWN = "20270115-080000-abcdef"


class JobDispatchTestCase(SynchronousTestCase):
    """A data root with a dataset folder and a formula file, and a Harness over it."""

    def setUp(self) -> None:
        self.root = os.path.realpath(self.mktemp())
        write_parts(self.root)
        write_formulas(self.root)
        self.make()

    def make(self, **limits: Any) -> None:
        self.harness = Harness(self, (self.root,), **limits)
        self.lines: list[dict[str, Any]] = []

    def send(self, request: dict[str, Any]) -> defer.Deferred[dict[str, Any]]:
        """Hand ``request`` over; Progress lines and the answer go to ``lines`` as they come."""

        def sent(answer: dict[str, Any]) -> dict[str, Any]:
            self.lines.append(answer)
            return answer

        return self.harness.dispatcher.handle(request, self.lines.append).addCallback(sent)

    def ask(self, request: dict[str, Any]) -> dict[str, Any]:
        """The answer to ``request``, which comes at once."""
        return self.successResultOf(self.send(request))

    def dask(self, **fields: Any) -> defer.Deferred[dict[str, Any]]:
        return self.send({"Header": "Dask", "Request": {**DASK, **fields}})

    def running(self) -> FakeRunningJob:
        """The job the pool runs last."""
        return self.harness.pool.runs[-1]

    def accepted(self) -> str:
        """The id of a new Async job."""
        return str(self.successResultOf(self.dask(Async=True))["Job"])

    def state_on_disk(self, job: str) -> str | None:
        """The job's state as another connection to the job database reads it."""
        database = JobDatabase(self.harness.database.path)
        self.addCleanup(database.close)
        record = database.get(job)
        return None if record is None else str(record["state"])

    def assertError(self, answer: dict[str, Any], code: str, *words: str) -> None:
        self.assertEqual(answer["Status"], "Error", answer)
        self.assertEqual(answer["Error"]["Code"], code, answer)
        for word in words:
            self.assertIn(word, answer["Error"]["Message"])


class AsyncProgressTests(JobDispatchTestCase):
    """Async answers at once; Progress lines come before the job's answer."""

    def test_asyncAccepted(self) -> None:
        """An Async job is Accepted with its id once recorded; without Progress nothing follows."""
        answer = self.successResultOf(self.dask(Async=True))
        job = self.running().job
        self.assertEqual(answer, {"Header": "Dask", "Status": "Accepted", "Job": job})
        self.assertEqual(self.state_on_disk(job), "running")
        self.running().progress(1, 2)
        self.running().succeed()
        self.assertEqual(self.lines, [answer])
        self.assertEqual(self.state_on_disk(job), "done")

    def test_progressLines(self) -> None:
        """With Progress, Progress lines with the Job come as tasks complete, then the answer."""
        answer = self.dask(Progress=True)
        job = self.running().job
        self.running().progress(120, 480)
        self.running().progress(480, 480)
        self.assertNoResult(answer)
        self.running().succeed()
        self.assertEqual(
            self.lines,
            [
                {"Header": "Progress", "Job": job, "Done": 120, "Total": 480},
                {"Header": "Progress", "Job": job, "Done": 480, "Total": 480},
                self.successResultOf(answer),
            ],
        )
        self.assertEqual((self.lines[-1]["Status"], self.lines[-1]["Job"]), ("OK", job))

    def test_noProgressUnasked(self) -> None:
        """Without Progress, a job's progress sends nothing before its answer."""
        self.dask()
        self.running().progress(1, 2)
        self.running().succeed()
        self.assertEqual([line["Header"] for line in self.lines], ["Dask"])

    def test_asyncWithProgress(self) -> None:
        """With Async and Progress, Accepted comes first, then Progress, then the job's answer."""
        self.dask(Async=True, Progress=True)
        job = self.running().job
        self.running().progress(3, 4)
        self.running().print("Traceback ...\n")
        self.running().fail(JobFailed("formula 'peak' raised KeyError"))
        accepted, progress, end = self.lines
        self.assertEqual(accepted, {"Header": "Dask", "Status": "Accepted", "Job": job})
        self.assertEqual(progress, {"Header": "Progress", "Job": job, "Done": 3, "Total": 4})
        self.assertEqual(
            (end["Header"], end["Job"], end["Log"], end["Error"]["Code"]),
            ("Dask", job, "Traceback ...\n", "JobFailed"),
        )

    def test_ownTimeout(self) -> None:
        """A job's Timeout is its time limit."""
        answer = self.dask(Timeout=2.5)
        self.harness.clock.advance(2.5)
        self.assertError(self.successResultOf(answer), "Timeout", "its limit of 2.5 s")

    def test_busy(self) -> None:
        """With max_queued jobs waiting, a Dask request is Busy at once and nothing is recorded."""
        self.make(max_queued=1)
        self.accepted()
        self.accepted()
        answer = self.ask({"Header": "Dask", "Request": {**DASK, "Async": True}})
        self.assertEqual(set(answer), {"Header", "Status", "Error"})
        self.assertError(answer, "Busy", "--max-queued 1")
        self.assertEqual(len(self.harness.pool.runs), 1)
        self.assertEqual(len(self.successResultOf(self.harness.queries.recent(None, 10))), 2)


class JobRequestTests(JobDispatchTestCase):
    """Each Job request's answer, and its field checks."""

    def job(self, request: str, job: str, **fields: Any) -> dict[str, Any]:
        return self.ask({"Header": "Job", "Request": request, "Job": job, **fields})

    def test_status(self) -> None:
        """Status answers the job's Status under its Job id."""
        self.dask()
        job = self.running().job
        answer = self.job("Status", job)
        self.assertEqual(set(answer), {"Header", "Request", "Status", "Job", "Response"})
        self.assertEqual(
            (answer["Header"], answer["Request"], answer["Status"], answer["Job"]),
            ("Job", "Status", "OK", job),
        )
        self.assertEqual(
            (answer["Response"]["State"], answer["Response"]["File"]),
            ("running", os.path.join(self.root, "work.py")),
        )

    def test_cancel(self) -> None:
        """Cancel answers the State the job is in after it."""
        running, queued = self.accepted(), self.accepted()
        self.assertEqual(
            self.job("Cancel", queued),
            {
                "Header": "Job",
                "Request": "Cancel",
                "Status": "OK",
                "Job": queued,
                "Response": {"State": "cancelled"},
            },
        )
        self.assertEqual(self.job("Cancel", running)["Response"], {"State": "cancelled"})

    def test_list(self) -> None:
        """List answers the newest jobs first; State and Limit narrow it."""
        oldest = self.accepted()
        self.harness.clock.advance(1)
        newest = self.accepted()
        answer = self.ask({"Header": "Job", "Request": "List"})
        self.assertEqual(set(answer), {"Header", "Request", "Status", "Response"})
        self.assertEqual(
            (answer["Header"], answer["Request"], answer["Status"]), ("Job", "List", "OK")
        )
        self.assertEqual([line["Job"] for line in answer["Response"]["Jobs"]], [newest, oldest])
        narrowed: list[tuple[dict[str, Any], list[str]]] = [
            ({"State": "queued"}, [newest]),
            ({"Limit": 1}, [newest]),
        ]
        for fields, jobs in narrowed:
            answer = self.ask({"Header": "Job", "Request": "List", **fields})
            self.assertEqual([line["Job"] for line in answer["Response"]["Jobs"]], jobs)

    def test_logAndResult(self) -> None:
        """Log answers what was printed; Result answers one result of a done job."""
        self.dask()
        job = self.running()
        job.print("hello\n")
        self.assertEqual(self.job("Log", job.job)["Response"], {"Log": "hello\n"})
        job.succeed({"peak": {"Kind": "Scalar", "Value": 34.88}})
        answer = self.job("Result", job.job, Name="peak")
        self.assertEqual(
            answer,
            {
                "Header": "Job",
                "Request": "Result",
                "Status": "OK",
                "Job": job.job,
                "Response": {"Name": "peak", "Kind": "Scalar", "Value": 34.88},
            },
        )

    def test_notFoundCarriesJob(self) -> None:
        """A Job request for a job not on record is NotFound, with the Job it asked for."""
        for request in ["Status", "Cancel", "Log", "Result"]:
            answer = self.job(request, UNKNOWN, **({"Name": "peak"} if request == "Result" else {}))
            self.assertEqual(set(answer), {"Header", "Status", "Job", "Error"})
            self.assertEqual((answer["Header"], answer["Job"]), ("Job", UNKNOWN))
            self.assertError(answer, "NotFound", f"no job '{UNKNOWN}'")

    def test_missingJob(self) -> None:
        """A Job request other than List without a "Job" string is BadRequest saying so."""
        for request in ["Status", "Cancel", "Log", "Result"]:
            cases: list[tuple[dict[str, Any], str]] = [
                ({}, "null"),
                ({"Job": 5}, "a number"),
                ({"Job": ""}, "a string"),
            ]
            for fields, kind in cases:
                answer = self.ask({"Header": "Job", "Request": request, **fields})
                self.assertError(answer, "BadRequest", f'a Job {request} request needs "Job"', kind)

    def test_unknownRequest(self) -> None:
        """An unknown Job Request is BadRequest listing those there are."""
        for name in ["Kill", None]:
            answer = self.ask({"Header": "Job", "Request": name, "Job": UNKNOWN})
            self.assertError(answer, "BadRequest", repr(name), *(f'"{r}"' for r in JOB_REQUESTS))

    def test_listChecks(self) -> None:
        """List's State must be a job state and its Limit a whole number from 1 to 1000."""
        answer = self.ask({"Header": "Job", "Request": "List", "State": "finished"})
        self.assertError(answer, "BadRequest", "'finished'", *(f'"{state}"' for state in STATES))
        for limit in [0, 1001, 2.5, "5", True, None]:
            answer = self.ask({"Header": "Job", "Request": "List", "Limit": limit})
            self.assertError(answer, "BadRequest", '"Limit" must be a whole number from 1 to 1000')

    def test_resultChecks(self) -> None:
        """Result needs a Name; Offset is a whole number from 0, Limit one from 1 to 10000."""
        cases: list[tuple[dict[str, Any], list[str]]] = [
            ({}, ['a Job Result request needs "Name"', "null"]),
            ({"Name": 3}, ['needs "Name"', "a number"]),
            (
                {"Name": "peak", "Offset": -1},
                ['"Offset" must be a whole number of at least 0', "-1"],
            ),
            ({"Name": "peak", "Offset": 1.5}, ['"Offset" must be a whole number']),
            ({"Name": "peak", "Limit": 0}, ['"Limit" must be a whole number from 1 to 10000']),
            ({"Name": "peak", "Limit": 10001}, ['"Limit" must be a whole number from 1 to 10000']),
        ]
        for fields, words in cases:
            self.assertError(self.job("Result", UNKNOWN, **fields), "BadRequest", *words)
