"""
Data roots on object storage (``s3://bucket/prefix``): which paths a request may name inside one,
and a job's results published there complete or not at all.

A URL root is checked by its text alone, as a local root is by its real path: a request's
Directory, Base and File must stay below the root's prefix (no ``..``, no ``.``, no empty or
doubled ``/``), and results go only below ``<Directory>/results/``. Results are written under a
temporary prefix (``results/.<job>.partial/``), then copied to ``results/<job>/`` and the
temporary prefix removed; what an unfinished job left is removed with ``remove_unfinished``. Object
storage has no atomic rename: while a job's results are being copied, ``results/<job>/`` may hold
some of them; the job is recorded done, and its answer names them, only once all are there.

Access goes through fsspec (s3fs for ``s3://``), which takes credentials and the endpoint from
the standard AWS settings of the environment (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_ENDPOINT_URL``, ``AWS_PROFILE``...). Never imports twisted; fsspec is imported only inside the
functions that reach the storage (an optional extra: ``pip install '.[cluster]'``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from measuring.errors import BadRequest, Forbidden
from measuring.messages import STORAGE_MARK
from measuring.wire import RESULTS

#: The object stores a data root may be on.
SCHEMES = ("s3://",)
INSTALL = "pip install 'measuring[cluster]'"


def settings(environ: Mapping[str, str]) -> dict[str, str]:
    """The standard AWS settings of ``environ`` (``AWS_*``): what reaches object storage."""
    return {name: value for name, value in environ.items() if name.startswith("AWS_")}


def worker_environment(roots: tuple[str, ...], environ: Mapping[str, str]) -> dict[str, str]:
    """
    What the template and job processes get when a data root is on object storage: the AWS
    settings of ``environ`` (their formulas may use them too), and the mark by which the
    template loads s3fs; nothing otherwise.
    """
    if not any(map(is_url, roots)):
        return {}
    return {**settings(environ), STORAGE_MARK: "1"}


def is_url(path: str) -> bool:
    """True for a path on object storage (``s3://...``)."""
    return path.startswith(SCHEMES)


def parse_root(value: str) -> str:
    """
    A data root URL made plain (``s3://bucket/prefix``, no trailing ``/``); ValueError saying
    what it must be.
    """
    scheme, _, rest = value.partition("://")
    parts = rest.rstrip("/").split("/")
    if f"{scheme}://" not in SCHEMES or not parts[0]:
        raise ValueError("a folder, or an object-storage URL such as s3://bucket/prefix")
    _plain(parts, value)
    return f"{scheme}://" + "/".join(parts)


def _plain(parts: list[str], value: str) -> None:
    for part in parts:
        if part in ("", ".", ".."):
            raise ValueError(f"a URL without empty, '.' or '..' parts, not {value!r}")
        if "\0" in part or "\\" in part:
            raise ValueError(f"a URL without NUL characters or backslashes, not {value!r}")


def inside_url(url: str, root: str) -> bool:
    """True when ``url`` is ``root`` or lies below it (both plain)."""
    return url == root or url.startswith(root + "/")


def resolve(roots: tuple[str, ...], field: str, name: str, within: str | None = None) -> str:
    """
    The URL a request's ``field`` names: ``name`` itself when it is a URL, else ``name`` below
    ``within`` (the Directory) or the first URL root. Forbidden when it leads outside ``within``
    or every root; BadRequest when it is not a plain path.
    """
    if not name:
        raise BadRequest(f"{field} must not be empty")
    base = within if within is not None else next((r for r in roots if is_url(r)), None)
    if is_url(name):
        url = name.rstrip("/")
    elif base is None:
        raise Forbidden(f"{field} {name!r} is not on the object storage of this server")
    else:
        url = f"{base}/{name.strip('/')}"
    scheme, _, rest = url.partition("://")
    try:
        _plain(rest.split("/"), name)
    except ValueError as e:
        raise Forbidden(f"{field} {name!r} must be a plain path: {e}") from None
    url = f"{scheme}://{rest}"
    if within is not None and not inside_url(url, within):
        raise Forbidden(f"{field} {name!r} leads outside its Directory {within}")
    if not any(inside_url(url, root) for root in roots if is_url(root)):
        raise Forbidden(
            f"{field} {name!r} is outside the data roots of this server ({', '.join(roots)})"
        )
    return url


def available(url: str) -> bool:
    """Whether the packages that reach ``url``'s storage are installed (fsspec, s3fs)."""
    import importlib.util

    needed = ("fsspec", *_DRIVERS.get(url.partition("://")[0], ()))
    return all(importlib.util.find_spec(name) is not None for name in needed)


_DRIVERS = {"s3": ("s3fs",)}


def filesystem(url: str) -> Any:
    """The fsspec file system of ``url`` (credentials and endpoint from the environment)."""
    try:
        import fsspec
    except ImportError:
        raise BadRequest(f"{url} is on object storage, which needs {INSTALL}") from None
    return fsspec.filesystem(url.partition("://")[0])


def data_files(fs: Any, url: str) -> list[str]:
    """
    The data files of a dataset folder on object storage, as URLs, in the order readers take
    them; names starting with ``_`` or ``.`` are skipped (``measuring.files.data_files``).
    """
    from measuring.files import natural_key

    scheme = url.partition("://")[0]
    top = fs._strip_protocol(url).rstrip("/")
    found = []
    for key in fs.find(top):
        relative = key[len(top) + 1 :].split("/")
        if not any(part.startswith(("_", ".")) for part in relative):
            found.append(f"{scheme}://{key}")
    return sorted(found, key=natural_key)


def partial_prefix(directory: str, job: str) -> str:
    """Where a job's results are uploaded before they are published."""
    return f"{directory}/{RESULTS}/.{job}.partial"


def result_prefix(directory: str, job: str) -> str:
    """Where a job's results appear."""
    return f"{directory}/{RESULTS}/{job}"


def publish(local: str, directory: str, job: str) -> list[str]:
    """
    Upload the finished results folder ``local`` to ``<directory>/results/<job>/``: under the
    partial prefix first, then copied over (an earlier run's results replaced), the partial prefix
    removed. Returns the published objects' URLs; on failure nothing of this run is left.
    """
    fs = filesystem(directory)
    partial, final = partial_prefix(directory, job), result_prefix(directory, job)
    uploaded = []
    try:
        for folder, _, names in os.walk(local):
            for name in sorted(names):
                path = os.path.join(folder, name)
                relative = os.path.relpath(path, local).replace(os.sep, "/")
                fs.put_file(path, f"{partial}/{relative}")
                uploaded.append(relative)
        fs.invalidate_cache()
        if fs.exists(final):
            fs.rm(final, recursive=True)
        for relative in uploaded:
            fs.copy(f"{partial}/{relative}", f"{final}/{relative}")
    except BaseException:
        # Once something is uploaded, results/<job>/ may have been emptied or half-copied.
        (remove_unfinished if uploaded else remove_partial)(directory, job)
        raise
    remove_partial(directory, job)
    return [f"{final}/{relative}" for relative in uploaded]


def remove_results(directory: str, job: str) -> None:
    """Remove a job's published results (``--keep-results``)."""
    _remove(result_prefix(directory, job))


def remove_partial(directory: str, job: str) -> None:
    """Remove the temporary prefix a job's results are uploaded under."""
    _remove(partial_prefix(directory, job))


def remove_unfinished(directory: str, job: str) -> None:
    """
    Remove what a job that did not end done left: its temporary prefix, and what it had copied
    to ``results/<job>/`` when it was stopped while publishing (a job killed there runs no
    ``except``). A job's results are its own (its id is unique): a job that runs again publishes
    them anew.
    """
    remove_partial(directory, job)
    _remove(result_prefix(directory, job))


def _remove(prefix: str) -> None:
    fs = filesystem(prefix)
    fs.invalidate_cache()
    if fs.exists(prefix):
        fs.rm(prefix, recursive=True)
