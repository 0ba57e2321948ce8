"""
Tests for ``measuring.server.fdlimit`` and its use by ``config.load``: the soft RLIMIT_NOFILE is
raised as far as ``--max-connections`` and the reserve need; a given value the hard limit cannot
hold stops the start, saying what to do; the default one is lowered, saying so.

``FakeFileLimit`` behaves as the kernel does for a user without privileges: the soft limit may
go up to the hard one, never beyond.
"""

from __future__ import annotations

import os
import resource

from twisted.logger import capturedLogs, formatEvent
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase

from measuring.server import config
from measuring.server.fdlimit import ProcessFileLimit, fit, reserve

INFINITY = resource.RLIM_INFINITY


class FakeFileLimit:
    """An RLIMIT_NOFILE of (``soft``, ``hard``) that refuses what the kernel refuses."""

    def __init__(self, soft: int, hard: int) -> None:
        self.soft, self.hard = soft, hard

    def get(self) -> tuple[int, int]:
        return self.soft, self.hard

    def set(self, soft: int, hard: int) -> None:
        if hard != self.hard or (self.hard != INFINITY and soft > self.hard):
            raise ValueError("not allowed to raise maximum limit")
        self.soft = soft


class FitTests(SynchronousTestCase):
    """What ``fit`` does with the limit and the setting."""

    def test_softRaisedAsFarAsNeeded(self) -> None:
        """A soft limit too low is raised to connections plus reserve, not to the hard one."""
        limit = FakeFileLimit(1024, 65536)
        self.assertEqual(fit(3000, 2, True, limit), (3000, None))
        self.assertEqual(limit.get(), (3000 + reserve(2), 65536))

    def test_enoughAlready(self) -> None:
        """A soft limit high enough is left as it is."""
        limit = FakeFileLimit(20000, 20000)
        self.assertEqual(fit(1000, 2, False, limit), (1000, None))
        self.assertEqual(limit.get(), (20000, 20000))

    def test_unlimitedHard(self) -> None:
        """With no hard limit the soft one is raised to what is needed."""
        limit = FakeFileLimit(1024, INFINITY)
        self.assertEqual(fit(5000, 4, True, limit), (5000, None))
        self.assertEqual(limit.soft, 5000 + reserve(4))

    def test_givenValueTooHighRefused(self) -> None:
        """A given value the hard limit cannot hold: ValueError with the numbers and the fix."""
        limit = FakeFileLimit(1024, 1024)
        with self.assertRaises(ValueError) as raised:
            fit(3000, 2, True, limit)
        message = str(raised.exception)
        most = 1024 - reserve(2)
        for words in ("3000 connections need", "1024 at most", "LimitNOFILE=", f"{most} or fewer"):
            self.assertIn(words, message)

    def test_defaultLowered(self) -> None:
        """The default value is lowered to what fits, with a line saying so."""
        limit = FakeFileLimit(1024, 1024)
        connections, lowered = fit(1000, 2, False, limit)
        self.assertEqual(connections, 1024 - reserve(2))
        assert lowered is not None
        self.assertIn(f"lowered from 1000 to {connections}", lowered)

    def test_noRoomAtAll(self) -> None:
        """A hard limit below the reserve stops the start even with the default."""
        with self.assertRaises(ValueError) as raised:
            fit(1000, 256, False, FakeFileLimit(1024, 1024))
        self.assertIn("fewer --workers", str(raised.exception))

    def test_realLimitRoundTrip(self) -> None:
        """ProcessFileLimit reads and sets this process's own limit."""
        limit = ProcessFileLimit()
        soft, hard = limit.get()
        self.assertEqual((soft, hard), resource.getrlimit(resource.RLIMIT_NOFILE))
        limit.set(soft, hard)


class LoadTests(SynchronousTestCase):
    """``config.load`` with a file limit: the setting as the start sees it."""

    def load(self, limit: FakeFileLimit, **flags: object) -> config.Config:
        """The settings of a start in a folder of its own, under ``limit``."""
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        return config.load(flags, None, lambda _: None, {}, folder, file_limit=limit)

    def test_givenRefused(self) -> None:
        """--max-connections 3000 under a hard limit of 1024: one line naming the flag."""
        with self.assertRaises(UsageError) as raised:
            self.load(FakeFileLimit(1024, 1024), **{"max-connections": 3000})
        self.assertTrue(str(raised.exception).startswith("--max-connections 3000: "))

    def test_defaultLoweredAndLogged(self) -> None:
        """The default under a hard limit of 1024 is lowered, and the log says so."""
        with capturedLogs() as events:
            settings = self.load(FakeFileLimit(1024, 1024))
        self.assertEqual(settings.max_connections, 1024 - reserve(2))
        [line] = [formatEvent(event) for event in events]
        self.assertIn("--max-connections lowered from 1000", line)
