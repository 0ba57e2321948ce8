"""
End to end, the server's own files: what a server that died left in ``<state>/tmp`` is removed at
the next start; a state directory on a small real file system (a tmpfs) that fills up loses no
accepted job, runs none twice, and says so once; a damaged job database stops the start, saying
what to run, and ``measuring-admin recover`` brings its jobs back; a damaged row fails alone.

Each test starts the real ``twistd -n measuring`` (``support.ServerTestCase``).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
import sys

from measuring.local import environment
from measuring.server.jobs.records import Job, JobSpec, new_job_id
from measuring.server.jobs.store import JobDatabase
from measuring.server.paths import JobPaths
from measuring.server.pool.process import LOG_BYTES
from measuring.test.support import (
    BASE,
    FINISHED,
    LIFECYCLE_FORMULAS,
    Server,
    ServerTestCase,
    run_twistd,
)
from measuring.test.support.filesystems import fill, mount_tmpfs

#: ``chatty`` waits like ``held``, then prints 200 KB: more than the log keeps of it.
CHATTY_FORMULAS = (
    LIFECYCLE_FORMULAS
    + """

def chatty(df):
    rows = held(df)
    print("x" * 200_000)
    return rows
"""
)


class StartSweepTests(ServerTestCase):
    """The start removes what earlier servers left in the workers' temporary folder."""

    def test_leftoverFoldersRemoved(self) -> None:
        """Job folders, warm-up folders and outboxes left in <state>/tmp are gone after a start."""
        tmp = os.path.join(self.folder, ".measuring", "tmp")
        left = ["job-20260101-000000-abcdef", "measuring-warm-k2j4h1", "worker-0123abcd"]
        for name in left:
            os.makedirs(os.path.join(tmp, name))
            with open(os.path.join(tmp, name, "warm.parquet"), "wb") as f:
                f.write(b"left by a server that was killed")
        kept = os.path.join(tmp, "not-ours")
        os.makedirs(kept)
        server = self.start()
        server.wait_until_ready()
        self.wait_for(
            lambda: not any(os.path.exists(os.path.join(tmp, name)) for name in left),
            lambda: f"the leftovers to go (still there: {sorted(os.listdir(tmp))})",
        )
        self.assertTrue(os.path.isdir(kept), "a folder the server did not make was removed")


class FullStateDirTests(ServerTestCase):
    """The state directory on an 8 MiB tmpfs, filled while jobs run."""

    formulas = {"lifecycle.py": CHATTY_FORMULAS}

    def setUp(self) -> None:
        super().setUp()
        self.state = mount_tmpfs(self, os.path.join(self.folder, "state"), "8m")

    def start_on_tmpfs(self) -> Server:
        return self.start("--state-dir", self.state, "--workers", "2")

    def jobs_ended_while_full(self, server: Server) -> list[str]:
        """Four held jobs; the disk filled; then they end (each printing 200 KB)."""
        self.hold()
        server.wait_until_ready()
        jobs = [self.submit(server, "chatty") for _ in range(4)]
        self.wait_started(*jobs[:2])
        server.wait_until_ready()  # the replacements are warm before the disk fills
        self.filler = fill(self.state)
        self.release_all()
        for job in jobs:
            self.wait_for_job(server, job, "done", "failed")
        return jobs

    def test_nothingLostNothingTwice(self) -> None:
        """Jobs ending on a full disk: answered, refused new ones, logged once, recorded later."""
        server = self.start_on_tmpfs()
        jobs = self.jobs_ended_while_full(server)
        statuses = [self.status(server, job) for job in jobs]
        self.assertEqual([status["State"] for status in statuses], ["done"] * 4, statuses)
        counts = self.info(server, "Status")["Jobs"]
        self.assertEqual(counts, {"Running": 0, "Queued": 0})
        cancel = self.job(server, "Cancel", jobs[0])
        self.assertEqual(cancel["Response"], {"State": "done"}, cancel)
        refused = server.ask(self.dask("total", Async=True))
        self.assertEqual(refused["Error"]["Code"], "Busy", refused)
        self.assertIn(f"state directory {self.state} is full", refused["Error"]["Message"])
        self.assertEqual(server.log().count("cannot write job records"), 1, server.log())
        log = self.job(server, "Log", jobs[0])["Response"]["Log"]
        self.assertLess(len(log), LOG_BYTES + 100)
        self.assertIn("bytes cut ...]", log)

        os.remove(self.filler)
        self.wait_for(lambda: "job records are written in" in server.log(), "records written")
        server.stop()
        again = self.start_on_tmpfs()
        for job, before in zip(jobs, statuses, strict=True):
            after = self.status(again, job)
            self.assertEqual((after["State"], after["Attempts"]), (before["State"], 1), after)
        self.assertNotIn("queued from before the last stop", again.log())
        left = [name for name in os.listdir(os.path.join(self.state, "tmp")) if "job-" in name]
        self.assertEqual(left, [])
        self.assertEqual([job for job in jobs if os.path.exists(f"/tmp/job-{job}")], [])

    def test_killedWhileFull(self) -> None:
        """Killed while records wait, the server's next start records the jobs, runs none again."""
        server = self.start_on_tmpfs()
        jobs = self.jobs_ended_while_full(server)
        self.assertEqual([self.status(server, job)["State"] for job in jobs], ["done"] * 4)
        self.crash(server)
        os.remove(self.filler)
        again = self.start_on_tmpfs()
        for job in jobs:
            after = self.status(again, job)
            self.assertEqual((after["State"], after["Attempts"]), ("done", 1), after)
            self.assertIn(f"job {job} ended done before the last stop", again.log())


def measuring_admin(*arguments: str) -> subprocess.CompletedProcess[str]:
    """Run ``measuring-admin arguments`` (the console script beside this Python, or the module)."""
    script = os.path.join(os.path.dirname(sys.executable), "measuring-admin")
    command = (
        [script] if os.access(script, os.X_OK) else [sys.executable, "-m", "measuring.server.admin"]
    )
    return subprocess.run(
        [*command, *arguments], env=environment(), capture_output=True, text=True, timeout=300
    )


class DamagedDatabaseTests(ServerTestCase):
    """jobs.sqlite damaged as a disk damages it: garbage over a page, or over one row."""

    def setUp(self) -> None:
        super().setUp()
        self.state = os.path.join(self.folder, ".measuring")
        os.makedirs(self.state)
        self.path = os.path.join(self.state, "jobs.sqlite")

    def queued(self, count: int) -> list[str]:
        """``count`` queued jobs of lifecycle.py's "total", as a server left them."""
        spec = JobSpec(
            JobPaths(
                self.folder,
                os.path.join(self.folder, BASE),
                os.path.join(self.folder, "lifecycle.py"),
            ),
            functions=("total",),
        )
        database = JobDatabase(self.path)
        database.open()
        ids = []
        with contextlib.closing(database.db):
            for n in range(count):
                job = Job(
                    id=new_job_id(1_800_000_000.0 + n), spec=spec, submitted=1_800_000_000.0 + n
                )
                database.add(job.record())
                ids.append(job.id)
        return ids

    def test_damagedPageStopsTheStartThenRecovered(self) -> None:
        """200 queued jobs, 4 KiB of garbage mid-file: no start; recovered, the jobs run."""
        ids = self.queued(200)
        size = os.path.getsize(self.path)
        with open(self.path, "r+b") as f:
            f.seek(size // 2 // 4096 * 4096)
            f.write(os.urandom(4096))
        refused = run_twistd(self.folder, "--state-dir", self.state, "--data-root", self.folder,
                             "--port", "tcp:0:interface=127.0.0.1")  # fmt: skip
        said = refused.stdout + refused.stderr
        self.assertEqual(refused.returncode, 1, said)
        self.assertIn(f"the job database {self.path} is damaged", said)
        self.assertIn(f"measuring-admin recover {self.state}", said)

        recovered = measuring_admin("recover", self.state)
        self.assertEqual(recovered.returncode, 0, recovered.stdout + recovered.stderr)
        self.assertIn("the damaged database is kept as", recovered.stdout)
        self.assertEqual(len([n for n in os.listdir(self.state) if ".damaged-" in n]), 1)

        server = self.start()
        listed = self.job(server, "List", "", Limit=1000)["Response"]["Jobs"]
        back = {job["Job"] for job in listed}
        self.assertGreaterEqual(len(back), 150)
        self.assertLessEqual(back, set(ids))
        self.assertIn(f"recovered {len(back)} jobs", recovered.stdout)
        first = min(back)
        self.assertEqual(self.wait_for_job(server, first, *FINISHED)["State"], "done")

    def test_damagedRowFailsAlone(self) -> None:
        """A queued job whose record is garbled fails, Job Status naming it; the others run."""
        damaged, *others = self.queued(3)
        with contextlib.closing(sqlite3.connect(self.path)) as db, db:
            db.execute("UPDATE jobs SET spec = ? WHERE id = ?", ("\x00garbage{", damaged))
        server = self.start()
        for job in others:
            self.assertEqual(self.wait_for_job(server, job, *FINISHED)["State"], "done")
        answer = self.job(server, "Status", damaged)
        self.assertEqual((answer["Error"]["Code"], answer["Job"]), ("Internal", damaged), answer)
        self.assertIn(f"the record of job {damaged} cannot be read", answer["Error"]["Message"])
        self.assertIn("measuring-admin recover", answer["Error"]["Message"])
        new = self.submit(server, "total")
        self.assertEqual(self.wait_for_job(server, new, *FINISHED)["State"], "done")
