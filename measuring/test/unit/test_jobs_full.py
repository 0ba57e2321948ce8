"""
Tests for job records the disk refuses (``measuring.server.jobs.journal`` in the scheduler): a
record that cannot be written is kept and retried until it is, the job is answered for from
memory meanwhile, new jobs are refused naming the full state directory, the trouble is logged
once; an outcome kept beside the results is recorded at the next start.

The database is the real one; it is made "full" the way SQLite itself is, with ``PRAGMA
max_page_count`` at its current size: every write that needs a new page fails with
``SQLITE_FULL`` ("database or disk is full"), as on a full disk. Time is a ``task.Clock``.
"""

from __future__ import annotations

import json
import os
import sqlite3
from typing import Any

from twisted.internet import defer
from twisted.logger import capturedLogs, formatEvent

from measuring.errors import Busy
from measuring.server.jobs import outcomes
from measuring.server.jobs.journal import RETRY_EVERY, Journal
from measuring.server.jobs.queries import JobQueries
from measuring.server.jobs.records import Job, new_job_id
from measuring.server.jobs.scheduler import Scheduler
from measuring.server.jobs.store import JobDatabase, JobStore
from measuring.server.threads import Synchronous
from measuring.test.support.fakes import limits
from measuring.test.unit.test_jobs import NOW, TIMEOUT, JobsTestCase

#: What the formulas of a job print: more than fits in the pages the database has.
CHATTY = "x" * 200_000
STATE_DIR = "/srv/measuring/state"


class FullDiskTestCase(JobsTestCase):
    """A manager on a database that can be filled and emptied."""

    def full_manager(self, **overrides: Any) -> Scheduler:
        """A started manager whose database the test fills (``fill``) and frees (``free``)."""
        # The first refused write of a run is logged with its traceback, on purpose.
        self.addCleanup(self.flushLoggedErrors, sqlite3.OperationalError)
        self.database = JobDatabase(self.path)
        self.addCleanup(self.database.close)
        store = JobStore(self.database, Synchronous())
        held = limits(**{"workers": 1, "job_timeout": TIMEOUT, **overrides})
        manager = Scheduler(
            self.pool, store, self.clock, held, self.blocking,
            journal=Journal(store, self.clock, STATE_DIR),
        )  # fmt: skip
        manager.startService()
        self.queries = JobQueries(manager, store, self.clock, self.blocking, held)
        return manager

    def fill(self) -> None:
        """No page more for the database: writes that grow it fail with SQLITE_FULL."""
        (pages,) = self.database.db.execute("PRAGMA page_count").fetchone()
        self.database.db.execute(f"PRAGMA max_page_count = {pages}")

    def free(self) -> None:
        self.database.db.execute("PRAGMA max_page_count = 1073741823")

    def finished_while_full(self, manager: Scheduler) -> tuple[Job, defer.Deferred[Any]]:
        """A job that ends (printing much) once the database is full; its end, as waited for."""
        job = self.submit(manager)
        self.fill()
        ended = job.when_finished()
        self.pool.runs[0].print(CHATTY)
        self.pool.runs[0].succeed({"total": {"Kind": "Scalar", "Value": 1}})
        return job, ended


class RefusedRecordTests(FullDiskTestCase):
    """A finished job whose record the disk refuses."""

    def test_answeredFromMemoryMeanwhile(self) -> None:
        """Waiters are told; Status and Job Status agree (done, none running); disk: running."""
        manager = self.full_manager()
        job, ended = self.finished_while_full(manager)
        response = self.successResultOf(ended).response or {}
        self.assertEqual(response["Results"]["total"]["Value"], 1)
        self.assertEqual(self.on_disk(job.id)["state"], "running")
        self.assertEqual(self.successResultOf(self.queries.status(job.id))["State"], "done")
        self.assertEqual(manager.counts(), {"Running": 0, "Queued": 0})
        self.assertEqual(self.successResultOf(manager.cancel(job.id)), "done")
        self.assertEqual(self.successResultOf(self.queries.log(job.id)), CHATTY)
        listed = self.successResultOf(self.queries.recent(None, 10))
        self.assertEqual([(j["Job"], j["State"]) for j in listed], [(job.id, "done")])

    def test_retriedUntilWritten(self) -> None:
        """Once there is room again, the record is written, and the kept outcome removed."""
        manager = self.full_manager()
        job, _ = self.finished_while_full(manager)
        kept = outcomes.outcome_file(self.directory, job.id)
        self.assertTrue(os.path.exists(kept), "the outcome was not kept beside the results")
        self.clock.advance(RETRY_EVERY * 3)
        self.assertEqual(self.on_disk(job.id)["state"], "running")
        self.free()
        self.clock.advance(RETRY_EVERY)
        record = self.on_disk(job.id)
        self.assertEqual((record["state"], record["log"]), ("done", CHATTY))
        self.assertFalse(os.path.exists(kept))
        self.assertEqual(self.successResultOf(self.queries.status(job.id))["State"], "done")

    def test_newJobsRefusedNamingTheDisk(self) -> None:
        """While a record waits, a new job is refused Busy naming the full state directory."""
        manager = self.full_manager()
        self.finished_while_full(manager)
        error = self.assertRaises(Busy, manager.submit, self.spec)
        self.assertIn(f"state directory {STATE_DIR} is full", error.message)
        self.assertIn("database or disk is full", error.message)
        self.free()
        self.clock.advance(RETRY_EVERY)
        self.submit(manager)

    def test_newJobRefusedWhenItsRecordIsRefused(self) -> None:
        """A job whose own record cannot be written is refused Busy, naming the full disk."""
        manager = self.full_manager()
        self.fill()
        spec = self.spec.__class__(self.spec.paths, functions=("a" * 100_000,))
        failure = self.failureResultOf(manager.submit(spec), Busy)
        self.assertIn("is full", failure.value.message)
        self.assertEqual(manager.counts(), {"Running": 0, "Queued": 0})
        self.free()
        self.submit(manager)

    def test_loggedOnce(self) -> None:
        """However many records wait and retries fail, one line says so, and one its end."""
        manager = self.full_manager(workers=3)
        with capturedLogs() as events:
            jobs = [self.submit(manager) for _ in range(3)]
            self.fill()
            for running in self.pool.runs:
                running.print(CHATTY)
                running.succeed()
            self.clock.advance(RETRY_EVERY * 10)
            self.free()
            self.clock.advance(RETRY_EVERY)
        lines = [formatEvent(event) for event in events]
        trouble = [line for line in lines if "cannot write job records" in line]
        self.assertEqual(len(trouble), 1, lines)
        self.assertIn(STATE_DIR, trouble[0])
        self.assertEqual(len([line for line in lines if "written in" in line]), 1, lines)
        self.assertEqual([self.on_disk(job.id)["state"] for job in jobs], ["done"] * 3)

    def test_stopDoesNotWaitForTheDisk(self) -> None:
        """A stop while a record waits ends at once; the outcome stays beside the results."""
        manager = self.full_manager()
        job, _ = self.finished_while_full(manager)
        self.successResultOf(manager.stopService())
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertTrue(os.path.exists(outcomes.outcome_file(self.directory, job.id)))


class KeptOutcomeTests(FullDiskTestCase):
    """At start, a job whose outcome was kept beside its results is recorded, not run again."""

    def test_recordedAtStart(self) -> None:
        """A job left running with a kept outcome ends as the outcome says, without running."""
        job = Job(id=new_job_id(NOW - 60), spec=self.spec, submitted=NOW - 60, state="running")
        job.started, job.attempts = NOW - 50, 1
        self.disk.add(job.record())
        ended = {**job.record(), "state": "done", "finished": NOW - 10, "log": "printed",
                 "response": {"Results": {"total": {"Kind": "Scalar", "Value": 7}}}}  # fmt: skip
        outcomes.keep(self.directory, job.id, ended)
        self.full_manager()
        self.assertEqual(self.pool.started(), [])
        record = self.on_disk(job.id)
        self.assertEqual(
            (record["state"], record["finished"], record["log"], record["attempts"]),
            ("done", NOW - 10, "printed", 1),
        )
        self.assertEqual(record["response"]["Results"]["total"]["Value"], 7)
        self.assertFalse(os.path.exists(outcomes.outcome_file(self.directory, job.id)))
        status = self.successResultOf(self.queries.status(job.id))
        self.assertEqual((status["State"], status["Results"]["total"]["Value"]), ("done", 7))

    def test_unreadableOutcomeIgnored(self) -> None:
        """A kept outcome that cannot be read does not stop the job from running again."""
        job = Job(id=new_job_id(NOW - 60), spec=self.spec, submitted=NOW - 60, state="queued")
        self.disk.add(job.record())
        os.makedirs(os.path.join(self.directory, "results"))
        with open(outcomes.outcome_file(self.directory, job.id), "w") as f:
            f.write(json.dumps({"state": "done"})[:-3])
        self.full_manager()
        self.assertEqual(self.pool.started(), [job.id])
