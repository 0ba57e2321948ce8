"""
The server's settings settled: defaults, overridden by a TOML file (``--config``), overridden by
flags. What the settings are is declared once, in ``settings``.

Every setting is validated here and a bad one raises ``usage.UsageError`` with one line that names
the setting and where it came from. Nothing here starts anything; the side effects are creating
the state directory (for the user the server runs as), so that an unusable one stops the start
instead of the first job, and raising the file limit for the connections (``fdlimit``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from twisted.logger import Logger
from twisted.python.usage import UsageError

from measuring import storage
from measuring.server import fdlimit
from measuring.server.access import beyond_loopback, load_tokens
from measuring.server.cluster import checked
from measuring.server.settings import SETTINGS


@dataclass(frozen=True)
class Config:
    """Validated settings; paths are absolute and real (symlinks resolved)."""

    ports: tuple[str, ...]
    data_roots: tuple[str, ...]
    state_dir: str
    workers: int
    job_timeout: float
    max_request_bytes: int
    job_memory: int | None = None
    job_threads: int = 2
    max_queued: int = 100
    keep_jobs: float = 30.0
    keep_results: float | None = None
    stop_grace: float = 30.0
    tokens: tuple[str, ...] = field(default=(), repr=False)
    token_file: str | None = None
    insecure_no_token: bool = False
    idle_timeout: float = 300.0
    max_connections: int = 1000
    first_request_timeout: float = 10.0
    max_client_connections: int = 100
    max_result_bytes: int = 10 * 2**30
    max_job_processes: int | None = None
    sandbox: str = "none"
    http: str | None = None
    log_format: str = "text"
    scheduler: str | None = None
    scheduler_ca: str | None = None
    scheduler_cert: str | None = None
    scheduler_key: str | None = None
    scheduler_timeout: float = 10.0


_PARSERS: dict[str, Callable[[object], Any]] = {s.name: s.parse for s in SETTINGS}


def _defaults(environ: Mapping[str, str], cwd: str) -> dict[str, Any]:
    return {setting.name: setting.default_for(environ, cwd) for setting in SETTINGS}


def _read_file(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            table = tomllib.load(f)
    except OSError as e:
        raise UsageError(f"--config: cannot read {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{path}: not valid TOML: {e}") from None
    unknown = sorted(set(table) - set(_PARSERS))
    if unknown:
        raise UsageError(
            f"{path}: unknown setting {unknown[0]!r} (known: {', '.join(sorted(_PARSERS))})"
        )
    return table


def _parsed(
    raw: Mapping[str, object],
    where: Callable[[str], str],
    settings: dict[str, Any],
    sources: dict[str, str],
) -> None:
    """Parse ``raw`` into ``settings``, noting in ``sources`` where each value came from."""
    for name, value in raw.items():
        try:
            settings[name] = _PARSERS[name](value)
        except ValueError as e:
            raise UsageError(f"{where(name)} must be {e}, not {value!r}") from None
        sources[name] = where(name)


def _real(path: str, cwd: str) -> str:
    return os.path.realpath(os.path.join(cwd, os.path.expanduser(path)))


def _data_root(path: str, cwd: str, source: str) -> str:
    """A data root: a real, existing folder, or an object-storage URL made plain."""
    if "://" in path:  # any scheme: parse_root says which it must be
        try:
            root = storage.parse_root(path)
        except ValueError as e:
            raise UsageError(f"{source} {path!r} must be {e}") from None
        if not storage.available(root):
            raise UsageError(
                f"{source} {path!r} is on object storage, which needs {storage.INSTALL}"
            )
        return root
    real = _real(path, cwd)
    if not os.path.isdir(real):
        raise UsageError(f"{source} {path!r} is not an existing folder")
    return real


def _state_dir(path: str, cwd: str, source: str, owner: tuple[int, int] | None) -> str:
    """
    The state directory, made if missing. With an ``owner`` (the user and group a server
    started as root runs as, ``--uid``/``--gid``), what is made is given to them, and they must
    be able to write it; what goes inside is made once privileges are dropped.
    """
    real = _real(path, cwd)
    made = []
    folder = real
    while not os.path.exists(folder):
        made.append(folder)
        folder = os.path.dirname(folder)
    try:
        # The server's own: job records and logs, workers' temporary files. Not for others.
        os.makedirs(real, mode=0o700, exist_ok=True)
        if owner is not None:
            for folder in made:
                os.chown(folder, *owner)
    except OSError as e:
        raise UsageError(f"{source}: cannot create {path!r}: {e.strerror}") from None
    if owner is not None and not _writable_by(real, *owner):
        raise UsageError(
            f"{source} {path!r} is not writable by uid {owner[0]}, whom the server runs as "
            f"(--uid): give it to that user (chown)"
        )
    if owner is None and not os.access(real, os.W_OK | os.X_OK):
        raise UsageError(f"{source} {path!r} is not writable by this user")
    with contextlib.suppress(OSError):  # best effort: it may belong to someone else
        os.chmod(real, 0o700)
    return real


def _writable_by(path: str, uid: int, gid: int) -> bool:
    """Whether ``uid`` (in group ``gid``) may make files in the folder ``path`` (mode bits)."""
    info = os.stat(path)
    if info.st_uid == uid:
        return info.st_mode & 0o300 == 0o300
    if info.st_gid == gid:
        return info.st_mode & 0o030 == 0o030
    return info.st_mode & 0o003 == 0o003


def load(
    flags: Mapping[str, object],
    config_file: str | None,
    check_endpoint: Callable[[str], object],
    environ: Mapping[str, str] = os.environ,
    cwd: str | None = None,
    file_limit: fdlimit.FileLimit | None = None,
    owner: tuple[int, int] | None = None,
) -> Config:
    """
    Settle the settings: defaults, then ``config_file``, then ``flags`` (only those given).

    ``check_endpoint`` parses one endpoint description and raises on a bad one. Every error
    names where the bad value came from: the flag, the file and key, or the environment. With
    a ``file_limit`` (this process's), it is raised for ``max-connections``, or that is lowered
    or refused (``fdlimit.fit``). ``owner``: the (uid, gid) a server started as root runs as.
    """
    cwd = os.getcwd() if cwd is None else cwd
    settings = _defaults(environ, cwd)
    sources = {name: f"--{name}" for name in settings}
    if environ.get("STATE_DIRECTORY"):
        sources["state-dir"] = "$STATE_DIRECTORY"
    given = set(flags)
    if config_file is not None:
        file_settings = _read_file(config_file)
        _parsed(file_settings, lambda name: f"{config_file}: {name}", settings, sources)
        given.update(file_settings)
    _parsed(flags, lambda name: f"--{name}", settings, sources)
    if file_limit is not None:
        settings["max-connections"] = _connections(settings, sources, given, file_limit)

    filenos: dict[str, int | None] = {}
    listening = [("port", description) for description in settings["port"]]
    if settings["http"] is not None:
        listening.append(("http", settings["http"]))
    for name, description in listening:
        try:
            endpoint = check_endpoint(description)
        except Exception as e:
            raise UsageError(
                f"{sources[name]} {description!r} is not a usable endpoint: {e}"
            ) from None
        # An adopted socket (systemd:) knows its descriptor: the one to check for exposure.
        filenos[description] = getattr(endpoint, "fileno", None)

    tokens = _tokens(settings, sources, cwd, filenos)
    roots = [_data_root(path, cwd, sources["data-root"]) for path in settings["data-root"]]
    on_storage = [root for root in roots if storage.is_url(root)]
    if settings["sandbox"] == "bwrap" and on_storage:
        raise UsageError(
            f"{sources['sandbox']} bwrap cannot be used with a data root on object storage "
            f"({on_storage[0]}): the sandbox gives jobs no network; use local data roots"
        )
    if settings["sandbox"] == "bwrap" and shutil.which("bwrap") is None:
        raise UsageError(
            f"{sources['sandbox']} bwrap needs bubblewrap, which is not installed "
            f"(apt install bubblewrap)"
        )

    cluster = checked(settings, sources, lambda path: _real(path, cwd))
    return Config(
        ports=tuple(settings["port"]),
        data_roots=tuple(dict.fromkeys(roots)),
        state_dir=_state_dir(settings["state-dir"], cwd, sources["state-dir"], owner),
        workers=settings["workers"],
        job_timeout=settings["job-timeout"],
        max_request_bytes=settings["max-request-bytes"],
        job_memory=_job_memory(settings["job-memory"], settings["workers"]),
        job_threads=_job_threads(settings["job-threads"]),
        max_queued=settings["max-queued"],
        keep_jobs=settings["keep-jobs"],
        keep_results=settings["keep-results"],
        stop_grace=settings["stop-grace"],
        tokens=tokens,
        token_file=_real(settings["token-file"], cwd) if settings["token-file"] else None,
        insecure_no_token=settings["insecure-no-token"],
        idle_timeout=settings["idle-timeout"],
        max_connections=settings["max-connections"],
        first_request_timeout=settings["first-request-timeout"],
        max_client_connections=settings["max-client-connections"],
        max_result_bytes=settings["max-result-bytes"],
        max_job_processes=settings["max-job-processes"],
        sandbox=settings["sandbox"],
        http=settings["http"],
        log_format=settings["log-format"],
        scheduler_timeout=settings["scheduler-timeout"],
        **cluster,
    )


def _tokens(
    settings: dict[str, Any], sources: dict[str, str], cwd: str, filenos: dict[str, int | None]
) -> tuple[str, ...]:
    """The tokens of the token file; refuse to listen beyond loopback without any."""
    tokens: tuple[str, ...] = ()
    if settings["token-file"] is not None:
        path = _real(settings["token-file"], cwd)
        try:
            tokens = load_tokens(path)
        except ValueError as e:
            raise UsageError(f"{sources['token-file']} {settings['token-file']!r}: {e}") from None
    if tokens or settings["insecure-no-token"]:
        return tokens
    exposed = [port for port in settings["port"] if beyond_loopback(port, filenos.get(port))]
    if exposed:
        raise UsageError(
            f"{sources['port']} {exposed[0]!r} can be reached from other machines, and no "
            f"--token-file is set: anyone reaching it could run code here. Set --token-file, "
            f"listen on 127.0.0.1, or give --insecure-no-token if you really mean it"
        )
    http = settings["http"]
    if http is not None and beyond_loopback(http, filenos.get(http)):
        raise UsageError(
            f"{sources['http']} {http!r} can be reached from other machines, and no "
            f"--token-file is set: anyone reaching it could see every job and cancel it. Set "
            f"--token-file, listen on 127.0.0.1, or give --insecure-no-token if you really "
            f"mean it"
        )
    return tokens


def _connections(
    settings: dict[str, Any], sources: dict[str, str], given: set[str], limit: fdlimit.FileLimit
) -> int:
    """``max-connections``, once the file limit holds it (lowered, saying so, if a default)."""
    wanted = settings["max-connections"]
    try:
        connections, lowered = fdlimit.fit(
            wanted, settings["workers"], "max-connections" in given, limit
        )
    except ValueError as e:
        raise UsageError(f"{sources['max-connections']} {wanted}: {e}") from None
    if lowered is not None:
        Logger().warn("{lowered}", lowered=lowered)
    return connections


def _job_threads(setting: int | str) -> int:
    """``auto``: as many threads as this process may run on cores (measured best, even with
    ``--workers`` jobs sharing them: docs/performance.md)."""
    if setting != "auto":
        return int(setting)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _job_memory(setting: int | str | None, workers: int) -> int | None:
    """``auto``: an equal share, per running job, of 80 % of this machine's memory."""
    if setting != "auto":
        return setting if isinstance(setting, int) else None
    import psutil

    return int(psutil.virtual_memory().total * 0.8 / workers)
