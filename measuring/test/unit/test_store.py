"""
Tests for ``measuring.server.jobs.store``: the job database (real SQLite in a temporary folder), the
state directory's lock, and ``JobStore`` refusing to start on a state directory another server
holds.
"""

from __future__ import annotations

import os
import sqlite3
import stat
from contextlib import closing
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from measuring.server.jobs.store import JobDatabase, JobStore, StateLocked, lock_state_dir
from measuring.server.threads import Synchronous

SPEC = {"paths": {"directory": "/srv/data", "base": "/srv/data/a.parquet", "file": "/srv/w.py"}}
NOW = 1_800_000_000.0


def record(
    job: str, state: str = "queued", submitted: float = NOW, **fields: Any
) -> dict[str, Any]:
    """A job record as ``Job.record`` makes it."""
    return {"id": job, "state": state, "spec": SPEC, "submitted": submitted, **fields}


class DatabaseTestCase(SynchronousTestCase):
    """A JobDatabase in a file of the test's own."""

    def setUp(self) -> None:
        self.path = os.path.abspath(self.mktemp()) + ".sqlite"
        self.database = self.open()

    def open(self) -> JobDatabase:
        database = JobDatabase(self.path)
        self.addCleanup(database.close)
        return database

    def fetch(self, job: str, database: JobDatabase | None = None) -> dict[str, Any]:
        """The record of ``job``, which must be there."""
        found = (database or self.database).get(job)
        self.assertIsNotNone(found, f"job {job} is not on record")
        assert found is not None
        return found

    def states(self) -> dict[str, str]:
        """Every job on record and its state."""
        return {row["id"]: row["state"] for row in self.database.recent(None, 1000)}


class SchemaTests(DatabaseTestCase):
    """The database is made on first use, in WAL mode, synced on every commit."""

    def test_schemaAndModes(self) -> None:
        """The jobs table exists, the journal is WAL, and commits are fully synced."""
        db = self.database.db
        tables = [row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        self.assertEqual(tables, ["jobs"])
        self.assertEqual(db.execute("PRAGMA journal_mode").fetchone()[0], "wal")
        self.assertEqual(db.execute("PRAGMA synchronous").fetchone()[0], 2)

    def test_onlyPromisesWaitForTheDisk(self) -> None:
        """Adding and ending a job commit synced (FULL); a start noted does not wait (NORMAL)."""
        db = self.database.db
        self.database.add(record("a"))
        self.assertEqual(db.execute("PRAGMA synchronous").fetchone()[0], 2)
        self.database.update("a", synced=False, state="running")
        self.assertEqual(db.execute("PRAGMA synchronous").fetchone()[0], 1)
        self.assertEqual(self.fetch("a")["state"], "running")
        self.database.update("a", state="done")
        self.assertEqual(db.execute("PRAGMA synchronous").fetchone()[0], 2)
        self.assertEqual(self.fetch("a")["state"], "done")

    def test_readableByOwnerOnly(self) -> None:
        """open() makes the database, and SQLite the WAL files beside it, mode 0600 (any umask)."""
        self.addCleanup(os.umask, os.umask(0))
        self.database.open()
        self.database.add(record("a"))
        for suffix in ("", "-wal", "-shm"):
            mode = stat.S_IMODE(os.stat(self.path + suffix).st_mode)
            self.assertEqual(mode, 0o600, f"{self.path}{suffix} is mode {mode:o}")

    def test_reopenKeepsRecords(self) -> None:
        """A record committed is there for another connection, and after the database reopens."""
        self.database.add(record("a"))
        self.assertEqual(self.fetch("a", self.open())["state"], "queued")
        self.database.close()
        self.assertEqual(self.fetch("a", self.open())["spec"], SPEC)
        with closing(sqlite3.connect(self.path)) as plain:
            self.assertEqual(plain.execute("SELECT COUNT(*) FROM jobs").fetchone()[0], 1)


class RecordTests(DatabaseTestCase):
    """Records go in and come back with their JSON fields as JSON."""

    def test_roundTrip(self) -> None:
        """A record added and updated comes back whole, JSON fields decoded, defaults filled."""
        self.database.add(record("a"))
        self.assertEqual(
            self.database.get("a"),
            {
                **record("a"),
                "started": None,
                "finished": None,
                "attempts": 0,
                "interrupted": 0,
                "response": None,
                "error": None,
                "log": "",
                "cleaned": 0,
            },
        )
        response = {"Results": {"peak": {"Kind": "Scalar", "Value": 1.5}}, "Elapsed": 2.0}
        error = {"Code": "Timeout", "Message": "the job ran longer than its limit of 5 s"}
        self.database.update("a", state="done", finished=NOW + 2, response=response, log="hi\n")
        self.database.update("a", error=error)
        got = self.fetch("a")
        self.assertEqual(
            (got["state"], got["finished"], got["response"], got["error"], got["log"]),
            ("done", NOW + 2, response, error, "hi\n"),
        )

    def test_unknownJob(self) -> None:
        """A job that is not on record is None."""
        self.assertIsNone(self.database.get("nope"))

    def test_recent(self) -> None:
        """Jobs come newest first (by time, then id), by state when asked, at most ``limit``."""
        for job, state, submitted in [
            ("a", "done", NOW),
            ("c", "queued", NOW + 1),
            ("b", "queued", NOW + 1),
            ("d", "running", NOW + 2),
        ]:
            self.database.add(record(job, state, submitted, log="long log"))
        self.assertEqual([r["id"] for r in self.database.recent(None, 10)], ["d", "c", "b", "a"])
        self.assertEqual([r["id"] for r in self.database.recent("queued", 10)], ["c", "b"])
        self.assertEqual([r["id"] for r in self.database.recent(None, 2)], ["d", "c"])
        self.assertEqual(self.database.recent("failed", 10), [])
        [first] = self.database.recent(None, 1)
        self.assertEqual(first["spec"], SPEC)
        self.assertNotIn("log", first)
        self.assertNotIn("response", first)


class RecoverTests(DatabaseTestCase):
    """After a start, jobs left running are queued again, or failed after three interruptions."""

    def test_recover(self) -> None:
        """Running jobs are queued and counted interrupted; the third time they fail."""
        self.database.add(record("queued", "queued", NOW - 4))
        self.database.add(record("running", "running", NOW - 5, interrupted=1))
        self.database.add(record("third", "running", NOW - 6, interrupted=2))
        self.database.add(record("done", "done", NOW - 7, finished=NOW - 1))
        queued = self.database.recover(3, NOW)
        self.assertEqual([r["id"] for r in queued], ["running", "queued"])
        self.assertEqual(queued[0]["spec"], SPEC)
        self.assertEqual(
            self.states(),
            {"queued": "queued", "running": "queued", "third": "failed", "done": "done"},
        )
        running, third = self.fetch("running"), self.fetch("third")
        self.assertEqual((running["interrupted"], running["error"]), (2, None))
        self.assertEqual((third["interrupted"], third["finished"]), (3, NOW))
        self.assertEqual(third["error"]["Code"], "JobFailed")
        self.assertIn("interrupted 3 times", third["error"]["Message"])

    def test_recoverTwice(self) -> None:
        """Recovering again, with nothing left running, changes nothing."""
        self.database.add(record("a", "running", NOW))
        self.database.recover(3, NOW)
        self.assertEqual([r["id"] for r in self.database.recover(3, NOW)], ["a"])
        self.assertEqual(self.fetch("a")["interrupted"], 1)


class RetentionTests(DatabaseTestCase):
    """Old finished jobs: their results are noted removed, then the records are deleted."""

    def setUp(self) -> None:
        super().setUp()
        for job, state, finished in [
            ("old", "done", NOW - 100),
            ("old-failed", "failed", NOW - 90),
            ("new", "done", NOW - 10),
            ("running", "running", None),
            ("queued", "queued", None),
        ]:
            self.database.add(record(job, state, NOW - 200, finished=finished))

    def test_expiredResults(self) -> None:
        """Finished jobs that ended before the cutoff and are not cleaned have expired results."""
        expired = self.database.expired_results(NOW - 50)
        self.assertEqual(sorted(r["id"] for r in expired), ["old", "old-failed"])
        self.assertEqual(expired[0]["spec"], SPEC)
        self.database.mark_cleaned(["old"])
        self.assertEqual([r["id"] for r in self.database.expired_results(NOW - 50)], ["old-failed"])
        self.assertEqual(self.fetch("old")["cleaned"], 1)

    def test_sweep(self) -> None:
        """Finished jobs that ended before the cutoff are deleted; others stay."""
        self.assertEqual(self.database.sweep(NOW - 50, cleaned_only=False), 2)
        self.assertEqual(set(self.states()), {"new", "running", "queued"})

    def test_sweepCleanedOnly(self) -> None:
        """With cleaned_only, only jobs whose results were removed are deleted."""
        self.database.mark_cleaned(["old"])
        self.assertEqual(self.database.sweep(NOW - 50, cleaned_only=True), 1)
        self.assertEqual(set(self.states()), {"old-failed", "new", "running", "queued"})


class CounterTests(DatabaseTestCase):
    """Finished jobs by state, in all and recently, and their mean run time."""

    def test_counters(self) -> None:
        """Each end state is counted, in all and since a time; the mean is of their run times."""
        for job, state, started, finished in [
            ("a", "done", NOW - 7200, NOW - 7190),
            ("b", "done", NOW - 100, NOW - 90),
            ("c", "timeout", NOW - 60, NOW),
            ("d", "cancelled", None, NOW - 5),
            ("e", "running", NOW - 3, None),
        ]:
            self.database.add(record(job, state, NOW - 7200, started=started, finished=finished))
        self.assertEqual(
            self.database.counters(NOW - 3600),
            {
                "Total": {"Done": 2, "Failed": 0, "Cancelled": 1, "Timeout": 1},
                "LastHour": {"Done": 1, "Failed": 0, "Cancelled": 1, "Timeout": 1},
                "MeanSeconds": round((10 + 10 + 60) / 3, 3),
            },
        )

    def test_empty(self) -> None:
        """With no finished job, every count is 0 and there is no mean."""
        zero = {"Done": 0, "Failed": 0, "Cancelled": 0, "Timeout": 0}
        self.assertEqual(
            self.database.counters(NOW), {"Total": zero, "LastHour": zero, "MeanSeconds": None}
        )


class LockTests(SynchronousTestCase):
    """One server per state directory."""

    def setUp(self) -> None:
        self.state = os.path.abspath(self.mktemp())
        os.makedirs(self.state)

    def lock(self) -> int:
        fd = lock_state_dir(self.state)
        self.addCleanup(os.close, fd)
        return fd

    def test_lockNamesHolder(self) -> None:
        """The lock file holds the pid; a second lock is refused naming that pid and the folder."""
        self.lock()
        with open(os.path.join(self.state, "lock")) as f:
            self.assertEqual(f.read(), str(os.getpid()))
        error = self.assertRaises(StateLocked, lock_state_dir, self.state)
        self.assertEqual(
            str(error), f"another measuring server (pid {os.getpid()}) uses {self.state}"
        )

    def test_lockFreedWithItsHolder(self) -> None:
        """Once the holder's file is closed (its process ended), the lock can be taken again."""
        os.close(lock_state_dir(self.state))
        self.lock()

    def test_storeTakesLock(self) -> None:
        """A JobStore with a state directory holds its lock once started."""
        store = JobStore(
            JobDatabase(os.path.join(self.state, "jobs.sqlite")), Synchronous(), self.state
        )
        store.privilegedStartService()
        self.addCleanup(os.close, store._lock)  # type: ignore[arg-type]  # held until the process ends
        store.startService()
        self.addCleanup(store.stopService)
        self.assertRaises(StateLocked, lock_state_dir, self.state)

    def test_storeRefusesLockedStateDir(self) -> None:
        """A JobStore on a state directory another server holds exits with one line."""
        self.lock()
        store = JobStore(
            JobDatabase(os.path.join(self.state, "jobs.sqlite")), Synchronous(), self.state
        )
        error = self.assertRaises(SystemExit, store.privilegedStartService)
        self.assertEqual(
            error.code, f"measuring: another measuring server (pid {os.getpid()}) uses {self.state}"
        )
        self.assertNotIn("\n", str(error.code))
