"""
Tests for a server started as root that runs as another user (twistd's ``--uid``/``--gid``):
``config.load`` makes the state directory for that user and refuses one they cannot write;
``tap.Options`` finds that user; ``services.UserSetup`` makes the rest once privileges are
dropped. The chown tests need root, as the server does; they skip otherwise.
"""

from __future__ import annotations

import os
import pwd

from twisted.python.usage import UsageError
from twisted.scripts._twistd_unix import ServerOptions
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from measuring.server import config, tap
from measuring.server.services import UserSetup
from measuring.test.unit.test_config import check_endpoint

NOBODY = pwd.getpwnam("nobody")


class OwnedStateDirTests(SynchronousTestCase):
    """The state directory of a server that will run as ``nobody``."""

    def setUp(self) -> None:
        if os.geteuid() != 0:
            raise SkipTest("giving a folder to another user needs root")
        self.cwd = os.path.realpath(self.mktemp())
        os.makedirs(self.cwd)
        os.chmod(self.cwd, 0o755)

    def load(self, state: str) -> config.Config:
        return config.load(
            {"state-dir": state}, None, check_endpoint, environ={}, cwd=self.cwd,
            owner=(NOBODY.pw_uid, NOBODY.pw_gid),
        )  # fmt: skip

    def test_madeForTheUser(self) -> None:
        """A new state directory (and the parents made for it) belongs to the user, mode 0700."""
        state = self.load("var/state").state_dir
        for path in (state, os.path.dirname(state)):
            info = os.stat(path)
            self.assertEqual((info.st_uid, info.st_gid), (NOBODY.pw_uid, NOBODY.pw_gid), path)
        self.assertEqual(os.stat(state).st_mode & 0o777, 0o700)
        self.assertEqual(os.listdir(state), [], "something was made in it as root")

    def test_theirsAccepted(self) -> None:
        """A state directory that belongs to the user already is used as it is."""
        state = os.path.join(self.cwd, "state")
        os.makedirs(state)
        os.chown(state, NOBODY.pw_uid, NOBODY.pw_gid)
        self.assertEqual(self.load("state").state_dir, state)

    def test_rootsRefused(self) -> None:
        """A state directory only root may write stops the start, saying what to do."""
        os.makedirs(os.path.join(self.cwd, "state"), mode=0o700)
        with self.assertRaises(UsageError) as raised:
            self.load("state")
        message = str(raised.exception)
        self.assertIn(f"not writable by uid {NOBODY.pw_uid}", message)
        self.assertIn("chown", message)


class OwnerTests(SynchronousTestCase):
    """``tap.Options`` takes the user from twistd's own options."""

    def owner(self, *twistd: str) -> tuple[int, int] | None:
        options = ServerOptions()
        options.parseOptions(list(twistd))
        measuring = tap.Options()
        measuring.parent = options
        return measuring._owner()

    def test_uidAndGid(self) -> None:
        """--uid and --gid as twistd parsed them (names or numbers)."""
        if os.geteuid() != 0:
            raise SkipTest("a user to switch to only counts for a server started as root")
        self.assertEqual(self.owner("--uid", "nobody", "--gid", "0"), (NOBODY.pw_uid, 0))
        self.assertEqual(self.owner("--uid", str(NOBODY.pw_uid)), (NOBODY.pw_uid, NOBODY.pw_gid))

    def test_none(self) -> None:
        """Without --uid the server stays who it is."""
        self.assertIsNone(self.owner())


class UserSetupTests(SynchronousTestCase):
    """Steps made once privileges are dropped."""

    def test_stepsRunAtStart(self) -> None:
        """The steps run in startService, not before."""
        ran: list[str] = []
        setup = UserSetup(lambda: ran.append("made"))
        setup.privilegedStartService()
        self.assertEqual(ran, [])
        setup.startService()
        self.assertEqual(ran, ["made"])

    def test_failureStopsTheStart(self) -> None:
        """A step failing with OSError stops the start with one line."""
        folder = os.path.join(self.mktemp(), "missing", "tmp")
        setup = UserSetup(lambda: os.mkdir(folder))
        with self.assertRaises(SystemExit) as raised:
            setup.startService()
        self.assertIn(f"measuring: [Errno 2] No such file or directory: '{folder}'",
                      str(raised.exception.code))  # fmt: skip
