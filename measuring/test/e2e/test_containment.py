"""
End to end, a job's processes end with it in every case: a process a formula starts in a session
of its own with an empty environment (so that neither its process group nor the server's mark
finds it) ends when its job ends, and when the server is killed with SIGKILL, at once, without
waiting for a next start. The second needs a cgroup for each job (``pool.cgroups``): root, or a
delegated cgroup; where none can be had the test says so and skips.

Each test starts the real ``twistd -n measuring`` (``support.ServerTestCase``).
"""

from __future__ import annotations

import hashlib
import os

from twisted.trial.unittest import SkipTest

from measuring.server.pool.cgroups import own_cgroup
from measuring.test.support import LIFECYCLE_FORMULAS, ServerTestCase, alive, end

ESCAPING_FORMULAS = (
    LIFECYCLE_FORMULAS
    + '''

def escape(df):
    """Starts a "sleep 600" in a session of its own, with an empty environment; then is held."""
    sleeper = subprocess.Popen(["sleep", "600"], env={}, start_new_session=True)
    with open("escaped.pid.new", "w") as f:
        f.write(str(sleeper.pid))
    os.replace("escaped.pid.new", "escaped.pid")
    return held(df)
'''
)


def cgroups_missing() -> str | None:
    """Why this machine gives the server no cgroup for its jobs, or None when it does."""
    own, why = own_cgroup()
    if own is None:
        return why
    if not os.access(own, os.W_OK):
        return f"this process may not make cgroups in {own} (not root, no Delegate=yes)"
    return None


class ContainmentTests(ServerTestCase):
    """A process that left its job's session and environment still ends with the job."""

    formulas = {"lifecycle.py": ESCAPING_FORMULAS}

    def escaped(self) -> int:
        """The pid of the formula's escaped "sleep 600", once noted; ended after the test."""
        path = os.path.join(self.folder, "escaped.pid")
        self.wait_for(lambda: os.path.exists(path), "the formula to start its sleep")
        with open(path) as f:
            pid = int(f.read())
        self.addCleanup(end, pid)
        return pid

    def test_endsWithItsJob(self) -> None:
        """When the job ends, the escaped process ends too."""
        server = self.start()
        self.hold()
        job = self.submit(server, "escape")
        pid = self.escaped()
        self.assertEqual(alive([pid]), [pid])
        self.release(job)
        self.assertEqual(self.wait_for_job(server, job, "done", "failed")["State"], "done")
        self.wait_for(lambda: not alive([pid]), f"the escaped process {pid} to end", 10)

    def test_endsWithAKilledServer(self) -> None:
        """kill -9 of the server: the escaped process ends at once, and no cgroup is left."""
        why = cgroups_missing()
        if why is not None:
            raise SkipTest(why)
        server = self.start()
        self.hold()
        self.submit(server, "escape")
        pid = self.escaped()
        self.crash(server)  # waits for every process below the server, the escaped one too
        self.assertEqual(alive([pid]), [])
        own, _ = own_cgroup()
        assert own is not None
        state = os.path.realpath(os.path.join(self.folder, ".measuring"))
        folder = os.path.join(own, "measuring-" + hashlib.sha256(state.encode()).hexdigest()[:12])
        self.wait_for(lambda: not job_cgroups(folder), "the jobs' cgroups removed", 10)


def job_cgroups(folder: str) -> list[str]:
    """The jobs' cgroups in ``folder``."""
    try:
        return [name for name in os.listdir(folder) if name.startswith("job-")]
    except FileNotFoundError:
        return []
