"""
End to end, a server started as root that runs as ``nobody`` (twistd's ``--uid``/``--gid``), with
and without ``--sandbox bwrap``: everything in its state directory belongs to that user, jobs run
as that user and use their temporary folder in the state directory, and nothing is left in /tmp.
And what the documentation warns of: without a sandbox a formula can signal the server.

The tests need root (they skip otherwise, saying why); the test's folder is given to ``nobody``,
and the server runs with a Python that user can start (``support.users``).
"""

from __future__ import annotations

import os
import pwd
import subprocess
from typing import Any

import psutil
from twisted.trial.unittest import SkipTest

from measuring.local import PACKAGE_ROOT
from measuring.test.support import (
    FINISHED,
    LIFECYCLE_FORMULAS,
    Server,
    ServerTestCase,
    bwrap_missing,
)
from measuring.test.support.users import python_for_others, reachable

NOBODY = "nobody"
#: ``where`` says where the job's temporary files go and whom it runs as.
WHERE_FORMULAS = (
    LIFECYCLE_FORMULAS
    + """

def server_reachable(df):
    # Whether this formula could signal the server, found among its worker's parents (signal 0).
    import psutil
    for process in psutil.Process().parents():
        if "twistd" in " ".join(process.cmdline()):
            try:
                os.kill(process.pid, 0)
            except OSError as e:
                return e.strerror
            return process.pid
    return "not seen"


def where(df):
    import tempfile
    with tempfile.NamedTemporaryFile() as f:
        return f"{os.getuid()} {os.path.dirname(f.name)}"
"""
)


def _bwrap_as(uid: int) -> str | None:
    """Why bubblewrap cannot make a sandbox for ``uid``, or None when it can."""
    try:
        probe = subprocess.run(
            ["bwrap", "--ro-bind", "/", "/", "--unshare-pid", "--unshare-net", "--proc", "/proc",
             "--dev", "/dev", "true"],
            capture_output=True, text=True, timeout=60, user=uid,
        )  # fmt: skip
    except FileNotFoundError:
        return "bubblewrap (bwrap) is not installed; Debian: apt install bubblewrap"
    return None if probe.returncode == 0 else f"bwrap cannot run as {NOBODY}: {probe.stderr}"


class RunAsNobodyTests(ServerTestCase):
    """``twistd --uid nobody --gid nogroup -n measuring``, started as root."""

    formulas = {"lifecycle.py": WHERE_FORMULAS}

    def setUp(self) -> None:
        if os.geteuid() != 0:
            raise SkipTest("starting a server as root to run as nobody needs root")
        super().setUp()
        self.user = pwd.getpwnam(NOBODY)
        os.chmod(os.path.dirname(self.folder), 0o755)  # trial's folder for the test is 0700
        for path in (self.folder, PACKAGE_ROOT):
            if not reachable(path):
                raise SkipTest(f"{NOBODY} cannot reach {path}: a folder above it is closed")
        self.python = python_for_others(self)
        for folder, _, names in os.walk(self.folder):
            for path in [folder, *(os.path.join(folder, name) for name in names)]:
                os.chown(path, self.user.pw_uid, self.user.pw_gid)
        self.state = os.path.join(self.folder, ".measuring")  # made by the server, for nobody

    def start_as_nobody(self, *arguments: str) -> Server:
        return self.start_twistd(arguments, ("--uid", NOBODY, "--gid", "nogroup"), self.python)

    def assert_owned(self, path: str) -> None:
        info = os.lstat(path)
        self.assertEqual((info.st_uid, info.st_gid), (self.user.pw_uid, self.user.pw_gid), path)

    def run_job(self, server: Server) -> dict[str, Any]:
        """A job of mean_by_sensor and where; its Status once done."""
        job = self.submit(server, "mean_by_sensor", "where")
        status = self.wait_for_job(server, job, *FINISHED)
        self.assertEqual(status["State"], "done", status)
        status["Job"] = job
        return status

    def assert_ran_as_nobody(self, server: Server) -> None:
        self.assertEqual(psutil.Process(server.process.pid).uids().real, self.user.pw_uid)
        server.wait_until_ready()
        for pid in server.descendants():
            self.assertEqual(psutil.Process(pid).uids().real, self.user.pw_uid, pid)
        status = self.run_job(server)
        job, results = status["Job"], status["Results"]
        uid, tmp = results["where"]["Value"].split()
        self.assertEqual(int(uid), self.user.pw_uid)
        self.assertTrue(tmp.startswith(self.state), f"the job's temporary folder was {tmp}")
        self.assert_means(results)
        self.assert_owned(os.path.join(self.folder, results["mean_by_sensor"]["File"]))
        for name in os.listdir(self.state):
            self.assert_owned(os.path.join(self.state, name))
        self.assertFalse(os.path.exists(f"/tmp/job-{job}"))
        self.wait_for(
            lambda: (
                not [name for name in os.listdir(os.path.join(self.state, "tmp")) if job in name]
            ),
            "the job's temporary folder removed",
        )

    def test_withoutSandbox(self) -> None:
        """Without a sandbox: the state directory, the job's files and processes are nobody's."""
        server = self.start_as_nobody()
        self.assert_owned(self.state)
        self.assert_ran_as_nobody(server)

    def test_withSandbox(self) -> None:
        """With --sandbox bwrap, the same: the workers' outboxes are made by nobody too."""
        why = _bwrap_as(self.user.pw_uid)
        if why is not None:
            raise SkipTest(why)
        server = self.start_as_nobody("--sandbox", "bwrap")
        self.assert_ran_as_nobody(server)

    def test_stateDirOfRootRefused(self) -> None:
        """A state directory only root may write: the start stops, saying whose it must be."""
        os.makedirs(self.state, mode=0o700)
        os.chown(self.state, 0, 0)
        with self.assertRaises(RuntimeError) as raised:
            self.start_as_nobody()
        self.assertIn(f"is not writable by uid {self.user.pw_uid}", str(raised.exception))


class FormulaReachTests(ServerTestCase):
    """What docs/deploy.md warns of, and what the sandbox takes away."""

    formulas = {"lifecycle.py": WHERE_FORMULAS}

    def reach(self, server: Server) -> object:
        answer = server.ask(self.dask("server_reachable"))
        self.assertEqual(answer["Status"], "OK", answer)
        return answer["Response"]["Results"]["server_reachable"]["Value"]

    def test_withoutSandboxTheServerCanBeSignalled(self) -> None:
        """Without a sandbox a formula finds the server's process and may signal it."""
        server = self.start()
        self.assertEqual(self.reach(server), server.process.pid)

    def test_sandboxedCannot(self) -> None:
        """In the sandbox the server's process is not even seen."""
        reason = bwrap_missing()
        if reason is not None:
            raise SkipTest(reason)
        self.assertEqual(self.reach(self.start("--sandbox", "bwrap")), "not seen")
