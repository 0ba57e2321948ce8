"""
Where a job's files lie, how its results folder is published complete or not at all, and which
files of a dataset folder hold its data.

Shared by the worker (which writes results) and the server (which places a sandboxed worker's
results, removes what an unfinished job left, and checks and reads datasets). For a Directory on
object storage, ``remove_partial`` and ``result_entry`` defer to ``measuring.storage``. Standard
library only.
"""

from __future__ import annotations

import os
import re
import shutil

from measuring import storage
from measuring.errors import Forbidden
from measuring.wire import OUTPUTS, RESULTS


def inside(path: str, folder: str) -> bool:
    """True when the real path ``path`` is ``folder`` or lies below it (both real and absolute)."""
    return os.path.commonpath([path, folder]) == folder


def natural_key(path: str) -> list[str | int]:
    """Sort key putting ``part.2`` before ``part.10``, as Dask's readers order a folder's files."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path)]


def data_files(folder: str) -> list[str]:
    """
    The data files of a dataset folder (a folder of Parquet parts), below it at any depth, in the
    order readers take them; names starting with ``_`` or ``.`` are skipped, as pyarrow does.
    """
    found = []
    for where, folders, names in os.walk(folder):
        folders[:] = [name for name in folders if not name.startswith(("_", "."))]
        found += [os.path.join(where, name) for name in names if not name.startswith(("_", "."))]
    return sorted(found, key=natural_key)


def partial_dir(directory: str, job: str) -> str:
    """Where a job's results are written before they appear under their final name."""
    return os.path.join(directory, RESULTS, f".{job}.partial")


def result_file(job: str, name: str, output: str) -> str:
    """Where a formula's table is, relative to the job's Directory: results/<job>/<name>.<ext>."""
    return os.path.join(RESULTS, job, name + OUTPUTS[output])


def result_entry(directory: str, job: str, name: str, output: str) -> str:
    """
    What a job's answer names a formula's table by: its path relative to the Directory, or, on
    object storage, its URL.
    """
    relative = result_file(job, name, output)
    return f"{directory}/{relative}" if storage.is_url(directory) else relative


def result_dir(directory: str, job: str) -> str:
    """Where a job's results appear, complete."""
    return os.path.join(directory, RESULTS, job)


def _old_dir(directory: str, job: str) -> str:
    return os.path.join(directory, RESULTS, f".{job}.old")


def remove_partial(directory: str, job: str) -> None:
    """Remove what a job that did not finish left half-written or half-replaced."""
    if storage.is_url(directory):
        storage.remove_unfinished(directory, job)
        return
    shutil.rmtree(partial_dir(directory, job), ignore_errors=True)
    shutil.rmtree(_old_dir(directory, job), ignore_errors=True)


def fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def results_folder(directory: str) -> str:
    """``<directory>/results``, made if missing, checked to stay inside ``directory``."""
    results = os.path.join(directory, RESULTS)
    os.makedirs(results, exist_ok=True)
    if not inside(os.path.realpath(results), os.path.realpath(directory)):
        raise Forbidden(f"{results} leads outside its Directory")
    return results


def publish(directory: str, job: str) -> None:
    """Give the synced partial folder of ``job`` its final name, replacing an earlier run's."""
    partial, final = partial_dir(directory, job), result_dir(directory, job)
    fsync(partial)
    if os.path.exists(final):
        old = _old_dir(directory, job)
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        os.rename(partial, final)
        shutil.rmtree(old)
    else:
        os.rename(partial, final)
    fsync(os.path.join(directory, RESULTS))
