"""
Tests for a damaged job database: ``JobDatabase`` refusing to open one (``PRAGMA quick_check``),
answering for a damaged row without failing the others, and ``measuring-admin recover``
(``jobs.salvage``, ``jobs.pages``) rebuilding one from every row that can still be read.

The databases are real: made by ``JobDatabase``, then damaged the way a disk damages a file,
4 KiB of garbage written over one of their pages.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import sqlite3

from twisted.trial.unittest import SynchronousTestCase

from measuring.errors import Internal
from measuring.server import admin
from measuring.server.jobs import salvage
from measuring.server.jobs.records import Job, JobSpec, new_job_id
from measuring.server.jobs.store import (
    DamagedDatabase,
    JobDatabase,
    JobStore,
    lock_state_dir,
)
from measuring.server.paths import JobPaths
from measuring.server.threads import Synchronous

NOW = 1_800_000_000.0
PAGE = 4096
SPEC = JobSpec(JobPaths("/srv/data", "/srv/data/a.parquet", "/srv/data/work.py"))


def jobs_database(path: str, count: int = 200, log: str = "") -> list[str]:
    """A database of ``count`` jobs (every other one done, with ``log``), closed; their ids."""
    database = JobDatabase(path)
    database.open()
    database.db.execute("PRAGMA synchronous = OFF")  # quick to make; its file is the same
    ids = []
    for n in range(count):
        job = Job(id=new_job_id(NOW + n), spec=SPEC, submitted=NOW + n)
        database.add(job.record())
        if n % 2:
            answer = {"Results": {"total": {"Kind": "Scalar", "Value": n}}}
            database.update(job.id, state="done", finished=NOW + n + 1, log=log, response=answer)
        ids.append(job.id)
    database.close()
    return ids


def garble(path: str, page: int) -> None:
    """Write 4 KiB of garbage over page ``page`` (counted from 1) of the file at ``path``."""
    with open(path, "r+b") as f:
        f.seek((page - 1) * PAGE)
        f.write(bytes(range(256)) * (PAGE // 256))


def readable_ids(path: str, count: int) -> set[str]:
    """The ids SQLite reads, trying every rowid one by one: what must be recovered at least."""
    found = set()
    with contextlib.closing(sqlite3.connect(path)) as db:
        for rowid in range(1, count + 1):
            try:
                row = db.execute("SELECT id FROM jobs WHERE rowid = ?", (rowid,)).fetchone()
            except sqlite3.DatabaseError:
                continue
            if row is not None:
                found.add(row[0])
    return found


def digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


class SalvageTestCase(SynchronousTestCase):
    """A state directory of the test's own, with a job database."""

    def setUp(self) -> None:
        self.state = os.path.abspath(self.mktemp())
        os.makedirs(self.state)
        self.path = os.path.join(self.state, "jobs.sqlite")

    def recovered(self) -> dict[str, dict[str, object]]:
        """The jobs of the state directory's database, by id."""
        database = JobDatabase(self.path)
        self.addCleanup(database.close)
        return {row["id"]: row for row in database.recent(None, 10_000)}

    def admin(self, *argv: str) -> tuple[int, str]:
        """Run measuring-admin; its exit code and what it printed."""
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = admin.main(list(argv))
        return code, out.getvalue() + err.getvalue()


class DamagedAtStartTests(SalvageTestCase):
    """A damaged database is found before the server uses it."""

    def test_quickCheckRefuses(self) -> None:
        """Garbage over a page of the table: opening with the check says what to run."""
        jobs_database(self.path)
        garble(self.path, 10)
        with self.assertRaises(DamagedDatabase) as raised:
            JobDatabase(self.path).open(check=True)
        message = str(raised.exception)
        self.assertIn(f"the job database {self.path} is damaged", message)
        self.assertIn(f"measuring-admin recover {self.state}", message)

    def test_notADatabase(self) -> None:
        """A file that is no SQLite database at all is damaged too."""
        with open(self.path, "wb") as f:
            f.write(b"x" * 2 * PAGE)
        self.assertRaises(DamagedDatabase, JobDatabase(self.path).open)

    def test_storeStopsTheStart(self) -> None:
        """JobStore's start on a damaged database stops the server with that message."""
        jobs_database(self.path)
        garble(self.path, 10)
        store = JobStore(JobDatabase(self.path), Synchronous(), self.state)
        with self.assertRaises(SystemExit) as raised:
            store.startService()
        self.assertIn("measuring-admin recover", str(raised.exception.code))


class DamagedRowTests(SalvageTestCase):
    """A row whose fields cannot be read fails alone."""

    def setUp(self) -> None:
        super().setUp()
        self.ids = jobs_database(self.path, count=4)
        with contextlib.closing(sqlite3.connect(self.path)) as db, db:
            db.execute("UPDATE jobs SET spec = '{\"paths\": [garbled' WHERE id = ?", (self.ids[0],))
        self.database = JobDatabase(self.path)
        self.addCleanup(self.database.close)

    def test_getNamesTheJob(self) -> None:
        """Reading the damaged record is Internal naming the job and what to run."""
        error = self.assertRaises(Internal, self.database.get, self.ids[0])
        self.assertIn(f"the record of job {self.ids[0]} cannot be read", error.message)
        self.assertIn("measuring-admin recover", error.message)
        self.assertEqual((self.database.get(self.ids[1]) or {})["state"], "done")

    def test_recoveryFailsOnlyThatJob(self) -> None:
        """At start the others are queued again; the damaged one fails, saying why."""
        queued = self.database.recover(3, NOW + 1000)
        self.assertEqual([record["id"] for record in queued], [self.ids[2]])
        (state, error) = self.database.db.execute(
            "SELECT state, error FROM jobs WHERE id = ?", (self.ids[0],)
        ).fetchone()
        self.assertEqual(state, "failed")
        self.assertIn("record is damaged", json.loads(error)["Message"])

    def test_listLeavesItOut(self) -> None:
        """Job List lists the jobs it can read."""
        listed = [record["id"] for record in self.database.recent(None, 10)]
        self.assertEqual(sorted(listed), sorted(self.ids[1:]))


class RecoverTests(SalvageTestCase):
    """measuring-admin recover: every readable job into a fresh database, the damaged one kept."""

    def test_damagedLeafPage(self) -> None:
        """Garbage over a page of rows: every other row is back, the damaged file kept as it was."""
        ids = jobs_database(self.path)
        garble(self.path, 10)
        readable = readable_ids(self.path, len(ids))
        damaged_digest = digest(self.path)
        code, said = self.admin("recover", self.state)
        self.assertEqual(code, 0, said)
        back = self.recovered()
        self.assertLess(len(back), len(ids))
        self.assertGreaterEqual(len(back), len(ids) - 40)
        self.assertLessEqual(readable, set(back))
        self.assertIn(f"recovered {len(back)} jobs", said)
        [kept] = [name for name in os.listdir(self.state) if ".damaged-" in name]
        self.assertEqual(digest(os.path.join(self.state, kept)), damaged_digest)
        self.assertIn(kept, said)
        self.assertIsNone(salvage.damage(self.path))
        self.assertEqual(back[ids[1]]["state"], "done")

    def test_damagedRootPage(self) -> None:
        """Garbage over the table's root: SQLite reads no row; the pages give every one."""
        ids = jobs_database(self.path)
        garble(self.path, 2)
        self.assertEqual(readable_ids(self.path, len(ids)), set())
        self.assertEqual(self.admin("recover", self.state)[0], 0)
        self.assertEqual(set(self.recovered()), set(ids))

    def test_rowsOnlyInTheLog(self) -> None:
        """Rows still in the write-ahead log, with logs on overflow pages, are recovered whole."""
        live = os.path.join(self.state, "live.sqlite")
        database = JobDatabase(live)
        database.open()
        self.addCleanup(database.close)
        job = Job(id=new_job_id(NOW), spec=SPEC, submitted=NOW)
        database.add(job.record())
        database.update(job.id, state="done", log="printed " * 20_000, response={"Results": {}})
        for suffix in ("", "-wal"):  # as a crash leaves them: the database open
            shutil.copyfile(live + suffix, self.path + suffix)
        self.assertEqual(len(salvage.page_rows(self.path)), 1)
        self.assertEqual(self.admin("recover", self.state, "--force")[0], 0)
        [(_, record)] = self.recovered().items()
        full = JobDatabase(self.path)
        self.addCleanup(full.close)
        self.assertEqual((full.get(job.id) or {})["log"], "printed " * 20_000)
        self.assertEqual(record["state"], "done")

    def test_unreadableAnswerKeptAsFailed(self) -> None:
        """A finished job whose answer cannot be read comes back failed, saying so."""
        row = {**Job(id="a-job", spec=SPEC, submitted=NOW).record(), "state": "done"}
        row = {**row, "spec": json.dumps(row["spec"]), "response": "{broken", "log": "x"}
        record = salvage.job_row(row)
        assert record is not None
        self.assertEqual(record["state"], "failed")
        self.assertIn("damaged", json.loads(record["error"])["Message"])
        self.assertIsNone(salvage.job_row({**row, "spec": "not json"}))
        self.assertIsNone(salvage.job_row({**row, "state": "exploded"}))

    def test_notDamagedLeftAlone(self) -> None:
        """A sound database is left as it is, unless --force."""
        jobs_database(self.path, count=3)
        before = digest(self.path)
        self.assertEqual(self.admin("recover", self.state), (0, f"{self.path}: not damaged\n"))
        self.assertEqual(digest(self.path), before)

    def test_check(self) -> None:
        """check: exit 0 for a sound database, 1 naming the damage for a damaged one."""
        jobs_database(self.path, count=50)
        self.assertEqual(self.admin("check", self.state)[0], 0)
        garble(self.path, 3)
        code, said = self.admin("check", self.state)
        self.assertEqual(code, 1)
        self.assertIn("damaged", said)

    def test_refusedBesideAServer(self) -> None:
        """While a server holds the state directory, recover refuses and changes nothing."""
        jobs_database(self.path, count=3)
        garble(self.path, 2)
        lock = lock_state_dir(self.state)
        self.addCleanup(os.close, lock)
        code, said = self.admin("recover", self.state)
        self.assertEqual(code, 1)
        self.assertIn("stop it first", said)
        self.assertEqual(sorted(os.listdir(self.state)), ["jobs.sqlite", "lock"])

    def test_noDatabase(self) -> None:
        """A state directory without a job database: exit 1, saying so."""
        code, said = self.admin("recover", self.state)
        self.assertEqual(code, 1)
        self.assertIn("there is no job database", said)
