"""
A damaged job database rebuilt: every job SQLite can still read, copied into a fresh database,
the damaged files kept beside it (``measuring-admin recover``, which runs ``recover``).

The damaged files are copied first and only the copies are read, so what is kept is exactly what
was found. Rows are read two ways, as ``sqlite3``'s ``.recover`` does (Debian 12's sqlite3 lacks
the ``sqlite_dbpage`` table its ``.recover`` needs): by SQLite, one by one, stepping over damaged
pages (``readable_rows``), and straight from every intact page (``pages``), which finds the rows
below a damaged interior page too. A row becomes a job again only if its id, state, request and
time can be read; a finished job whose answer cannot be read is kept as failed, saying so.
Blocking; never imports the reactor: run it with no server on the state directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from measuring import files
from measuring.server.jobs.pages import table_rows
from measuring.server.jobs.store import COLUMNS, JSON_FIELDS, JobDatabase
from measuring.wire import FINISHED, STATES

DATABASE = "jobs.sqlite"
#: The largest rowid SQLite gives (2**63 - 1): where the search for readable rows ends.
LAST_ROWID = 2**63 - 1
DAMAGED_ANSWER = {
    "Code": "Internal",
    "Message": "the job's record was damaged; measuring-admin recover kept what could be read",
}


@dataclass
class Salvage:
    """What ``recover`` found and did."""

    kept: str = ""
    jobs: int = 0
    waiting: int = 0
    unreadable: int = 0
    sources: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """What to tell the operator."""
        return (
            f"recovered {self.jobs} jobs ({self.waiting} queued or running, which run at the next "
            f"start; the others finished) with {' and '.join(self.sources)}; {self.unreadable} "
            f"damaged rows could not be made into jobs; the damaged database is kept as "
            f"{self.kept}"
        )


def damage(path: str) -> str | None:
    """What ``PRAGMA quick_check`` says is wrong with the database at ``path``, or None."""
    try:
        with contextlib.closing(sqlite3.connect(path)) as db:
            problems = [row[0] for row in db.execute("PRAGMA quick_check")]
    except sqlite3.DatabaseError as e:
        return str(e)
    return None if problems == ["ok"] else "; ".join(problems[:5])


def _seek(db: sqlite3.Connection, after: int) -> int | None:
    """The first rowid above ``after`` (None: there is none); DatabaseError on a damaged page."""
    row = db.execute(
        "SELECT rowid FROM jobs WHERE rowid > ? ORDER BY rowid LIMIT 1", (after,)
    ).fetchone()
    return None if row is None else int(row[0])


def _past_damage(db: sqlite3.Connection, failed: int) -> tuple[int, int | None]:
    """
    Seeking from ``failed`` hit a damaged page: the smallest seek start beyond it that works
    (found by doubling, then halving the gap), and what that seek gives.
    """
    gap = 1
    while failed + gap < LAST_ROWID:
        try:
            found = _seek(db, failed + gap)
        except sqlite3.DatabaseError:
            failed, gap = failed + gap, gap * 2
            continue
        low, high = failed, failed + gap  # seeks from low fail, from high work
        while high - low > 1:
            middle = (low + high) // 2
            try:
                found, high = _seek(db, middle), middle
            except sqlite3.DatabaseError:
                low = middle
        return high, found
    return LAST_ROWID, None


def _read(db: sqlite3.Connection, rowid: int) -> dict[str, Any] | None:
    """The row ``rowid``, or None when there is none or it cannot be read."""
    try:
        row = db.execute("SELECT * FROM jobs WHERE rowid = ?", (rowid,)).fetchone()
    except sqlite3.DatabaseError:
        return None  # on a damaged page, or its overflow pages are
    return dict(row) if row is not None else None


def readable_rows(path: str) -> Iterator[dict[str, Any]]:
    """Every row of the jobs table SQLite can read at ``path``, stepping over damaged pages."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.row_factory = sqlite3.Row
        after = 0
        while True:
            try:
                rowid = _seek(db, after)
            except sqlite3.DatabaseError:
                after, rowid = _past_damage(db, after)
                # Seeking past ``after - 1`` failed, from ``after`` it works: ``after`` itself
                # may be a row no seek reaches (the first of a page after the damaged one).
                row = _read(db, after)
                if row is not None:
                    yield row
            if rowid is None:
                return
            after = rowid
            row = _read(db, rowid)
            if row is not None:
                yield row


def page_rows(path: str) -> list[dict[str, Any]]:
    """The job rows read straight from the pages of the file at ``path`` (``pages``)."""
    return [dict(zip(COLUMNS, values, strict=True)) for values in table_rows(path, len(COLUMNS))]


def job_row(row: dict[str, Any]) -> dict[str, Any] | None:
    """``row`` as a job record of the fresh database, or None when it cannot be one."""
    try:
        record: dict[str, Any] = {name: row.get(name) for name in COLUMNS}
        spec = json.loads(record["spec"])
        if not (
            isinstance(record["id"], str)
            and record["state"] in STATES
            and isinstance(spec, dict)
            and isinstance(spec.get("paths"), dict)
            and isinstance(record["submitted"], int | float)
        ):
            return None
    except (TypeError, ValueError):
        return None
    for name in JSON_FIELDS[1:]:
        try:
            if record[name] is not None:
                json.loads(record[name])
        except (TypeError, ValueError):
            record[name] = None
            if record["state"] in FINISHED:
                record["state"], record["error"] = "failed", json.dumps(DAMAGED_ANSWER)
    record["log"] = record["log"] if isinstance(record["log"], str) else ""
    for name, default in (("attempts", 0), ("interrupted", 0), ("cleaned", 0)):
        if not isinstance(record[name], int):
            record[name] = default
    return record


def recover(state_dir: str, now: float | None = None) -> Salvage:
    """
    Rebuild ``state_dir``'s job database from what can be read of it; the damaged files are
    renamed ``jobs.sqlite.damaged-<time>`` (with their ``-wal``). Run it with no server running.
    """
    path = os.path.join(state_dir, DATABASE)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now))
    salvage = Salvage(kept=f"{path}.damaged-{stamp}")
    with tempfile.TemporaryDirectory(prefix="measuring-recover-", dir=state_dir) as scratch:
        copy = os.path.join(scratch, DATABASE)
        for suffix in ("", "-wal"):
            if os.path.exists(path + suffix):
                shutil.copyfile(path + suffix, copy + suffix)
        rows: dict[str, dict[str, Any]] = {}
        # The pages first (the file as found), then SQLite's reading, which wins where both read.
        for source, found in (
            ("pages read directly", page_rows(copy)),
            ("SQLite reading row by row", list(readable_rows(copy))),
        ):
            if found:
                salvage.sources.append(source)
            unusable = 0
            for row in found:
                record = job_row(row)
                if record is None:
                    unusable += 1
                else:
                    rows[record["id"]] = record
            salvage.unreadable = max(salvage.unreadable, unusable)
        salvage.sources = salvage.sources or ["nothing readable"]
        fresh = os.path.join(scratch, "fresh.sqlite")
        database = JobDatabase(fresh)
        database.open()
        try:
            database.insert_raw(list(rows.values()))
        finally:
            database.close()
        for suffix in ("-wal", "-shm", ""):
            if os.path.exists(path + suffix):
                os.rename(path + suffix, salvage.kept + suffix)
        os.rename(fresh, path)
        files.fsync(state_dir)
    salvage.jobs = len(rows)
    salvage.waiting = sum(record["state"] not in FINISHED for record in rows.values())
    return salvage
