"""
Tests for ``measuring.server.pool.cgroups`` and ``guard``: finding this process's cgroup v2
folder, killing a cgroup, and what the guard ends once the server has ended.

The cgroup tests use the real cgroup file system where this process may make cgroups (root), and
skip saying why elsewhere; the rest read a /proc of the test's own or real processes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from measuring.messages import SERVER_MARK
from measuring.server.pool import guard
from measuring.server.pool.cgroups import own_cgroup
from measuring.test.support import alive


def _proc(case: SynchronousTestCase, cgroup: str, mountinfo: str) -> str:
    """A folder holding ``cgroup`` and ``mountinfo`` files as /proc/self does."""
    folder = case.mktemp()
    os.makedirs(folder)
    for name, text in (("cgroup", cgroup), ("mountinfo", mountinfo)):
        with open(os.path.join(folder, name), "w") as f:
            f.write(text)
    return folder


MOUNT = "35 25 0:30 / /sys/fs/cgroup rw,nosuid shared:9 - cgroup2 cgroup2 rw,nsdelegate\n"


class OwnCgroupTests(SynchronousTestCase):
    """Where this process's cgroup v2 folder is."""

    def test_unified(self) -> None:
        """The 0:: line's path under the cgroup2 mount."""
        proc = _proc(self, "0::/system.slice/tcp_server.service\n", MOUNT)
        folder, _ = own_cgroup(proc)
        self.assertEqual(folder, "/sys/fs/cgroup/system.slice/tcp_server.service")

    def test_hybrid(self) -> None:
        """With v1 controllers beside it, the unified hierarchy where it is mounted."""
        proc = _proc(
            self,
            "4:memory:/x\n0::/\n",
            "40 25 0:33 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
            "41 25 0:34 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n",
        )
        self.assertEqual(own_cgroup(proc)[0], "/sys/fs/cgroup/unified/")

    def test_noneSaysWhy(self) -> None:
        """Without cgroup v2 there is none, and why."""
        folder, why = own_cgroup(_proc(self, "4:memory:/x\n", ""))
        self.assertIsNone(folder)
        self.assertIn("no cgroup v2", why)


def _writable_cgroup() -> str:
    folder, why = own_cgroup()
    if folder is None:
        raise SkipTest(why)
    if not os.access(folder, os.W_OK):
        raise SkipTest(f"this process may not make cgroups in {folder}")
    return folder


class KillGroupTests(SynchronousTestCase):
    """``kill_group`` on a real cgroup."""

    def test_killedAndRemoved(self) -> None:
        """Every process in the cgroup is killed, and the cgroup removed."""
        group = os.path.join(_writable_cgroup(), f"measuring-test-{os.getpid()}")
        os.mkdir(group)
        self.addCleanup(guard.kill_group, group)
        sleeper = subprocess.Popen(["sleep", "600"], start_new_session=True)
        self.addCleanup(sleeper.wait)
        with open(os.path.join(group, "cgroup.procs"), "w") as f:
            f.write(str(sleeper.pid))
        self.assertTrue(guard.kill_group(group))
        self.assertFalse(os.path.exists(group))
        sleeper.wait(10)
        self.assertEqual(sleeper.returncode, -9)

    def test_goneAlready(self) -> None:
        """A cgroup that is not there counts as removed."""
        self.assertTrue(guard.kill_group(os.path.join(self.mktemp(), "job-none")))


class GuardTests(SynchronousTestCase):
    """The guard ends what carries the server's mark once its stdin ends."""

    def test_marked(self) -> None:
        """``marked`` finds a process by a variable of its environment, and no other."""
        mark = f"/test/{os.getpid()}/{time.monotonic()}"
        sleeper = subprocess.Popen(["sleep", "600"], env={SERVER_MARK: mark})
        other = subprocess.Popen(["sleep", "600"], env={SERVER_MARK: mark + "-other"})
        for process in (sleeper, other):
            self.addCleanup(process.wait)
            self.addCleanup(process.kill)
        self.assertEqual(guard.marked(SERVER_MARK, mark), [sleeper.pid])

    def test_endsMarkedWhenStdinEnds(self) -> None:
        """The guard process waits; once its stdin closes, the marked processes are killed."""
        mark = f"/test/{os.getpid()}/{time.monotonic()}"
        sleeper = subprocess.Popen(["sleep", "600"], env={SERVER_MARK: mark})
        self.addCleanup(sleeper.wait)
        self.addCleanup(sleeper.kill)
        process = subprocess.Popen(
            [sys.executable, "-m", "measuring.server.pool.guard", mark, "-"],
            stdin=subprocess.PIPE,
        )
        self.addCleanup(process.wait)
        time.sleep(0.2)
        self.assertEqual(alive([sleeper.pid]), [sleeper.pid])
        assert process.stdin is not None
        process.stdin.close()  # as when the server ends
        self.assertEqual(process.wait(30), 0)
        self.assertEqual(sleeper.wait(10), -9)
