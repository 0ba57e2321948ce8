"""
``measuring.server.systemd``: what the server tells systemd, received on a real Unix datagram socket
standing in for systemd's, with time on a ``task.Clock``.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import tempfile

from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import provider

from measuring.server.systemd import NotifyService, notify, watchdog_period

#: WatchdogSec=30s, as systemd passes it on.
THIRTY_SECONDS = "30000000"
#: What a server listening on two endpoints says when it is ready.
READY = "READY=1\nSTATUS=listening on 127.0.0.1:8765, /run/measuring.sock"


class Systemd:
    """A bound AF_UNIX datagram socket that collects what is sent to it, as systemd's does."""

    def __init__(self, address: str) -> None:
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.bind(address)
        self._socket.setblocking(False)

    def received(self) -> list[str]:
        """Every message that arrived since the last call, in order."""
        messages = []
        while True:
            try:
                messages.append(self._socket.recv(4096).decode("utf-8"))
            except BlockingIOError:
                return messages

    def close(self) -> None:
        self._socket.close()


class SystemdTestCase(SynchronousTestCase):
    """Starts a stand-in for systemd's notify socket at a path and collects logged warnings."""

    def setUp(self) -> None:
        # Not mktemp(): a Unix socket's path must stay shorter than 108 bytes.
        folder = tempfile.mkdtemp(prefix="measuring-notify-")
        self.addCleanup(shutil.rmtree, folder)
        self.path = os.path.join(folder, "notify")
        self.systemd = Systemd(self.path)
        self.addCleanup(self.systemd.close)
        self.logged: list[str] = []

        @provider(ILogObserver)
        def observe(event: LogEvent) -> None:
            if event.get("log_namespace") == "measuring.server.systemd":
                self.logged.append(formatEvent(event))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)


class NotifyTests(SystemdTestCase):
    """``notify`` sends one datagram to $NOTIFY_SOCKET and never raises."""

    def test_sendsToPath(self) -> None:
        """A message reaches the socket named by a path, as one datagram."""
        self.assertTrue(notify("READY=1\nSTATUS=up", {"NOTIFY_SOCKET": self.path}))
        self.assertEqual(self.systemd.received(), ["READY=1\nSTATUS=up"])

    def test_sendsToAbstractName(self) -> None:
        """A name starting with @ is a socket in the abstract namespace."""
        name = f"measuring-test-{secrets.token_hex(8)}"
        abstract = Systemd("\0" + name)
        self.addCleanup(abstract.close)
        self.assertTrue(notify("READY=1", {"NOTIFY_SOCKET": "@" + name}))
        self.assertEqual(abstract.received(), ["READY=1"])

    def test_withoutSocket(self) -> None:
        """Without $NOTIFY_SOCKET nothing is sent, nothing is logged, and the answer is False."""
        self.assertFalse(notify("READY=1", {}))
        self.assertFalse(notify("READY=1", {"NOTIFY_SOCKET": ""}))
        self.assertEqual((self.systemd.received(), self.logged), ([], []))

    def test_failedSendLoggedOnce(self) -> None:
        """A socket that is gone gives False, and one warning however often it is tried."""
        gone = self.path + "-gone"
        self.assertEqual(
            [notify("WATCHDOG=1", {"NOTIFY_SOCKET": gone}) for _ in range(3)], [False] * 3
        )
        [warning] = self.logged
        self.assertIn(f"cannot notify systemd at {gone}", warning)

    def test_notAUnixSocket(self) -> None:
        """A $NOTIFY_SOCKET that is neither a path nor an abstract name is refused, not raised."""
        self.assertFalse(notify("READY=1", {"NOTIFY_SOCKET": "vsock:2:1234"}))
        self.assertEqual(len(self.logged), 1)


class WatchdogPeriodTests(SynchronousTestCase):
    """``watchdog_period`` reads what systemd's WatchdogSec= became in the environment."""

    def test_halfOfWatchdogUsec(self) -> None:
        """Pings come every half of $WATCHDOG_USEC, in seconds."""
        self.assertEqual(watchdog_period({"WATCHDOG_USEC": THIRTY_SECONDS}), 15.0)

    def test_thisProcessOnly(self) -> None:
        """$WATCHDOG_PID of this process keeps the watchdog; another pid's turns it off."""
        mine, other = str(os.getpid()), str(os.getpid() + 1)
        usec = {"WATCHDOG_USEC": THIRTY_SECONDS}
        self.assertEqual(watchdog_period({**usec, "WATCHDOG_PID": mine}), 15.0)
        self.assertIsNone(watchdog_period({**usec, "WATCHDOG_PID": other}))

    def test_unsetOrUnusable(self) -> None:
        """No $WATCHDOG_USEC, or one that is not a positive number, means no watchdog."""
        for environ in ({}, {"WATCHDOG_USEC": "soon"}, {"WATCHDOG_USEC": "0"}):
            self.assertIsNone(watchdog_period(environ), environ)


class NotifyServiceTests(SystemdTestCase):
    """``NotifyService`` says READY=1 when started, WATCHDOG=1 while running, STOPPING=1 at stop."""

    def service(self, **environ: str) -> tuple[NotifyService, Clock]:
        clock = Clock()
        environ = {"NOTIFY_SOCKET": self.path, **environ}
        service = NotifyService(clock, lambda: ["127.0.0.1:8765", "/run/measuring.sock"], environ)
        return service, clock

    def test_readyOnStart(self) -> None:
        """Starting says READY=1 and where the server listens."""
        service, _ = self.service()
        service.startService()
        self.assertEqual(self.systemd.received(), [READY])

    def test_readyWithoutAddresses(self) -> None:
        """Without addresses to tell, READY=1 comes alone."""
        service = NotifyService(Clock(), environ={"NOTIFY_SOCKET": self.path})
        service.startService()
        self.assertEqual(self.systemd.received(), ["READY=1"])

    def test_watchdogEveryHalfPeriod(self) -> None:
        """With WatchdogSec=30s, WATCHDOG=1 comes at 15 s, 30 s, 45 s, and not before."""
        service, clock = self.service(WATCHDOG_USEC=THIRTY_SECONDS, WATCHDOG_PID=str(os.getpid()))
        service.startService()
        self.systemd.received()
        pings = []
        for step in (14.9, 0.1, 15, 15):
            clock.advance(step)
            pings.append(self.systemd.received())
        self.assertEqual(pings, [[], ["WATCHDOG=1"], ["WATCHDOG=1"], ["WATCHDOG=1"]])

    def test_noWatchdogForAnotherProcess(self) -> None:
        """When systemd watches another pid, this process sends no WATCHDOG=1 and sets no timer."""
        service, clock = self.service(
            WATCHDOG_USEC=THIRTY_SECONDS, WATCHDOG_PID=str(os.getpid() + 1)
        )
        service.startService()
        self.assertEqual(self.systemd.received(), [READY])
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_stoppingOnStop(self) -> None:
        """Stopping says STOPPING=1 and ends the pings."""
        service, clock = self.service(WATCHDOG_USEC=THIRTY_SECONDS)
        service.startService()
        clock.advance(15)
        self.systemd.received()
        service.stopService()
        self.assertEqual(self.systemd.received(), ["STOPPING=1\nSTATUS=stopping"])
        self.assertEqual(clock.getDelayedCalls(), [])
        clock.advance(60)
        self.assertEqual(self.systemd.received(), [])

    def test_notUnderSystemd(self) -> None:
        """Without $NOTIFY_SOCKET, start and stop send nothing, set no timer and log nothing."""
        clock = Clock()
        service = NotifyService(
            clock, lambda: ["127.0.0.1:8765"], {"WATCHDOG_USEC": THIRTY_SECONDS}
        )
        service.startService()
        self.assertEqual(clock.getDelayedCalls(), [])
        service.stopService()
        self.assertEqual((self.systemd.received(), self.logged), ([], []))
