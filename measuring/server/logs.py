"""
The server's log in the form ``--log-format`` asks for: twistd's text lines (its own observer,
unchanged), or twisted.logger's JSON events, one per line, for log shippers. When the log goes
to systemd's journal (stdout is the stream ``$JOURNAL_STREAM`` names), every line starts with
its level as ``<N>`` (syslog's numbers), which the journal takes as the line's priority.

twistd sets up logging after the plugin's options are read and only takes an observer factory
by its dotted name (``--logger``): ``choose`` settles what to write where, once, and gives the
name of ``observer``, which twistd calls. Nothing here starts anything.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from typing import IO, Any, cast

from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    LogEvent,
    LogLevel,
    eventAsJSON,
    formatEvent,
    formatEventAsClassicLogText,
)
from twisted.python.logfile import LogFile
from twisted.python.usage import UsageError

#: syslog's priority of each level, as the journal reads it from a ``<N>`` prefix.
PRIORITIES = {
    LogLevel.debug: 7,
    LogLevel.info: 6,
    LogLevel.warn: 4,
    LogLevel.error: 3,
    LogLevel.critical: 2,
}
#: What twistd's ``--logger`` is given.
OBSERVER = "measuring.server.logs.observer"

_chosen: Callable[[], ILogObserver] | None = None


def on_journal(stream: IO[str], environ: Mapping[str, str]) -> bool:
    """True when ``stream`` is the journal's stream that systemd gave this service."""
    expected = environ.get("JOURNAL_STREAM", "")
    try:
        status = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return expected == f"{status.st_dev}:{status.st_ino}"


def formatter(log_format: str, journal: bool) -> Callable[[LogEvent], str | None]:
    """What a line (or lines) of the log says about one event."""

    def text(event: LogEvent) -> str | None:
        if log_format == "json":
            # The event's own fields, and its message in words (``text``) for a reader.
            return eventAsJSON({**event, "text": formatEvent(event)}) + "\n"
        return formatEventAsClassicLogText(event)

    if not journal:
        return text

    def prefixed(event: LogEvent) -> str | None:
        lines = text(event)
        if lines is None:
            return None
        level = f"<{PRIORITIES.get(event.get('log_level', LogLevel.info), 6)}>"
        return "".join(f"{level}{line}\n" for line in lines.splitlines())

    return prefixed


def _to_stdout(options: Mapping[str, Any]) -> bool:
    """Whether twistd itself would write to stdout: with -n and no --logfile, or --logfile -."""
    logfile = options.get("logfile") or ""
    return logfile == "-" or bool(options.get("nodaemon") and not logfile)


def _destination(to_stdout: bool, logfile: str | None) -> IO[Any]:
    if to_stdout:
        return sys.stdout
    # twistd's own log file (rotated at 1 MB), a file-like object as twisted.logger writes to.
    return cast(IO[Any], LogFile.fromFullPath(logfile or "twistd.log"))


def choose(
    log_format: str, options: Mapping[str, Any], environ: Mapping[str, str] = os.environ
) -> str | None:
    """
    Settle the log from ``--log-format`` and twistd's own ``options``; the name to give
    twistd's ``--logger``, or None to leave twistd's text log as it is (text, not on the
    journal, or twistd told to use syslog or a logger of its own).
    """
    global _chosen
    if options.get("logger") or options.get("syslog"):
        if log_format == "json":
            raise UsageError(
                "--log-format json writes to stdout or twistd's --logfile, "
                "not to --syslog or another --logger"
            )
        return None
    to_stdout, logfile = _to_stdout(options), options.get("logfile")
    journal = to_stdout and on_journal(sys.stdout, environ)
    if log_format == "text" and not journal:
        return None
    write = formatter(log_format, journal)
    _chosen = lambda: FileLogObserver(_destination(to_stdout, logfile), write)  # noqa: E731
    return OBSERVER


def observer() -> ILogObserver:
    """The observer ``choose`` settled: what twistd's ``--logger`` calls."""
    if _chosen is None:
        return FileLogObserver(sys.stdout, formatter("json", False))
    return _chosen()
