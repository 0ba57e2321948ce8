"""
``twistd measuring`` without ``-n``: the server daemonizes (forks, leaves the terminal) and is
still what it is in the foreground: a subreaper that ends what a dead worker left behind, and
gone, with everything it started, after SIGTERM.

The process-wide settings (child subreaper, undumpable) are made after twistd forks
(``services.ProcessSetup``): a forked child inherits neither.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import psutil
from twisted.trial.unittest import SynchronousTestCase

from measuring.local import LISTENING, Connection, environment, twistd
from measuring.messages import SERVER_MARK
from measuring.test.support import write_dataset, write_formulas
from measuring.test.support.system import alive, end

# A formula that starts a process with an empty environment (so no mark of the server's) in a
# session of its own, notes its pid, and kills its own worker.
LEAVER = """
import os
import subprocess


def leave(df):
    sleeper = subprocess.Popen(["sleep", "300"], env={}, start_new_session=True)
    with open("sleep.pid.new", "w") as f:
        f.write(str(sleeper.pid))
    os.replace("sleep.pid.new", "sleep.pid")
    os._exit(3)
"""


def _wait(predicate, what: str, patience: float = 60.0) -> None:
    deadline = time.monotonic() + patience
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {patience:g} s for {what}")
        time.sleep(0.05)


class DaemonTests(SynchronousTestCase):
    """The daemonized server keeps every promise of the foreground one."""

    def setUp(self) -> None:
        self.folder = os.path.realpath(self.mktemp())
        os.makedirs(self.folder)
        write_dataset(self.folder)
        write_formulas(self.folder, LEAVER, name="leaver.py")
        self.pidfile = os.path.join(self.folder, "twistd.pid")
        self.logfile = os.path.join(self.folder, "twistd.log")

    def start(self) -> tuple[int, int]:
        """Start the daemon; return its pid and the port it listens on."""
        launched = subprocess.run(
            [
                *twistd(), "--pidfile", self.pidfile, "--logfile", self.logfile, "measuring",
                "--port", "tcp:0:interface=127.0.0.1", "--data-root", self.folder,
                "--state-dir", os.path.join(self.folder, ".measuring"), "--workers", "1",
            ],
            cwd=self.folder, env=environment(), capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        self.assertEqual(launched.returncode, 0, launched.stdout + launched.stderr)
        _wait(lambda: os.path.exists(self.pidfile), "the pid file")
        with open(self.pidfile) as f:
            pid = int(f.read())
        self.addCleanup(end, pid)

        def port() -> int | None:
            if not os.path.exists(self.logfile):
                return None
            with open(self.logfile, encoding="utf-8", errors="replace") as f:
                for line in f:
                    if LISTENING in line:
                        return int(line.split(LISTENING)[1].split()[0].rsplit(":", 1)[1])
            return None

        _wait(lambda: port() is not None, "the daemon to listen")
        found = port()
        assert found is not None
        return pid, found

    def test_subreaperAndStop(self) -> None:
        """What a dead worker left (unmarked, in a session of its own) ends; SIGTERM ends all."""
        pid, port = self.start()
        self.assertNotEqual(psutil.Process(pid).ppid(), os.getpid(), "twistd did not fork")
        request = {
            "Header": "Dask",
            "Request": {
                "Directory": self.folder,
                "Base": "time_series.parquet",
                "File": "leaver.py",
            },
        }
        with Connection(port) as connection:
            answer = connection.ask(request)
        self.assertEqual(answer["Error"]["Code"], "JobFailed", answer)
        self.assertIn("exited with code 3", answer["Error"]["Message"])
        with open(os.path.join(self.folder, "sleep.pid")) as f:
            sleeper = int(f.read())
        self.addCleanup(end, sleeper)
        _wait(
            lambda: not alive([sleeper]), f"the server to end the left-behind sleep {sleeper}", 20
        )

        with Connection(port) as connection:
            status = connection.ask({"Header": "Info", "Request": "Status"})
        self.assertEqual(status["Status"], "OK")
        os.kill(pid, signal.SIGTERM)
        _wait(lambda: not alive([pid]), "the daemon to stop")
        left = [
            process.pid
            for process in psutil.process_iter(["environ"])
            if (process.info["environ"] or {}).get(SERVER_MARK, "").startswith(self.folder)
        ]
        self.assertEqual(left, [], "processes of the server are left running")
