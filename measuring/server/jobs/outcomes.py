"""
How a job ended, kept beside its results while the job database cannot take it.

When the record of a job's end cannot be written (a full state directory), its fields are kept in
``<Directory>/results/.<job>.outcome.json`` until they are: a server that stops or dies meanwhile
finds them at its next start and records the job as it ended, instead of running it again. Runs
in the server's threads (blocking file calls); standard library only.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any

from measuring import files, storage
from measuring.wire import RESULTS

#: The fields of a job's record that its outcome sets.
FIELDS = ("state", "started", "finished", "attempts", "response", "error", "log")


def outcome_file(directory: str, job: str) -> str:
    """Where the outcome of ``job`` waits for the database."""
    return os.path.join(directory, RESULTS, f".{job}.outcome.json")


def keep(directory: str, job: str, fields: dict[str, Any]) -> None:
    """Write the fields of a job's last record beside its results, complete or not at all."""
    if storage.is_url(directory):  # no atomic rename there: the record alone tells
        raise OSError(f"an outcome is not kept on object storage ({directory})")
    path = outcome_file(directory, job)
    files.results_folder(directory)
    partial = path + ".partial"
    try:
        with open(partial, "w", encoding="utf-8") as f:
            json.dump(fields, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(partial)
        raise


def take(directory: str, job: str) -> dict[str, Any] | None:
    """The kept outcome of ``job``, or None when there is none (or it cannot be read)."""
    if storage.is_url(directory):
        return None
    try:
        with open(outcome_file(directory, job), encoding="utf-8") as f:
            fields = json.load(f)
    except (OSError, ValueError):
        return None
    return fields if isinstance(fields, dict) and "state" in fields else None


def forget(directory: str, job: str) -> None:
    """Remove the kept outcome of ``job``: its record is written."""
    if storage.is_url(directory):
        return
    with contextlib.suppress(FileNotFoundError):
        os.remove(outcome_file(directory, job))
