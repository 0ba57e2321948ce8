"""
After a job process has ended: its results put in place and its temporary folders removed.

``finish_job`` blocks (it moves and removes files): the pool runs it in a thread. Nothing here
signals a process; the job's process tree was ended by its own process (or by the pool).
"""

from __future__ import annotations

import shutil

from measuring.messages import job_tmp
from measuring.server import results


def finish_job(
    job: str, directory: str, tmp: str | None, outbox: str | None, place: bool
) -> str | None:
    """
    With ``place``, move the results from ``outbox`` (a sandboxed job's one writable folder) into
    the job's ``directory``; remove the job's temporary folder in ``tmp`` and the outbox. Returns
    what went wrong placing the results, or None.
    """
    problem = None
    if place and outbox is not None:
        try:
            results.place_results(outbox, directory, job)
        except Exception as e:
            problem = f"{type(e).__name__}: {e}"
    if tmp:
        shutil.rmtree(job_tmp(tmp, job), ignore_errors=True)
    if outbox is not None:
        shutil.rmtree(outbox, ignore_errors=True)
    return problem
