"""
Files in: where a job's paths lead, and reading its Parquet dataset (``results`` writes out).

Path resolution (``resolve_job``) runs in the server before a job is accepted; reading runs in
the worker process. Nothing here imports the reactor; dask and pandas are imported only by the
functions that read, so the server never loads them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from measuring import storage
from measuring.errors import BadRequest, Forbidden, NotFound
from measuring.files import inside
from measuring.wire import RESULTS


@dataclass(frozen=True)
class JobPaths:
    """
    A job's real, absolute paths (or URLs, on object storage), each checked to lie inside the
    data roots.
    """

    directory: str
    base: str
    #: None for formulas sent with the request (``Code``).
    file: str | None
    #: A formula file on object storage, as read when the job was submitted: the job carries it
    #: as Code (``JobSpec.code``), so its worker needs nothing more.
    source: str | None = None


def _checked_text(field: str, value: str) -> str:
    if not value:
        raise BadRequest(f"{field} must not be empty")
    if "\0" in value:
        raise BadRequest(f"{field} must not contain a NUL character")
    return value


def resolve_directory(roots: tuple[str, ...], directory: str, private: tuple[str, ...] = ()) -> str:
    """
    The real path of ``Directory``: absolute inside a root, or relative to the first root; never
    inside one of the server's ``private`` folders (its state directory), and writable.
    """
    _checked_text("Directory", directory)
    real = os.path.realpath(os.path.join(roots[0], directory))
    if not any(inside(real, root) for root in roots):
        raise Forbidden(
            f"Directory {directory!r} is outside the data roots of this server ({', '.join(roots)})"
        )
    _not_private("Directory", directory, real, private)
    if not os.path.isdir(real):
        raise NotFound(f"Directory {directory!r} does not exist (looked for {real})")
    if not os.access(real, os.W_OK | os.X_OK):
        raise Forbidden(f"Directory {directory!r} is not writable by the server")
    return real


def resolve_inside(directory: str, field: str, name: str, is_kind: Callable[[str], bool]) -> str:
    """The real path of ``name`` (Base or File), which must exist inside ``directory``."""
    _checked_text(field, name)
    real = os.path.realpath(os.path.join(directory, name))
    if not inside(real, directory):
        raise Forbidden(f"{field} {name!r} leads outside its Directory {directory}")
    if not os.path.exists(real):
        raise NotFound(f"{field} {name!r} was not found in {directory}")
    if not is_kind(real):
        raise BadRequest(f"{field} {name!r} in {directory} is not a {_KINDS[field]}")
    return real


_KINDS = {"Base": "Parquet file or folder", "File": "file"}


def _not_private(field: str, name: str, real: str, private: tuple[str, ...]) -> None:
    if any(inside(real, folder) for folder in private):
        raise Forbidden(f"{field} {name!r} is in the server's own state directory")


def resolve_job(
    roots: tuple[str, ...],
    directory: str,
    base: str,
    file: str | None,
    private: tuple[str, ...] = (),
) -> JobPaths:
    """Check a Dask request's paths; raises BadRequest, Forbidden or NotFound naming the field."""
    _checked_text("Directory", directory)
    if storage.is_url(directory) or (storage.is_url(roots[0]) and not os.path.isabs(directory)):
        return resolve_stored(roots, directory, base, file)
    real_directory = resolve_directory(roots, directory, private)
    results = os.path.realpath(os.path.join(real_directory, RESULTS))
    if not inside(results, real_directory):
        raise Forbidden(f"{real_directory}/{RESULTS} leads outside its Directory")
    if os.path.exists(results) and not os.path.isdir(results):
        raise BadRequest(f"{real_directory}/{RESULTS} exists and is not a folder; results go there")
    _not_private("Directory", f"{directory}/{RESULTS}", results, private)
    paths = JobPaths(
        directory=real_directory,
        base=resolve_inside(
            real_directory, "Base", base, lambda p: os.path.isfile(p) or os.path.isdir(p)
        ),
        file=resolve_inside(real_directory, "File", file, os.path.isfile)
        if file is not None
        else None,
    )
    _not_private("Base", base, paths.base, private)
    if file is not None and paths.file is not None:
        _not_private("File", file, paths.file, private)
    return paths


def resolve_stored(roots: tuple[str, ...], directory: str, base: str, file: str | None) -> JobPaths:
    """``resolve_job`` for a Directory on object storage: the same rules, through fsspec."""
    url = storage.resolve(roots, "Directory", directory)
    fs = storage.filesystem(url)
    fs.invalidate_cache()
    if not fs.isdir(url):
        raise NotFound(f"Directory {directory!r} does not exist (looked for {url})")
    if fs.isfile(f"{url}/{RESULTS}"):
        raise BadRequest(f"{url}/{RESULTS} exists and is not a folder; results go there")
    return JobPaths(
        directory=url,
        base=_stored_inside(fs, roots, url, "Base", base, lambda p: fs.exists(p)),
        file=_stored_inside(fs, roots, url, "File", file, fs.isfile) if file is not None else None,
    )


def _stored_inside(
    fs: Any, roots: tuple[str, ...], directory: str, field: str, name: str, is_kind: Any
) -> str:
    _checked_text(field, name)
    url = storage.resolve(roots, field, name, directory)
    if not fs.exists(url):
        raise NotFound(f"{field} {name!r} was not found in {directory}")
    if not is_kind(url):
        raise BadRequest(f"{field} {name!r} in {directory} is not a {_KINDS[field]}")
    return url
