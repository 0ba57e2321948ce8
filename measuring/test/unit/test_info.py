"""
Tests for ``measuring.server.info``: the four Info answers, read from the real machine with psutil.

The pool and the job manager are small fakes holding what ``InfoService`` reads from them; the
"worker processes" are real child processes of the test, so that psutil has something to measure.
Blocking calls run at once (``threads.Synchronous``), so every answer is ready when asked for.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

import psutil
from twisted.internet import defer, task
from twisted.trial.unittest import SynchronousTestCase

from measuring import __version__
from measuring.server.info import InfoService
from measuring.server.pool.pool import WorkerInfo
from measuring.server.stats import Stats
from measuring.server.threads import Synchronous
from measuring.test.support.fakes import limits
from measuring.wire import INFO_REQUESTS as REQUESTS

STARTED = 1_800_000_000.0
STARTED_ISO = "2027-01-15T08:00:00+00:00"
#: The keys of the "All statistic" answer: the machine's figures, and the server's own.
MACHINE_FIGURES = {"Cpu", "Memory", "Swap", "Disk", "Load", "Net"}
SERVER_FIGURES = {"Jobs", "Requests", "Errors", "Uptime"}


class FakePool:
    """The pool as Info sees it: its size, its memory limit per job, its template and its jobs."""

    def __init__(
        self, size: int, workers: list[WorkerInfo], memory_limit: int | None = None
    ) -> None:
        self.size = size
        self.workers = workers
        self.memory_limit = memory_limit

    def processes(self) -> list[WorkerInfo]:
        return list(self.workers)

    @property
    def template_state(self) -> str:
        return "ready" if any(w.state == "template" for w in self.workers) else "starting"

    @property
    def busy(self) -> int:
        return sum(1 for worker in self.workers if worker.state == "busy")


#: Finished jobs on record when there are none, as the job database counts them.
NO_HISTORY: dict[str, Any] = {
    "Total": {"Done": 0, "Failed": 0, "Cancelled": 0, "Timeout": 0},
    "LastHour": {"Done": 0, "Failed": 0, "Cancelled": 0, "Timeout": 0},
    "MeanSeconds": None,
}


class FakeJobs:
    """
    The job manager as Info sees it: its limits, how many jobs run and wait, and the finished
    jobs on record. ``history`` answers at once, or, with ``slow``, when the test fires it (the
    real one reads its database in another thread).
    """

    def __init__(self) -> None:
        self.limits = limits()
        self.running, self.queued = 0, 0
        self.finished: dict[str, Any] = NO_HISTORY
        self.slow = False
        self.asked: list[defer.Deferred[dict[str, Any]]] = []

    def counts(self) -> dict[str, int]:
        return {"Running": self.running, "Queued": self.queued}

    def history(self) -> defer.Deferred[dict[str, Any]]:
        if not self.slow:
            return defer.succeed(self.finished)
        self.asked.append(defer.Deferred())
        return self.asked[-1]


class InfoTestCase(SynchronousTestCase):
    """An InfoService started at ``STARTED`` over a data root of its own."""

    def setUp(self) -> None:
        self.clock = task.Clock()
        self.clock.advance(STARTED)
        self.pool = FakePool(size=2, workers=[])
        self.jobs = FakeJobs()
        self.stats = Stats()
        self.root = os.path.abspath(self.mktemp())
        os.makedirs(self.root)
        self.info = InfoService(
            self.clock, self.pool, self.jobs, self.stats, (self.root,), Synchronous()
        )

    def start(self) -> None:
        self.info.startService()
        self.addCleanup(self.info.stopService)

    def child(self, code: str = "import time; time.sleep(60)") -> int:
        """The pid of a new child process running ``code``, killed after the test."""
        process = subprocess.Popen([sys.executable, "-c", code])
        self.addCleanup(process.wait)
        self.addCleanup(process.kill)
        return process.pid

    def answer(self, request: str) -> dict[str, Any]:
        result: dict[str, Any] = self.successResultOf(self.info.answer(request))
        return result


class StatusTests(InfoTestCase):
    """The "Status" answer: the server's state, version, uptime, jobs and workers."""

    def test_status(self) -> None:
        """Status tells the state, version, uptime, pid, job counts, busy workers, the template."""
        self.start()
        self.jobs.running, self.jobs.queued = 1, 3
        self.pool.workers = [
            WorkerInfo(101, "busy", "job-1", STARTED),
            WorkerInfo(102, "template", None, None),
        ]
        self.clock.advance(42.5)
        status = self.answer("Status")
        self.assertEqual(
            {key: status[key] for key in ("State", "Version", "Uptime", "Started", "Pid")},
            {
                "State": "running",
                "Version": __version__,
                "Uptime": 42.5,
                "Started": STARTED_ISO,
                "Pid": os.getpid(),
            },
        )
        self.assertEqual(status["Jobs"], {"Running": 1, "Queued": 3})
        self.assertEqual(status["Workers"], {"Size": 2, "Busy": 1, "Template": "ready"})
        self.assertEqual(status["DataRoots"], [self.root])
        self.assertEqual(status["Versions"]["measuring"], __version__)

    def test_limits(self) -> None:
        """Limits tells the job timeout, each job's memory limit (null: none) and the queue's."""
        self.jobs.limits = limits(job_timeout=90.0, max_queued=7)
        self.pool.memory_limit = 512 * 2**20
        self.assertEqual(
            self.answer("Status")["Limits"],
            {"JobTimeout": 90.0, "JobMemory": 512 * 2**20, "MaxQueued": 7},
        )
        self.pool.memory_limit = None
        self.assertEqual(self.answer("Status")["Limits"]["JobMemory"], None)

    def test_stateFollowsTheService(self) -> None:
        """State is "starting" before the service starts, "stopping" once it stops."""
        self.assertEqual(self.answer("Status")["State"], "starting")
        self.info.startService()
        self.assertEqual(self.answer("Status")["State"], "running")
        self.info.stopService()
        self.assertEqual(self.answer("Status")["State"], "stopping")

    def test_uptimeCountsFromStart(self) -> None:
        """Uptime counts from when the service started, not from when it was made."""
        self.clock.advance(10)
        self.start()
        self.clock.advance(5)
        self.assertEqual(self.answer("Status")["Uptime"], 5.0)


class DaskProcessTests(InfoTestCase):
    """The "Dask process" answer: the worker processes that run a job."""

    def test_busyWorkersOnly(self) -> None:
        """Only a worker running a job is listed, with its job, start time and use."""
        busy, ready = self.child(), self.child()
        self.pool.workers = [
            WorkerInfo(busy, "busy", "job-1", STARTED + 10),
            WorkerInfo(ready, "template", None, None),
        ]
        self.start()
        answer = self.answer("Dask process")
        self.assertEqual(answer["Count"], 1)
        [process] = answer["Processes"]
        self.assertEqual(
            {key: process[key] for key in ("Pid", "Job", "Started", "Processes")},
            {"Pid": busy, "Job": "job-1", "Started": "2027-01-15T08:00:10+00:00", "Processes": 1},
        )
        self.assertGreater(process["Rss"], 0)
        self.assertGreaterEqual(process["Cpu"], 0.0)

    def test_cpuSinceLastAnswer(self) -> None:
        """Cpu reads 0 for a process seen first, then its use since the previous answer."""
        spinning = self.child("while True:\n    pass")
        self.pool.workers = [WorkerInfo(spinning, "busy", "job-1", STARTED)]
        self.assertEqual(self.answer("Dask process")["Processes"][0]["Cpu"], 0.0)
        deadline = time.monotonic() + 30
        while psutil.Process(spinning).cpu_times().user < 0.2:
            self.assertLess(time.monotonic(), deadline, "the child did not use any CPU")
            time.sleep(0.01)
        self.assertGreater(self.answer("Dask process")["Processes"][0]["Cpu"], 0.0)

    def test_endedWorkerIsLeftOut(self) -> None:
        """A busy worker whose process has already ended is not listed."""
        process = subprocess.Popen([sys.executable, "-c", "pass"])
        process.wait()
        self.pool.workers = [WorkerInfo(process.pid, "busy", "job-1", STARTED)]
        self.assertEqual(self.answer("Dask process"), {"Count": 0, "Processes": []})


class AllProcessTests(InfoTestCase):
    """The "All process" answer: the host's process count and the server's process tree."""

    def test_serverTree(self) -> None:
        """The tree holds the server, its template and its job processes, with roles and jobs."""
        busy, ready = self.child(), self.child()
        self.pool.workers = [
            WorkerInfo(busy, "busy", "job-1", STARTED),
            WorkerInfo(ready, "template", None, None),
        ]
        self.start()
        answer = self.answer("All process")
        self.assertGreaterEqual(answer["Count"], 3)
        service = answer["Service"]
        tree = {process["Pid"]: process for process in service["Tree"]}
        self.assertEqual(service["Pid"], os.getpid())
        self.assertEqual(service["Processes"], len(service["Tree"]))
        self.assertEqual(service["Rss"], sum(process["Rss"] for process in service["Tree"]))
        self.assertEqual(tree[os.getpid()]["Role"], "server")
        self.assertEqual((tree[busy]["Role"], tree[busy]["Job"]), ("job", "job-1"))
        self.assertEqual(tree[ready]["Role"], "template")
        self.assertNotIn("Job", tree[ready])
        self.assertEqual(tree[busy]["Parent"], os.getpid())
        self.assertGreater(tree[busy]["Rss"], 0)

    def test_otherChildren(self) -> None:
        """A process below the server that is not a worker is listed as "child"."""
        other = self.child()
        tree = {p["Pid"]: p for p in self.answer("All process")["Service"]["Tree"]}
        self.assertEqual(tree[other]["Role"], "child")


class AllStatisticTests(InfoTestCase):
    """The "All statistic" answer: the machine's figures and the server's counters."""

    def test_machine(self) -> None:
        """Cpu, Memory, Disk (by data root), Load and Net hold sane figures."""
        self.start()
        answer = self.answer("All statistic")
        cpu = answer["Cpu"]
        self.assertEqual(len(cpu["PerCpu"]), cpu["Count"])
        for percent in [cpu["Percent"], *cpu["PerCpu"]]:
            self.assertTrue(0 <= percent <= 100, percent)
        for usage in (answer["Memory"], answer["Disk"][self.root]):
            self.assertGreater(usage["Total"], 0)
            self.assertTrue(0 <= usage["Percent"] <= 100, usage)
            self.assertLessEqual(usage["Used"], usage["Total"])
        self.assertEqual(list(answer["Disk"]), [self.root])
        self.assertIn("Total", answer["Swap"])
        self.assertEqual(len(answer["Load"]), 3)
        self.assertTrue(all(load >= 0 for load in answer["Load"]), answer["Load"])
        self.assertGreaterEqual(answer["Net"]["BytesRecv"], 0)
        self.assertGreaterEqual(answer["Net"]["BytesSent"], 0)

    def test_counters(self) -> None:
        """Requests and Errors count the server's answers; Uptime is since its start."""
        self.start()
        self.stats.request("Info")
        self.stats.request("Info")
        self.stats.request("Dask")
        self.stats.error("BadRequest")
        self.clock.advance(7)
        answer = self.answer("All statistic")
        self.assertEqual(set(answer), MACHINE_FIGURES | SERVER_FIGURES)
        self.assertEqual(answer["Requests"], {"Total": 3, "Info": 2, "Dask": 1})
        self.assertEqual(answer["Errors"], {"Total": 1, "BadRequest": 1})
        self.assertEqual(answer["Uptime"], 7.0)

    def test_jobs(self) -> None:
        """Jobs holds the jobs running and waiting now, and the finished ones on record."""
        self.start()
        self.jobs.running, self.jobs.queued = 1, 2
        self.jobs.finished = {
            "Total": {"Done": 5, "Failed": 2, "Cancelled": 1, "Timeout": 1},
            "LastHour": {"Done": 1, "Failed": 0, "Cancelled": 0, "Timeout": 1},
            "MeanSeconds": 12.25,
        }
        self.assertEqual(
            self.answer("All statistic")["Jobs"],
            {
                "Running": 1,
                "Queued": 2,
                "Total": {"Done": 5, "Failed": 2, "Cancelled": 1, "Timeout": 1},
                "LastHour": {"Done": 1, "Failed": 0, "Cancelled": 0, "Timeout": 1},
                "MeanSeconds": 12.25,
            },
        )

    def test_answerWaitsForTheJobRecords(self) -> None:
        """The answer comes once the finished jobs are read from their records, and holds them."""
        self.start()
        self.jobs.slow = True
        answering = self.info.answer("All statistic")
        self.assertNoResult(answering)
        [asked] = self.jobs.asked
        history = {**NO_HISTORY, "Total": {**NO_HISTORY["Total"], "Done": 3}, "MeanSeconds": 2.0}
        asked.callback(history)
        jobs = self.successResultOf(answering)["Jobs"]
        self.assertEqual((jobs["Total"]["Done"], jobs["MeanSeconds"]), (3, 2.0))


class AnswerTests(InfoTestCase):
    """Every Info answer as the protocol sends it."""

    def test_everyAnswerIsJson(self) -> None:
        """Each of the four answers is plain JSON (it crosses the wire as is)."""
        self.pool.workers = [WorkerInfo(self.child(), "busy", "job-1", STARTED)]
        self.start()
        for request in REQUESTS:
            answer = self.answer(request)
            self.assertEqual(json.loads(json.dumps(answer, allow_nan=False)), answer, request)
