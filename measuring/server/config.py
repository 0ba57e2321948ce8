"""
The server's settings: defaults, overridden by a TOML file (``--config``), overridden by flags.

Every setting is validated here and a bad one raises ``usage.UsageError`` with one line that names
the setting and where it came from. Nothing here starts anything; the only side effect is creating
the state directory, so that an unusable one stops the start instead of the first job.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from twisted.python.usage import UsageError

from measuring.server.access import beyond_loopback, load_tokens
from measuring.wire import DEFAULT_ENDPOINT

SANDBOXES = ("none", "bwrap")


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
    max_queued: int = 100
    keep_jobs: float = 30.0
    keep_results: float | None = None
    stop_grace: float = 30.0
    tokens: tuple[str, ...] = field(default=(), repr=False)
    token_file: str | None = None
    insecure_no_token: bool = False
    idle_timeout: float = 300.0
    max_connections: int = 1000
    max_result_bytes: int = 10 * 2**30
    max_job_processes: int | None = None
    sandbox: str = "none"


_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*")
_UNITS = {"": 1, "b": 1}
for _exponent, _letter in enumerate("kmgt", start=1):
    _UNITS[_letter] = _UNITS[_letter + "b"] = 1000**_exponent
    _UNITS[_letter + "i"] = _UNITS[_letter + "ib"] = 1024**_exponent


def parse_size(value: object) -> int:
    """
    Bytes from a number or a string such as ``"1MiB"``, ``"512 kB"`` or ``"4GB"``.

    Units follow Dask's convention: kB/MB/GB are powers of 1000, KiB/MiB/GiB powers of 1024.
    """
    if isinstance(value, bool):
        raise ValueError("a size, not true/false")
    if isinstance(value, int):
        return value
    match = _SIZE.fullmatch(str(value))
    if match is None or match.group(2).lower() not in _UNITS:
        raise ValueError("a size such as 1048576, 512KiB or 4GB")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def _whole(minimum: int, maximum: int | None = None) -> Callable[[object], int]:
    what = f"a whole number of at least {minimum}" + (
        f" and at most {maximum}" if maximum is not None else ""
    )

    def parse(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ValueError(what)
        try:
            number = int(value)
        except ValueError:
            raise ValueError(what) from None
        if number < minimum or (maximum is not None and number > maximum):
            raise ValueError(what)
        return number

    return parse


def _whole_or_none(minimum: int) -> Callable[[object], int | None]:
    whole = _whole(minimum)

    def parse(value: object) -> int | None:
        if isinstance(value, str) and value.strip().lower() == "none":
            return None
        try:
            return whole(value)
        except ValueError:
            raise ValueError(f"a whole number of at least {minimum}, or none") from None

    return parse


def _amount(unit: str, zero: bool = False) -> Callable[[object], float]:
    """A number of ``unit`` (seconds, days): more than 0, or at least 0 with ``zero``."""
    what = f"a number of {unit} {'of at least 0' if zero else 'greater than 0'}"

    def parse(value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise ValueError(what)
        try:
            amount = float(value)
        except ValueError:
            raise ValueError(what) from None
        if not (amount >= 0 if zero else amount > 0) or amount == float("inf"):
            raise ValueError(what)
        return amount

    return parse


def _memory(value: object) -> int | str | None:
    """``auto``, ``none``, or a size of at least 64 MiB."""
    if isinstance(value, str) and value.strip().lower() in ("auto", "none"):
        return None if value.strip().lower() == "none" else "auto"
    try:
        size = parse_size(value)
    except ValueError:
        raise ValueError("a size such as 4GB, or auto, or none") from None
    if size < 64 * 2**20:
        raise ValueError("at least 64MiB (or auto, or none)")
    return size


def _flag(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if value in (0, 1):
        return bool(value)
    raise ValueError("true or false")


def _result_bytes(value: object) -> int:
    size = parse_size(value)
    if size < 2**20:
        raise ValueError("at least 1MiB")
    return size


def _sandbox(value: object) -> str:
    if value not in SANDBOXES:
        raise ValueError(f"one of {', '.join(SANDBOXES)}")
    return str(value)


def _request_bytes(value: object) -> int:
    size = parse_size(value)
    if size < 1024:
        raise ValueError("at least 1024 bytes")
    return size


def _text(value: object) -> str:
    if not isinstance(value, str) or not value or "\0" in value:
        raise ValueError("a non-empty string")
    return value


def _texts(value: object) -> list[str]:
    """A repeatable setting: one string or a list of them."""
    values = value if isinstance(value, list) else [value]
    if not values:
        raise ValueError("at least one value")
    return [_text(one) for one in values]


_PARSERS: dict[str, Callable[[object], Any]] = {
    "port": _texts,
    "data-root": _texts,
    "state-dir": _text,
    "workers": _whole(1, 256),
    "job-timeout": _amount("seconds"),
    "max-request-bytes": _request_bytes,
    "job-memory": _memory,
    "max-queued": _whole(1),
    "keep-jobs": _amount("days"),
    "keep-results": _amount("days"),
    "stop-grace": _amount("seconds", zero=True),
    "token-file": _text,
    "insecure-no-token": _flag,
    "idle-timeout": _amount("seconds"),
    "max-connections": _whole(1),
    "max-result-bytes": _result_bytes,
    "max-job-processes": _whole_or_none(1),
    "sandbox": _sandbox,
}

SETTINGS = tuple(_PARSERS)


def _defaults(environ: Mapping[str, str], cwd: str) -> dict[str, Any]:
    return {
        "port": [DEFAULT_ENDPOINT],
        "data-root": [cwd],
        "state-dir": environ.get("STATE_DIRECTORY", "").split(":")[0]
        or os.path.join(cwd, ".measuring"),
        "workers": 2,
        "job-timeout": 3600.0,
        "max-request-bytes": 1024 * 1024,
        "job-memory": "auto",
        "max-queued": 100,
        "keep-jobs": 30.0,
        "keep-results": None,
        "stop-grace": 30.0,
        "token-file": None,
        "insecure-no-token": False,
        "idle-timeout": 300.0,
        "max-connections": 1000,
        "max-result-bytes": 10 * 2**30,
        "max-job-processes": None,
        "sandbox": "none",
    }


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
    real = _real(path, cwd)
    if not os.path.isdir(real):
        raise UsageError(f"{source} {path!r} is not an existing folder")
    return real


def _state_dir(path: str, cwd: str, source: str) -> str:
    real = _real(path, cwd)
    try:
        # The server's own: job records and logs, workers' temporary files. Not for others.
        os.makedirs(os.path.join(real, "tmp"), mode=0o700, exist_ok=True)
    except OSError as e:
        raise UsageError(f"{source}: cannot create {path!r}: {e.strerror}") from None
    if not os.access(real, os.W_OK | os.X_OK):
        raise UsageError(f"{source} {path!r} is not writable by this user")
    with contextlib.suppress(OSError):  # best effort: it may belong to someone else
        os.chmod(real, 0o700)
    return real


def load(
    flags: Mapping[str, object],
    config_file: str | None,
    check_endpoint: Callable[[str], object],
    environ: Mapping[str, str] = os.environ,
    cwd: str | None = None,
) -> Config:
    """
    Settle the settings: defaults, then ``config_file``, then ``flags`` (only those given).

    ``check_endpoint`` parses one endpoint description and raises on a bad one. Every error
    names where the bad value came from: the flag, the file and key, or the environment.
    """
    cwd = os.getcwd() if cwd is None else cwd
    settings = _defaults(environ, cwd)
    sources = {name: f"--{name}" for name in settings}
    if environ.get("STATE_DIRECTORY"):
        sources["state-dir"] = "$STATE_DIRECTORY"
    if config_file is not None:
        file_settings = _read_file(config_file)
        _parsed(file_settings, lambda name: f"{config_file}: {name}", settings, sources)
    _parsed(flags, lambda name: f"--{name}", settings, sources)

    filenos: dict[str, int | None] = {}
    for description in settings["port"]:
        try:
            endpoint = check_endpoint(description)
        except Exception as e:
            raise UsageError(
                f"{sources['port']} {description!r} is not a usable endpoint: {e}"
            ) from None
        # An adopted socket (systemd:) knows its descriptor: the one to check for exposure.
        filenos[description] = getattr(endpoint, "fileno", None)

    tokens = _tokens(settings, sources, cwd, filenos)
    if settings["sandbox"] == "bwrap" and shutil.which("bwrap") is None:
        raise UsageError(
            f"{sources['sandbox']} bwrap needs bubblewrap, which is not installed "
            f"(apt install bubblewrap)"
        )

    roots = [_data_root(path, cwd, sources["data-root"]) for path in settings["data-root"]]
    return Config(
        ports=tuple(settings["port"]),
        data_roots=tuple(dict.fromkeys(roots)),
        state_dir=_state_dir(settings["state-dir"], cwd, sources["state-dir"]),
        workers=settings["workers"],
        job_timeout=settings["job-timeout"],
        max_request_bytes=settings["max-request-bytes"],
        job_memory=_job_memory(settings["job-memory"], settings["workers"]),
        max_queued=settings["max-queued"],
        keep_jobs=settings["keep-jobs"],
        keep_results=settings["keep-results"],
        stop_grace=settings["stop-grace"],
        tokens=tokens,
        token_file=_real(settings["token-file"], cwd) if settings["token-file"] else None,
        insecure_no_token=settings["insecure-no-token"],
        idle_timeout=settings["idle-timeout"],
        max_connections=settings["max-connections"],
        max_result_bytes=settings["max-result-bytes"],
        max_job_processes=settings["max-job-processes"],
        sandbox=settings["sandbox"],
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
    exposed = [port for port in settings["port"] if beyond_loopback(port, filenos.get(port))]
    if exposed and not tokens and not settings["insecure-no-token"]:
        raise UsageError(
            f"{sources['port']} {exposed[0]!r} can be reached from other machines, and no "
            f"--token-file is set: anyone reaching it could run code here. Set --token-file, "
            f"listen on 127.0.0.1, or give --insecure-no-token if you really mean it"
        )
    return tokens


def _job_memory(setting: int | str | None, workers: int) -> int | None:
    """``auto``: an equal share, per running job, of 80 % of this machine's memory."""
    if setting != "auto":
        return setting if isinstance(setting, int) else None
    import psutil

    return int(psutil.virtual_memory().total * 0.8 / workers)
