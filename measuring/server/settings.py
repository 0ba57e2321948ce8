"""
Every setting of the server, declared once: its name (the flag and the TOML key), how its value
is read, its default, and its help.

twistd's options (``tap.Options``), the keys a ``--config`` file may hold and the defaults
``config.load`` starts from all come from ``SETTINGS``; the README's option table and
``twistd measuring --help`` are checked against it by the tests. A parser takes what a flag or the
file gave and returns the value, or raises ``ValueError`` saying what the value must be ("a whole
number of at least 1"); ``config`` turns that into the one line a user reads. Nothing here
imports the reactor; sizes are read by ``dask.utils.parse_bytes``, which loads no numpy or pandas.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from measuring.wire import DEFAULT_ENDPOINT

SANDBOXES = ("none", "bwrap")
LOG_FORMATS = ("text", "json")
Parser = Callable[[object], Any]


@dataclass(frozen=True)
class Setting:
    """
    One setting. ``default`` is the value itself, or a function of the environment and the
    working directory that gives it; ``shown`` is the default as --help and the README say it.
    """

    name: str
    parse: Parser
    default: Any
    shown: str
    help: str
    metavar: str = ""
    repeatable: bool = False
    switch: bool = False

    @property
    def attribute(self) -> str:
        """The setting's name as a Python identifier (``job-timeout``: ``job_timeout``)."""
        return self.name.replace("-", "_")

    def default_for(self, environ: Mapping[str, str], cwd: str) -> Any:
        """The default where the server starts."""
        return self.default(environ, cwd) if callable(self.default) else self.default

    def usage(self) -> str:
        """The line ``--help`` shows."""
        return f"{self.help} [default: {self.shown}]"


def parse_size(value: object) -> int:
    """
    Bytes from a number or a string such as ``"1MiB"``, ``"512 kB"`` or ``"4GB"``.

    Units follow Dask's convention (``dask.utils.parse_bytes``): kB/MB/GB are powers of 1000,
    KiB/MiB/GiB powers of 1024.
    """
    from dask.utils import parse_bytes

    if isinstance(value, bool):
        raise ValueError("a size, not true/false")
    if isinstance(value, int):
        return value
    if not isinstance(value, str) or not value.strip()[:1].isdigit():
        raise ValueError("a size such as 1048576, 512KiB or 4GB")
    try:
        return int(parse_bytes(value))
    except (ValueError, TypeError, KeyError):
        raise ValueError("a size such as 1048576, 512KiB or 4GB") from None


def _at_least(minimum: int, what: str) -> Parser:
    def parse(value: object) -> int:
        size = parse_size(value)
        if size < minimum:
            raise ValueError(f"at least {what}")
        return size

    return parse


def whole(minimum: int, maximum: int | None = None) -> Parser:
    """A whole number from ``minimum`` (to ``maximum``)."""
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


def _or_none(parse: Parser, what: str) -> Parser:
    """``parse``, or ``none`` for no value."""

    def parse_or_none(value: object) -> Any:
        if isinstance(value, str) and value.strip().lower() == "none":
            return None
        try:
            return parse(value)
        except ValueError:
            raise ValueError(f"{what}, or none") from None

    return parse_or_none


def amount(unit: str, zero: bool = False) -> Parser:
    """A number of ``unit`` (seconds, days): more than 0, or at least 0 with ``zero``."""
    what = f"a number of {unit} {'of at least 0' if zero else 'greater than 0'}"

    def parse(value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise ValueError(what)
        try:
            number = float(value)
        except ValueError:
            raise ValueError(what) from None
        if not (number >= 0 if zero else number > 0) or number == float("inf"):
            raise ValueError(what)
        return number

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


def _threads(value: object) -> int | str:
    """``auto``, or a whole number of threads from 1 to 256."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        return whole(1, 256)(value)
    except ValueError:
        raise ValueError("a whole number of at least 1 and at most 256, or auto") from None


def switch(value: object) -> bool:
    """true or false (a flag on the command line)."""
    if isinstance(value, bool):
        return value
    if value in (0, 1):
        return bool(value)
    raise ValueError("true or false")


def one_of(choices: tuple[str, ...]) -> Parser:
    """One of ``choices``."""

    def parse(value: object) -> str:
        if value not in choices:
            raise ValueError(f"one of {', '.join(choices)}")
        return str(value)

    return parse


def text(value: object) -> str:
    """A non-empty string without NUL."""
    if not isinstance(value, str) or not value or "\0" in value:
        raise ValueError("a non-empty string")
    return value


def texts(value: object) -> list[str]:
    """A repeatable setting: one string or a list of them."""
    values = value if isinstance(value, list) else [value]
    if not values:
        raise ValueError("at least one value")
    return [text(one) for one in values]


def _scheduler(value: object) -> str:
    """A scheduler's address: ``tcp://host:port``, ``tls://host:port``, or ``host:port`` (tcp)."""
    what = "an address such as tcp://scheduler:8786 or tls://scheduler:8786"
    if not isinstance(value, str) or not value.strip() or "\0" in value:
        raise ValueError(what)
    address = value.strip() if "://" in value else "tcp://" + value.strip()
    scheme, _, host = address.partition("://")
    if scheme not in ("tcp", "tls") or not host or host.startswith(":"):
        raise ValueError(what)
    return address


def _state_dir(environ: Mapping[str, str], cwd: str) -> str:
    return environ.get("STATE_DIRECTORY", "").split(":")[0] or os.path.join(cwd, ".measuring")


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "port",
        texts,
        [DEFAULT_ENDPOINT],
        DEFAULT_ENDPOINT,
        "A Twisted endpoint to listen on (tcp:, ssl:, unix:, systemd:); repeatable.",
        "ENDPOINT",
        repeatable=True,
    ),
    Setting(
        "data-root",
        texts,
        lambda environ, cwd: [cwd],
        "the current directory",
        "A folder jobs may read from and write results into, or an object-storage URL "
        "(s3://bucket/prefix; needs pip install 'measuring[cluster]'); repeatable.",
        "DIR",
        repeatable=True,
    ),
    Setting(
        "state-dir",
        text,
        _state_dir,
        "$STATE_DIRECTORY or ./.measuring",
        "Where the server keeps its own files.",
        "DIR",
    ),
    Setting("workers", whole(1, 256), 2, "2", "Jobs running at once; more wait in order.", "N"),
    Setting(
        "job-timeout",
        amount("seconds"),
        3600.0,
        "3600",
        "Longest a job may run, in seconds; then all its processes are stopped.",
        "S",
    ),
    Setting(
        "job-memory",
        _memory,
        "auto",
        "auto: 80 % of the machine's memory shared by --workers",
        "Most memory a job's processes may use together (4GB, auto, none); then they are stopped.",
        "SIZE",
    ),
    Setting(
        "job-threads",
        _threads,
        "auto",
        "auto: the machine's cores",
        "Threads each job computes with; its data is read in partitions sized so that this "
        "many fit in --job-memory.",
        "N",
    ),
    Setting(
        "max-queued",
        whole(1),
        100,
        "100",
        "Jobs that may wait; beyond that a new job gets Busy at once.",
        "N",
    ),
    Setting(
        "keep-jobs",
        amount("days"),
        30.0,
        "30",
        "How long finished jobs and their logs stay on record, in days.",
        "DAYS",
    ),
    Setting(
        "keep-results",
        amount("days"),
        None,
        "never",
        "Remove a finished job's results/<job>/ folder after this many days.",
        "DAYS",
    ),
    Setting(
        "stop-grace",
        amount("seconds", zero=True),
        30.0,
        "30",
        "On SIGTERM, how long running jobs may go on before they are stopped (and queued for "
        "the next start).",
        "S",
    ),
    Setting(
        "max-request-bytes",
        _at_least(1024, "1024 bytes"),
        2**20,
        "1MiB",
        "Largest request accepted (1048576, 512KiB, 1MiB).",
        "N",
    ),
    Setting(
        "token-file",
        text,
        None,
        "none",
        "Secrets, one per line (mode 600); every request must carry one as Token.",
        "FILE",
    ),
    Setting(
        "insecure-no-token",
        switch,
        False,
        "off",
        "Listen beyond loopback without a token (anyone reaching the port runs code).",
        switch=True,
    ),
    Setting(
        "idle-timeout",
        amount("seconds"),
        300.0,
        "300",
        "Close a connection that completes no request for this long (never while its job runs).",
        "S",
    ),
    Setting(
        "first-request-timeout",
        amount("seconds"),
        10.0,
        "10",
        "Close a new connection that sends no request for this long.",
        "S",
    ),
    Setting(
        "max-connections",
        whole(1),
        1000,
        "1000",
        "Connections open at once; then a new one takes the place of one that has sent no "
        "request yet, or is refused with Busy.",
        "N",
    ),
    Setting(
        "max-client-connections",
        whole(1),
        100,
        "100",
        "Connections open at once from one client address (not loopback, not Unix sockets; "
        "a connection that has shown a valid token no longer counts); more are refused with Busy.",
        "N",
    ),
    Setting(
        "max-result-bytes",
        _at_least(2**20, "1MiB"),
        10 * 2**30,
        "10GiB",
        "Most a job's result files may take in all, and any one file a job writes.",
        "SIZE",
    ),
    Setting(
        "max-job-processes",
        _or_none(whole(1), "a whole number of at least 1"),
        None,
        "none",
        "Threads and processes a job may start beyond those its user runs at its start "
        "(RLIMIT_NPROC: user-wide; not for root, nor in the sandbox).",
        "N",
    ),
    Setting(
        "http",
        text,
        None,
        "off",
        "A Twisted endpoint for the dashboard, /metrics and the JSON API over HTTP, e.g. "
        "tcp:8766:interface=127.0.0.1.",
        "ENDPOINT",
    ),
    Setting(
        "log-format",
        one_of(LOG_FORMATS),
        "text",
        "text",
        "text (twistd's lines), or json: one twisted.logger JSON event per line.",
        "text|json",
    ),
    Setting(
        "sandbox",
        one_of(SANDBOXES),
        "none",
        "none",
        "none, or bwrap: each job in a sandbox of its own: the data roots read-only, no "
        "network, its own PIDs.",
        "none|bwrap",
    ),
    Setting(
        "scheduler",
        _scheduler,
        None,
        "none: jobs compute in the server's worker processes",
        "A dask.distributed scheduler (tcp://host:8786, tls://host:8786) whose cluster computes "
        "the jobs (pip install '.[cluster]').",
        "ADDRESS",
    ),
    Setting(
        "scheduler-ca",
        text,
        None,
        "none",
        "The CA certificates a tls:// scheduler's certificate must be signed by (PEM).",
        "FILE",
    ),
    Setting(
        "scheduler-cert",
        text,
        None,
        "none",
        "The certificate the server's jobs show a tls:// scheduler (PEM).",
        "FILE",
    ),
    Setting(
        "scheduler-key",
        text,
        None,
        "none",
        "The private key of --scheduler-cert (PEM); the jobs' processes read it.",
        "FILE",
    ),
    Setting(
        "scheduler-timeout",
        amount("seconds"),
        10.0,
        "10",
        "How long a job tries to reach the scheduler before it fails with Unavailable.",
        "S",
    ),
)

BY_NAME: dict[str, Setting] = {setting.name: setting for setting in SETTINGS}
