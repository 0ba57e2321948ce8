"""
Job records on disk: an SQLite database in the state directory, in WAL mode.

``JobDatabase`` is the database itself; its methods block and run in the one thread of
``JobStore``, which hands out Deferreds to the reactor thread. A record the server answers for
(a job accepted, a job ended) is committed and synced first, so it survives a crash or a power
loss. What no promise rests on is committed without waiting for the disk (``note``): a job's
start (an interrupted job is queued again at the next start whatever its record says), the
retention sweeps (done again at the next one); the next synced commit takes it to disk too. The
store also holds the state directory's lock, so two servers never share one.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.application.service import Service
from twisted.internet import defer

from measuring.server.threads import Runner
from measuring.wire import FINISHED

T = TypeVar("T")

JSON_FIELDS = ("spec", "response", "error")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id          TEXT PRIMARY KEY,
    state       TEXT NOT NULL,
    spec        TEXT NOT NULL,
    submitted   REAL NOT NULL,
    started     REAL,
    finished    REAL,
    attempts    INTEGER NOT NULL DEFAULT 0,
    interrupted INTEGER NOT NULL DEFAULT 0,
    response    TEXT,
    error       TEXT,
    log         TEXT NOT NULL DEFAULT '',
    cleaned     INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, submitted);
CREATE INDEX IF NOT EXISTS jobs_by_submitted ON jobs (submitted);
"""

Record = dict[str, Any]


def _row(row: sqlite3.Row | None) -> Record | None:
    if row is None:
        return None
    record = dict(row)
    for field in JSON_FIELDS:
        if record[field] is not None:
            record[field] = json.loads(record[field])
    return record


def _json(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def _encoded(fields: Record) -> Record:
    """Fields as the table keeps them: the JSON ones as text."""
    return {
        key: json.dumps(value) if key in JSON_FIELDS and value is not None else value
        for key, value in fields.items()
    }


class JobDatabase:
    """The jobs table. Blocking: use it from one thread only (``JobStore`` does)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None
        self._synced: bool | None = None

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            self.open()
        assert self._db is not None
        return self._db

    def open(self) -> None:
        """Open (or create, readable by this user only) the database, in WAL mode, synced."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        os.close(fd)
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._synced = None
        self._sync(True)
        self._db.executescript(_SCHEMA)

    def _sync(self, synced: bool) -> None:
        """Let the next commits wait for the disk (FULL), or not (NORMAL: synced at checkpoints)."""
        if synced != self._synced:
            self.db.execute(f"PRAGMA synchronous={'FULL' if synced else 'NORMAL'}")
            self._synced = synced

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def add(self, record: Record) -> None:
        """Insert a new job record."""
        values = _encoded(record)
        names = ", ".join(values)
        marks = ", ".join(f":{name}" for name in values)
        self._sync(True)
        with self.db:
            self.db.execute(f"INSERT INTO jobs ({names}) VALUES ({marks})", values)

    def update(self, job: str, synced: bool = True, **fields: Any) -> None:
        """Change some fields of a job record; committed to disk unless not ``synced``."""
        values = _encoded(fields)
        assignments = ", ".join(f"{name} = :{name}" for name in values)
        self._sync(synced)
        with self.db:
            self.db.execute(f"UPDATE jobs SET {assignments} WHERE id = :id", {**values, "id": job})

    def get(self, job: str) -> Record | None:
        return _row(self.db.execute("SELECT * FROM jobs WHERE id = ?", (job,)).fetchone())

    def recent(self, state: str | None, limit: int) -> list[Record]:
        """Jobs, newest first, without their logs and answers (with their errors)."""
        query = "SELECT id, state, spec, submitted, started, finished, attempts, error FROM jobs"
        rows = self.db.execute(
            query
            + (" WHERE state = ?" if state else "")
            + " ORDER BY submitted DESC, id DESC LIMIT ?",
            (state, limit) if state else (limit,),
        ).fetchall()
        return [
            {**dict(row), "spec": json.loads(row["spec"]), "error": _json(row["error"])}
            for row in rows
        ]

    def recover(self, most_interruptions: int, now: float) -> list[Record]:
        """
        After a start: a job left ``running`` was interrupted; it is queued again, or failed once
        it has been interrupted ``most_interruptions`` times. Returns the queued jobs, oldest first.
        """
        with self.db:
            self.db.execute(
                "UPDATE jobs SET state = 'queued', interrupted = interrupted + 1 "
                "WHERE state = 'running'"
            )
            self.db.execute(
                "UPDATE jobs SET state = 'failed', finished = ?, error = ? "
                "WHERE state = 'queued' AND interrupted >= ?",
                (
                    now,
                    json.dumps(
                        {
                            "Code": "JobFailed",
                            "Message": f"the job was interrupted {most_interruptions} times by "
                            f"the server ending while it ran; it is not run again",
                        }
                    ),
                    most_interruptions,
                ),
            )
        rows = self.db.execute(
            "SELECT * FROM jobs WHERE state = 'queued' ORDER BY submitted, id"
        ).fetchall()
        return [record for record in map(_row, rows) if record is not None]

    def expired_results(self, before: float) -> list[Record]:
        """Finished jobs that ended before ``before`` and whose results are still on disk."""
        marks = ", ".join("?" for _ in FINISHED)
        rows = self.db.execute(
            f"SELECT id, spec FROM jobs WHERE state IN ({marks}) AND finished < ? AND cleaned = 0",
            (*FINISHED, before),
        ).fetchall()
        return [{"id": row["id"], "spec": json.loads(row["spec"])} for row in rows]

    def mark_cleaned(self, jobs: list[str]) -> None:
        """Note that these jobs' results were removed."""
        self._sync(False)
        with self.db:
            self.db.executemany(
                "UPDATE jobs SET cleaned = 1 WHERE id = ?", [(job,) for job in jobs]
            )

    def sweep(self, before: float, cleaned_only: bool) -> int:
        """Delete the finished jobs that ended before ``before``; returns how many."""
        marks = ", ".join("?" for _ in FINISHED)
        where = f"state IN ({marks}) AND finished < ?" + (
            " AND cleaned = 1" if cleaned_only else ""
        )
        self._sync(False)
        with self.db:
            return self.db.execute(f"DELETE FROM jobs WHERE {where}", (*FINISHED, before)).rowcount

    def counters(self, since: float) -> dict[str, Any]:
        """Finished jobs by state, in all and since ``since``, and their mean run time."""
        totals = {state: 0 for state in FINISHED}
        recent = dict(totals)
        for state, count, newer in self.db.execute(
            "SELECT state, COUNT(*), SUM(finished >= ?) FROM jobs GROUP BY state", (since,)
        ):
            if state in totals:
                totals[state], recent[state] = count, newer or 0
        (mean,) = self.db.execute(
            "SELECT AVG(finished - started) FROM jobs WHERE state IN ('done', 'failed', "
            "'timeout', 'cancelled') AND started IS NOT NULL"
        ).fetchone()
        return {
            "Total": {state.capitalize(): n for state, n in totals.items()},
            "LastHour": {state.capitalize(): n for state, n in recent.items()},
            "MeanSeconds": round(mean, 3) if mean is not None else None,
        }


class StateLocked(Exception):
    """Another server holds the state directory."""


def lock_state_dir(state_dir: str) -> int:
    """
    Take the state directory's lock for this process (held until it exits); returns its fd.

    Raises StateLocked naming the other server's pid when one holds it.
    """
    path = os.path.join(state_dir, "lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise StateLocked(f"another measuring server (pid {holder}) uses {state_dir}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    os.set_inheritable(fd, False)
    return fd


class JobStore(Service):
    """The job database for the reactor thread: every call runs in the store's own thread."""

    def __init__(self, database: JobDatabase, runner: Runner, state_dir: str | None = None) -> None:
        self._database = database
        self._runner = runner
        self._state_dir = state_dir
        self._lock: int | None = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        if self._state_dir is not None and self._lock is None:
            try:
                self._lock = lock_state_dir(self._state_dir)
            except StateLocked as e:
                raise SystemExit(f"measuring: {e}") from None
            # Open it now (a quick local file), so that a start without a usable database fails.
            try:
                self._database.open()
            except (sqlite3.Error, OSError) as e:
                raise SystemExit(
                    f"measuring: cannot open the job database {self._database.path}: {e}"
                ) from None

    def startService(self) -> None:
        if self._lock is None:
            self.privilegedStartService()
        super().startService()

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        return self._call(self._database.close)

    def _call(self, f: Callable[..., T], *args: Any) -> defer.Deferred[T]:
        return self._runner.run(f, *args)

    def add(self, record: Record) -> defer.Deferred[None]:
        return self._call(self._database.add, record)

    def update(self, job: str, **fields: Any) -> defer.Deferred[None]:
        """Change some fields of a job record, committed to disk before the Deferred fires."""
        return self._call(lambda: self._database.update(job, **fields))

    def note(self, job: str, **fields: Any) -> defer.Deferred[None]:
        """Change some fields of a job record without waiting for the disk (a crash may lose it)."""
        return self._call(lambda: self._database.update(job, synced=False, **fields))

    def get(self, job: str) -> defer.Deferred[Record | None]:
        return self._call(self._database.get, job)

    def recent(self, state: str | None, limit: int) -> defer.Deferred[list[Record]]:
        return self._call(self._database.recent, state, limit)

    def recover(self, most_interruptions: int, now: float) -> defer.Deferred[list[Record]]:
        return self._call(self._database.recover, most_interruptions, now)

    def expired_results(self, before: float) -> defer.Deferred[list[Record]]:
        return self._call(self._database.expired_results, before)

    def mark_cleaned(self, jobs: list[str]) -> defer.Deferred[None]:
        return self._call(self._database.mark_cleaned, jobs)

    def sweep(self, before: float, cleaned_only: bool) -> defer.Deferred[int]:
        return self._call(self._database.sweep, before, cleaned_only)

    def counters(self, since: float) -> defer.Deferred[dict[str, Any]]:
        return self._call(self._database.counters, since)
