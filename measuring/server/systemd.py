"""
The server's side of systemd's notify protocol (sd_notify(3)), with the stdlib and Twisted only.

Under ``Type=notify`` systemd counts the server as started when it says ``READY=1``, and with
``WatchdogSec=`` restarts it when ``WATCHDOG=1`` stops coming. The pings are sent from the reactor,
on its clock, so a reactor that blocks stops them and gets the server restarted. Without
``$NOTIFY_SOCKET`` (not started by systemd) nothing is sent; a failed send is logged once and
never raised: the server goes on without its manager. Nothing here starts or stops anything else.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Callable, Iterable, Mapping

from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

_log = Logger()
#: The $NOTIFY_SOCKET values a failed send was already logged for.
_reported: set[str] = set()


def notify(message: str, environ: Mapping[str, str] = os.environ) -> bool:
    """
    Send ``message`` (``KEY=value`` lines, e.g. ``"READY=1"``) to the socket in $NOTIFY_SOCKET.

    Returns True when it was sent; False when $NOTIFY_SOCKET is unset or the send failed. A name
    starting with ``@`` is in the abstract namespace. Sends block as sd_notify(3)'s do: systemd
    reads its socket at once.
    """
    name = environ.get("NOTIFY_SOCKET")
    if not name:
        return False
    address = "\0" + name[1:] if name.startswith("@") else name
    try:
        if not address.startswith(("/", "\0")):
            raise OSError(errno.EAFNOSUPPORT, "not the path of a Unix socket")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message.encode("utf-8"), address)
    except OSError as e:
        if name not in _reported:
            _reported.add(name)
            _log.warn(
                "cannot notify systemd at {socket}: {error} (further failures are not logged)",
                socket=name,
                error=e.strerror or str(e),
            )
        return False
    return True


def watchdog_period(environ: Mapping[str, str] = os.environ) -> float | None:
    """
    Seconds between two ``WATCHDOG=1`` pings: half of $WATCHDOG_USEC, or None when systemd
    watches no process, or another one than this ($WATCHDOG_PID names another pid).
    """
    usec = environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = environ.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    try:
        period = int(usec) / 2 / 1_000_000
    except ValueError:
        period = 0
    if period <= 0:
        _log.warn("ignoring WATCHDOG_USEC={usec!r}: not a number of microseconds", usec=usec)
        return None
    return period


class NotifyService(Service):
    """
    Tells systemd that the server is ready (with where it listens), alive, and stopping.

    It has no ``ready()`` to call and no Deferred to wait for: its place in the server's
    ``InOrder`` service says when the server is ready. Added last, after the ListeningService, it
    starts when every endpoint listens (the ListeningService listens in its own start, or stops
    the start), and sends ``READY=1`` then; and, stopped first, it sends ``STOPPING=1`` before the
    ports close and running jobs are let end. ``addresses`` is asked at start for where the
    server listens (for ``STATUS=``). When systemd watches this process ($WATCHDOG_USEC), it sends
    ``WATCHDOG=1`` on ``clock`` every half period until it stops.
    """

    def __init__(
        self,
        clock: IReactorTime,
        addresses: Callable[[], Iterable[str]] = tuple,
        environ: Mapping[str, str] = os.environ,
    ) -> None:
        self._clock = clock
        self._addresses = addresses
        self._environ = environ
        self._watchdog: LoopingCall | None = None

    def startService(self) -> None:
        super().startService()
        addresses = ", ".join(self._addresses())
        status = f"\nSTATUS=listening on {addresses}" if addresses else ""
        if not notify("READY=1" + status, self._environ):
            return
        period = watchdog_period(self._environ)
        if period is not None:
            self._watchdog = LoopingCall(notify, "WATCHDOG=1", self._environ)
            self._watchdog.clock = self._clock
            self._watchdog.start(period, now=False)

    def stopService(self) -> None:
        super().stopService()
        watchdog, self._watchdog = self._watchdog, None
        if watchdog is not None and watchdog.running:
            watchdog.stop()
        notify("STOPPING=1\nSTATUS=stopping", self._environ)
