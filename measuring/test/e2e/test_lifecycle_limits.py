"""
End to end, what bounds a job and what outlives it: time and memory limits, processes a formula
leaves behind, the queue of jobs waiting for a worker, and jobs that outlive a crash or a stop of
the server.

Each test starts the real ``twistd -n measuring`` in its own folder (``support.ServerTestCase``)
and speaks to it over sockets; cleanup checks that every server stopped cleanly and left no process
behind. Formulas that must run for a while wait on marker files, so the tests never sleep longer
than a poll.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sqlite3
import subprocess

from measuring.test.support import FINISHED, STOPPING, ServerTestCase, alive, carrying
from measuring.test.support.servers import _is_guard


class LimitTests(ServerTestCase):
    """Time and memory limits stop a job and all its processes; the server carries on."""

    def test_requestTimeout(self) -> None:
        """A looping formula with "Timeout": 1 ends timeout, and its client gets Code Timeout."""
        server = self.start()
        answer = server.ask(self.dask("spin", Timeout=1))
        self.assertEqual(answer["Error"]["Code"], "Timeout", answer)
        self.assertIn("limit of 1 s", answer["Error"]["Message"])
        status = self.status(server, answer["Job"])
        self.assertEqual(status["State"], "timeout")
        self.assertEqual(status["Error"]["Code"], "Timeout")
        self.assertEqual(self.info(server, "Dask process")["Count"], 0)

    def test_timeoutCappedByServer(self) -> None:
        """A Timeout above --job-timeout is held to --job-timeout."""
        server = self.start("--job-timeout", "2")
        job = self.submit(server, "spin", Timeout=100)
        status = self.wait_for_job(server, job, *FINISHED, patience=STOPPING)
        self.assertEqual((status["State"], status["Error"]["Code"]), ("timeout", "Timeout"))
        self.assertIn("limit of 2 s", status["Error"]["Message"])

    def test_memoryLimit(self) -> None:
        """Memory without end fails the job with MemoryLimit and its size; the server goes on."""
        server = self.start("--job-memory", "300MB")
        answer = server.ask(self.dask("hog"))
        self.assertEqual(answer["Error"]["Code"], "MemoryLimit", answer)
        message = answer["Error"]["Message"]
        self.assertIn("more than its limit of 286 MiB (--job-memory)", message)
        used = re.search(r"used ([\d.]+) (MiB|GiB) of memory", message)
        assert used is not None, message
        self.assertGreater(float(used[1]) * (2**30 if used[2] == "GiB" else 2**20), 300e6)
        status = self.status(server, answer["Job"])
        self.assertEqual((status["State"], status["Error"]["Code"]), ("failed", "MemoryLimit"))
        self.assertEqual(self.info(server, "Status")["State"], "running")
        self.assertEqual(self.info(server, "Dask process")["Count"], 0)


class LeftoverProcessTests(ServerTestCase):
    """Processes a formula starts end with its job."""

    def test_escapedChildrenEnd(self) -> None:
        """Processes a formula left outside its group end with the job; the template remains."""
        server = self.start()
        answer = server.ask(self.dask("escape"))
        self.assertEqual(answer["Status"], "OK", answer)
        children = [int(pid) for pid in answer["Response"]["Results"]["escape"]["Value"].split()]
        self.assertEqual(len(children), 2)
        self.wait_for(lambda: not alive(children), "the formula's sleep 300 ending")
        self.assertEqual(carrying(answer["Job"]), [])

        def only_template() -> bool:
            tree = self.info(server, "All process")["Service"]["Tree"]
            templates = {process["Pid"] for process in tree if process["Role"] == "template"}
            others = set(server.descendants()) - templates
            return len(templates) == 1 and all(_is_guard(pid) for pid in others)

        self.wait_for(only_template, "the server's one process to be its template")


class QueueTests(ServerTestCase):
    """At most --workers jobs run; the others wait in arrival order, up to --max-queued."""

    def test_atMostWorkersRunInArrivalOrder(self) -> None:
        """Five jobs on two workers: at most two run at once, in arrival order, and all end done."""
        server = self.start("--workers", "2")
        self.hold()
        jobs = [self.submit(server, "held")]
        self.wait_started(jobs[0])
        jobs += [self.submit(server, "held") for _ in range(4)]
        self.assertEqual(self.info(server, "Status")["Jobs"], {"Running": 2, "Queued": 3})
        # Release one job at a time, once the next one runs too: starts cannot tie.
        for index, job in enumerate(jobs):
            self.wait_started(*jobs[index : index + 2])
            self.release(job)
            self.assertEqual(self.wait_for_job(server, job, *FINISHED)["State"], "done")
        for job in jobs:
            self.assertEqual(self.status(server, job)["Results"]["held"]["Value"], len(self.frame))

        starts = [self.noted(job, "start") or 0.0 for job in jobs]
        ends = [self.noted(job, "end") or 0.0 for job in jobs]
        self.assertEqual(sorted(starts), starts)
        events = sorted([(end, -1) for end in ends] + [(start, 1) for start in starts])
        running = most = 0
        for _, change in events:
            running += change
            most = max(most, running)
        self.assertEqual(most, 2)

    def test_busyBeyondMaxQueued(self) -> None:
        """With one job running and --max-queued 1 waiting, a new job gets Busy at once."""
        server = self.start("--workers", "1", "--max-queued", "1")
        self.hold()
        running = self.submit(server, "held")
        self.wait_started(running)
        queued = self.submit(server, "held")
        answer = server.ask(self.dask("total", Async=True))
        self.assertEqual((answer["Status"], answer["Error"]["Code"]), ("Error", "Busy"), answer)
        self.assertIn("--max-queued 1", answer["Error"]["Message"])
        self.assertEqual(self.info(server, "Status")["Jobs"], {"Running": 1, "Queued": 1})
        listed = server.ask({"Header": "Job", "Request": "List"})["Response"]["Jobs"]
        self.assertEqual([job["Job"] for job in listed], [queued, running])


class DurabilityTests(ServerTestCase):
    """Accepted jobs outlive a crash or a stop of the server."""

    def test_jobsSurviveKill(self) -> None:
        """After kill -9 the next server runs every job to done, the interrupted one twice."""
        server = self.start("--workers", "1")
        self.hold()
        jobs = [self.submit(server, "held", "mean_by_sensor") for _ in range(3)]
        self.wait_started(jobs[0])
        self.assertEqual(self.status(server, jobs[1])["State"], "queued")
        self.crash(server)
        self.release_all()

        server = self.start("--workers", "1")
        for job in jobs:
            status = self.wait_for_job(server, job, *FINISHED)
            self.assertEqual(status["State"], "done", status)
            self.assertEqual(status["Results"]["held"]["Value"], len(self.frame))
            self.assert_means(status["Results"])
        attempts = [self.status(server, job)["Attempts"] for job in jobs]
        self.assertEqual(attempts, [2, 1, 1])
        self.assertEqual(sorted(os.listdir(os.path.join(self.folder, "results"))), sorted(jobs))

    def test_stopRequeuesRunningJob(self) -> None:
        """SIGTERM stops the server after the grace; the next server runs the running job again."""
        server = self.start("--workers", "1", "--stop-grace", "1")
        self.hold()
        job = self.submit(server, "held")
        self.wait_started(job)
        workers = server.descendants()
        server.process.send_signal(signal.SIGTERM)
        try:
            code = server.process.wait(STOPPING)
        except subprocess.TimeoutExpired:
            self.fail(f"the server did not stop within {STOPPING:g} s of SIGTERM")
        self.assertIn(code, (0, -signal.SIGTERM))
        self.wait_for(lambda: not alive(workers), "the workers ending with the server")
        self.assertEqual(self.recorded(job), ("queued", 1))
        self.release_all()

        server = self.start("--workers", "1")
        status = self.wait_for_job(server, job, *FINISHED)
        self.assertEqual((status["State"], status["Attempts"]), ("done", 2), status)
        self.assertEqual(status["Results"]["held"]["Value"], len(self.frame))

    def recorded(self, job: str) -> tuple[str, int]:
        """A job's state and attempts in the job database, read while no server runs."""
        path = os.path.join(self.folder, ".measuring", "jobs.sqlite")
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            row = db.execute("SELECT state, attempts FROM jobs WHERE id = ?", (job,)).fetchone()
        return (row[0], row[1])
