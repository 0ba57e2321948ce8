"""
End to end, ``--sandbox bwrap``: formulas run in bubblewrap and give the same results, but cannot
write into their data, reach the network, see other processes, the state directory or the token
file; the server's limits and Cancel still hold there.

Each test starts the real ``twistd -n measuring`` in its own folder (``support.ServerTestCase``);
cleanup checks that it stopped cleanly and left no process behind. The tests are skipped, saying
why, where bubblewrap is missing or cannot make a sandbox.
"""

from __future__ import annotations

import json
import os
import secrets

import pandas as pd
import psutil
from twisted.trial.unittest import SkipTest

from measuring.test.support import (
    Server,
    ServerTestCase,
    alive,
    bwrap_missing,
    carrying,
    write_formulas,
)

CONFINED = '''
import json
import os
import socket
import subprocess
import time


def write_directory(df):
    """What writing a file into the job's data Directory gives."""
    try:
        with open(os.path.join(DIRECTORY, "written.txt"), "w") as f:
            f.write("escaped")
    except OSError as e:
        return e.strerror
    return "written"


def network(df):
    """The network interfaces seen, and what connecting to the server's own port gives."""
    try:
        socket.create_connection(("127.0.0.1", PORT), timeout=5).close()
        reached = "connected"
    except OSError as e:
        reached = type(e).__name__
    interfaces = [name for _, name in socket.if_nameindex()]
    return json.dumps({"Interfaces": interfaces, "Server": reached})


def processes(df):
    """The process ids this formula can see."""
    return json.dumps(sorted(int(name) for name in os.listdir("/proc") if name.isdigit()))


def state_directory(df):
    """What the server's state directory holds, as seen from here."""
    try:
        return json.dumps(sorted(os.listdir(STATE_DIRECTORY)))
    except OSError as e:
        return e.strerror


def token_file(df):
    """Whether the token file can be read, and holds the token."""
    try:
        with open(TOKEN_FILE) as f:
            return TOKEN in f.read()
    except OSError as e:
        return e.strerror


def mean_by_sensor(df):
    return df.groupby("sensor").value.mean()


def big(df):
    """About 8 MB of numbers that do not compress."""
    import numpy as np
    import pandas as pd

    return pd.DataFrame({"x": np.random.default_rng(1).random(1_000_000)})


def spawn_and_spin(df):
    """Starts a "sleep 600" in a session of its own, then loops."""
    subprocess.Popen(["sleep", "600"], start_new_session=True)
    while True:
        time.sleep(0.01)
'''


class SandboxTestCase(ServerTestCase):
    """Skipped without a working bwrap; ``start`` adds ``--sandbox bwrap``."""

    def setUp(self) -> None:
        reason = bwrap_missing()
        if reason is not None:
            raise SkipTest(reason)
        super().setUp()

    def start(self, *arguments: str) -> Server:
        return super().start("--sandbox", "bwrap", *arguments)


class ResultTests(SandboxTestCase):
    """A sandboxed job computes what an unsandboxed one does, and its results land as usual."""

    def test_sameNumbersWithProgress(self) -> None:
        """Progress lines come, then the answer; the result files hold what pandas computes."""
        write_formulas(self.folder)
        server = self.start()
        with server.connect() as connection:
            connection.send({**self.dask(File="work.py", Progress=True), "Id": "boxed"})
            lines = [connection.receive()]
            while lines[-1]["Header"] == "Progress":
                lines.append(connection.receive())
        *progress, answer = lines
        self.assertEqual(answer["Status"], "OK", answer)
        self.assertNotEqual(progress, [])
        self.assertEqual(progress[-1]["Done"], progress[-1]["Total"])
        self.assertEqual({line["Job"] for line in progress}, {answer["Job"]})

        job, results = answer["Job"], answer["Response"]["Results"]
        self.assert_means(results)
        hourly = pd.read_parquet(os.path.join(self.folder, results["hourly"]["File"]))
        expected = self.frame.set_index("time").value.resample("1h").mean()
        self.assertEqual(hourly["value"].tolist(), expected.tolist())
        self.assertEqual(results["peak"]["Value"], self.frame.value.max())
        self.assertEqual(results["count"]["Value"], len(self.frame))
        self.assertEqual(os.listdir(os.path.join(self.folder, "results")), [job])
        self.assertEqual(
            sorted(os.listdir(os.path.join(self.folder, "results", job))),
            ["hourly.parquet", "mean_by_sensor.parquet"],
        )


class ConfinementTests(SandboxTestCase):
    """What a sandboxed formula cannot reach."""

    def test_formulaSeesOnlyItsOwn(self) -> None:
        """No writing into the data, no network, no other process, no state dir, no token file."""
        token = secrets.token_urlsafe(32)
        token_path = os.path.realpath(self.mktemp())
        with open(token_path, "w") as f:
            f.write(token + "\n")
        os.chmod(token_path, 0o600)
        server = self.start("--token-file", token_path)
        state = os.path.join(self.folder, ".measuring")
        constants = (
            f"DIRECTORY = {self.folder!r}\nPORT = {server.port}\nSTATE_DIRECTORY = {state!r}\n"
            f"TOKEN_FILE = {token_path!r}\nTOKEN = {token!r}\n"
        )
        write_formulas(self.folder, CONFINED + constants, name="confined.py")
        functions = ["write_directory", "network", "processes", "state_directory", "token_file"]
        request = self.dask(*functions, File="confined.py")
        answer = server.ask({**request, "Token": token})
        self.assertEqual(answer["Status"], "OK", answer)
        found = {name: entry["Value"] for name, entry in answer["Response"]["Results"].items()}

        self.assertEqual(found["write_directory"], "Read-only file system")
        self.assertFalse(os.path.exists(os.path.join(self.folder, "written.txt")))
        network = json.loads(found["network"])
        self.assertEqual(network["Interfaces"], ["lo"])
        self.assertNotEqual(network["Server"], "connected")
        seen = json.loads(found["processes"])
        self.assertNotIn(server.process.pid, seen)
        self.assertLess(len(seen), 10, seen)
        self.assertNotIn("jobs.sqlite", found["state_directory"])
        # Hidden behind /dev/null: it reads empty, or cannot be opened.
        self.assertIn(found["token_file"], (False, "Permission denied"))
        self.assertTrue(os.path.exists(os.path.join(state, "jobs.sqlite")))


class LimitTests(SandboxTestCase):
    """Memory, result size and Cancel hold inside the sandbox too."""

    def setUp(self) -> None:
        super().setUp()
        write_formulas(self.folder, CONFINED, name="confined.py")

    def test_memoryAndResultLimits(self) -> None:
        """Endless memory ends MemoryLimit; results past --max-result-bytes fail naming it."""
        server = self.start("--job-memory", "300MB", "--max-result-bytes", "1MiB")
        answer = server.ask(self.dask("hog"))
        self.assertEqual(answer["Error"]["Code"], "MemoryLimit", answer)
        self.assertIn("(--job-memory)", answer["Error"]["Message"])

        answer = server.ask(self.dask("big", File="confined.py"))
        self.assertEqual(answer["Error"]["Code"], "JobFailed", answer)
        self.assertIn("--max-result-bytes", answer["Error"]["Message"])
        self.assertFalse(os.path.exists(os.path.join(self.folder, "results", answer["Job"])))

    def test_cancelEndsEveryProcess(self) -> None:
        """Cancel of a running job ends it and the process it started in a session of its own."""
        server = self.start()
        job = self.submit(server, "spawn_and_spin", File="confined.py")
        sleeping = self.wait_for(lambda: carrying(job), "the formula's sleep 600 starting")
        (worker,) = self.info(server, "Dask process")["Processes"]
        # On the host: the worker (bwrap), bwrap's init in the namespace, Python, the sleep.
        processes = [worker["Pid"], *(p.pid for p in psutil.Process(worker["Pid"]).children(True))]
        self.assertTrue(set(sleeping) <= set(processes), (sleeping, processes))
        answer = self.job(server, "Cancel", job)
        self.assertEqual(answer["Response"], {"State": "cancelled"}, answer)
        self.wait_for(lambda: not alive(processes), "the job's processes ending")
        self.assertEqual(carrying(job), [])
        self.assertEqual(self.status(server, job)["Error"]["Code"], "Cancelled")
