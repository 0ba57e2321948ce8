"""
Real servers for the end-to-end tests: ``Server`` (``measuring.local``'s, the one the demo starts),
``run_twistd`` for starts meant to fail, and ``ServerTestCase``, which starts servers in a fresh
folder of sample data and formula files, speaks to them, and at cleanup fails the test unless each
one stopped cleanly and took every process it started with it. ``ClientTestCase`` and
``HostileTestCase`` are its folders for the client tests and for the attacks. Plain blocking
sockets and subprocesses: no reactor here.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

import pandas as pd
import psutil
from twisted.trial.unittest import SynchronousTestCase

from measuring.local import Connection, LocalServer, environment, twistd
from measuring.test.support.cluster import wait_for as polled
from measuring.test.support.data import sample_frame, write_dataset, write_formulas
from measuring.test.support.formulas import (
    CLIENT_FORMULAS,
    FORMULAS,
    HOSTILE_FORMULAS,
    LIFECYCLE_FORMULAS,
)
from measuring.test.support.system import alive, carrying

T = TypeVar("T")

#: How long a test waits at most for a server or a job to do something.
PATIENCE = 60.0
#: How long a stopping server may take, at most, to count as stopping "within a few seconds".
STOPPING = 15.0
BASE = "time_series.parquet"
FINISHED = ("done", "failed", "cancelled", "timeout")
JOB_ID = re.compile(r"\d{8}-\d{6}-[0-9a-f]{6}")
STATUS = {"Header": "Info", "Request": "Status"}
#: The rows of ``ClientTestCase``'s dataset: more than one page of ``Result.records`` (10 000).
ROWS = 25_000


class Server(LocalServer):
    """
    The real server for a test, in ``folder``; ``descendants`` shows what it left running.

    Jobs still running at the end of a test are given 2 s, not 30, to end when it stops (a test
    may pass its own ``--stop-grace``; the last one given wins).
    """

    def __init__(
        self,
        folder: str,
        *arguments: str,
        patience: float = PATIENCE,
        twistd_options: tuple[str, ...] = (),
        python: str | None = None,
    ) -> None:
        super().__init__(
            folder, "--stop-grace", "2", *arguments, patience=patience,
            twistd_options=twistd_options, python=python,
        )  # fmt: skip

    def descendants(self) -> list[int]:
        """Pids of every process below the server."""
        try:
            return [p.pid for p in psutil.Process(self.process.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return []


def run_twistd(folder: str, *arguments: str) -> subprocess.CompletedProcess[str]:
    """Run ``twistd -n measuring arguments`` in ``folder`` to its end: a start meant to fail."""
    return subprocess.run(
        [*twistd(), "-n", "--pidfile=", "measuring", *arguments],
        cwd=folder,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=60,
    )


def dataset(server: Server) -> Any:
    """The server's dataset as pandas reads it: what the expected results are computed from."""
    return pd.read_parquet(os.path.join(server.folder, BASE))


class ServerTestCase(SynchronousTestCase):
    """
    A folder with ``rows`` of sample data (``self.frame``) and the formula files ``formulas``;
    servers on it, checked at cleanup. ``dask`` runs the first formula file unless told.
    """

    formulas: ClassVar[dict[str, str]] = {"lifecycle.py": LIFECYCLE_FORMULAS}
    rows: ClassVar[int] = 10_000

    def setUp(self) -> None:
        self.folder = os.path.realpath(self.mktemp())
        os.makedirs(self.folder)
        self.frame = sample_frame(rows=self.rows)
        write_dataset(self.folder, frame=self.frame)
        for name, source in self.formulas.items():
            write_formulas(self.folder, source, name=name)
        self.servers: list[Server] = []
        self.crashed: list[Server] = []

    def start(self, *arguments: str) -> Server:
        """
        A server on this folder (and its state directory, so a second one takes over the first
        one's jobs). ``--stop-grace 1`` comes first, so a stop never waits long for a job a test
        left running; the previous server's log is kept as ``server-<n>.log``.
        """
        return self.start_twistd(arguments)

    def start_twistd(
        self,
        arguments: tuple[str, ...],
        twistd_options: tuple[str, ...] = (),
        python: str | None = None,
    ) -> Server:
        """``start``, with twistd's own options (``--uid``) and another Python if given."""
        log = os.path.join(self.folder, "server.log")
        if os.path.exists(log):
            shutil.copy(log, os.path.join(self.folder, f"server-{len(self.servers)}.log"))
        server = Server(
            self.folder, "--data-root", self.folder, "--stop-grace", "1", *arguments,
            twistd_options=twistd_options, python=python,
        )  # fmt: skip
        self.servers.append(server)
        self.addCleanup(self.stop_and_check, server)
        return server

    def stop_and_check(self, server: Server) -> None:
        """Stop the server; it must stop cleanly and take every process it started with it."""
        left = server.descendants()
        code = server.stop()
        if server not in self.crashed:
            self.assertIn(code, (0, -signal.SIGTERM), f"see {server.log_path}:\n{server.log()}")
        running = alive(left)
        self.assertEqual(running, [], f"processes left running after the server stopped: {running}")

    def crash(self, server: Server) -> None:
        """Kill the server with SIGKILL; its worker processes must end with it."""
        workers = server.descendants()
        self.assertNotEqual(workers, [], "the server had no worker process")
        self.crashed.append(server)
        server.process.send_signal(signal.SIGKILL)
        server.process.wait(PATIENCE)
        self.wait_for(lambda: not alive(workers), "the workers ending with the killed server")
        server.stop()

    def wait_for(
        self,
        condition: Callable[[], T | None],
        what: str | Callable[[], str],
        patience: float = PATIENCE,
    ) -> T:
        """Poll ``condition`` until it gives something true, and return that; fail at the end."""
        try:
            return polled(condition, what, patience)
        except AssertionError as e:
            self.fail(str(e))

    # -- requests

    def dask(self, *functions: str, **fields: object) -> dict[str, Any]:
        """
        A Dask request over the sample data running ``functions`` (all when none is named) of
        the first formula file, or of the File in ``fields``.
        """
        request: dict[str, object] = {
            "Directory": self.folder,
            "Base": BASE,
            "File": next(iter(self.formulas)),
        }
        if functions:
            request["Functions"] = list(functions)
        return {"Header": "Dask", "Request": {**request, **fields}}

    def submit(self, server: Server, *functions: str, **fields: object) -> str:
        """Submit an Async job; returns its id."""
        answer = server.ask(self.dask(*functions, Async=True, **fields))
        self.assertEqual(answer["Status"], "Accepted", answer)
        return str(answer["Job"])

    def job(self, server: Server, request: str, job: str, **fields: object) -> dict[str, Any]:
        """The answer to a Job request about ``job``."""
        return server.ask({"Header": "Job", "Request": request, "Job": job, **fields})

    def status(self, server: Server, job: str) -> dict[str, Any]:
        """The Response of a Job Status request."""
        answer = self.job(server, "Status", job)
        self.assertEqual(answer["Status"], "OK", answer)
        response: dict[str, Any] = answer["Response"]
        return response

    def info(self, server: Server, request: str) -> dict[str, Any]:
        """The Response of an Info request."""
        response: dict[str, Any] = server.ask({"Header": "Info", "Request": request})["Response"]
        return response

    def wait_for_job(
        self,
        server: Server,
        job: str,
        *states: str,
        seen: list[str] | None = None,
        patience: float = PATIENCE,
    ) -> dict[str, Any]:
        """Poll Job Status until the job is in one of ``states``; returns that Status."""
        seen = [] if seen is None else seen

        def reached() -> dict[str, Any] | None:
            status = self.status(server, job)
            if not seen or seen[-1] != status["State"]:
                seen.append(status["State"])
            return status if status["State"] in states else None

        return self.wait_for(
            reached, lambda: f"job {job} to be {' or '.join(states)} (it was {seen})", patience
        )

    # -- markers and notes the formulas of lifecycle.py leave

    def hold(self) -> None:
        """Make every "held" formula wait."""
        open(os.path.join(self.folder, "hold"), "w").close()

    def release_all(self) -> None:
        """Let every "held" formula end."""
        os.remove(os.path.join(self.folder, "hold"))

    def release(self, job: str) -> None:
        """Let the "held" formula of ``job`` end."""
        open(os.path.join(self.folder, f"release-{job}"), "w").close()

    def noted(self, job: str, event: str) -> float | None:
        """When the "held" formula of ``job`` noted ``event`` (start, end), or None."""
        try:
            with open(os.path.join(self.folder, "times", f"{job}.{event}")) as f:
                return float(f.read())
        except FileNotFoundError:
            return None

    def wait_started(self, *jobs: str) -> None:
        """Wait until the "held" formula of every one of ``jobs`` has started."""
        self.wait_for(
            lambda: all(self.noted(job, "start") is not None for job in jobs),
            f"the formulas of {', '.join(jobs)} starting",
        )

    # -- results

    def assert_means(self, results: dict[str, Any], frame: pd.DataFrame | None = None) -> None:
        """The mean_by_sensor result file holds the means pandas computes."""
        frame = self.frame if frame is None else frame
        means = pd.read_parquet(os.path.join(self.folder, results["mean_by_sensor"]["File"]))
        pd.testing.assert_series_equal(
            means["value"],
            frame.groupby("sensor").value.mean(),
            check_names=False,
            check_index_type=False,
        )


class ClientTestCase(ServerTestCase):
    """
    The folder the client and ``measuring-client`` run on: ``ROWS`` rows of sample data, and
    the formula files ``work.py``, ``bad.py``, ``empty.py`` and ``slow.py``.
    """

    formulas = CLIENT_FORMULAS
    rows = ROWS


class HostileTestCase(ServerTestCase):
    """
    The sample data, lifecycle.py, work.py and hostile.py; requests carry ``token`` when one is
    set. At cleanup a running server must still answer, with nothing but its template process
    left and no process carrying the mark of any of its jobs.
    """

    formulas = {
        "lifecycle.py": LIFECYCLE_FORMULAS,
        "work.py": FORMULAS,
        "hostile.py": HOSTILE_FORMULAS,
    }
    token: str | None = None

    def ask(self, server: Server, request: dict[str, Any]) -> dict[str, Any]:
        """The answer to ``request`` (with the token) on a new connection."""
        return server.ask(request if self.token is None else {**request, "Token": self.token})

    def assert_fine(self, server: Server) -> None:
        """The server answers Status, running."""
        answer = self.ask(server, STATUS)
        self.assertEqual((answer["Status"], answer["Response"]["State"]), ("OK", "running"))

    def answer_to(self, connection: Connection, request: dict[str, Any] | bytes) -> dict[str, Any]:
        """The answer to ``request`` on ``connection``; a failure, not a hang, when none comes."""
        try:
            return connection.ask(request)
        except OSError as e:  # closed, reset, or timed out
            self.fail(f"no answer to {request!r}: {e!r}")

    def serves(self, server: Server) -> bool:
        """True when a new connection gets Status answered (not refused, dropped or Busy)."""
        try:
            return self.ask(server, STATUS)["Status"] == "OK"
        except ConnectionError:
            return False

    def only_template(self, server: Server) -> bool:
        """True when the server's one descendant is its template process, ready."""
        status = self.ask(server, STATUS)["Response"]["Workers"]
        tree = self.ask(server, {"Header": "Info", "Request": "All process"})["Response"]
        templates = [
            process["Pid"] for process in tree["Service"]["Tree"] if process["Role"] == "template"
        ]
        ready = status["Template"] == "ready" and status["Busy"] == 0
        # Beside the template, the guard that ends the jobs' processes if the server dies.
        others = set(server.descendants()) - set(templates)
        return ready and len(templates) == 1 and all(_is_guard(pid) for pid in others)

    def stop_and_check(self, server: Server) -> None:
        """Nothing but the template runs and no job's mark is left; then stop and check it."""
        try:
            if server.process.poll() is None and server not in self.crashed:
                self.assert_fine(server)
                self.wait_for(lambda: self.only_template(server), "only the template left")
                listed = self.ask(server, {"Header": "Job", "Request": "List", "Limit": 1000})
                for job in listed["Response"]["Jobs"]:
                    self.assertEqual(carrying(job["Job"]), [], f"processes of job {job['Job']}")
        finally:
            super().stop_and_check(server)

    def unhold(self) -> None:
        """Let "held" formulas end, if a test has not already."""
        with contextlib.suppress(FileNotFoundError):
            self.release_all()

    def hostile(self, *functions: str, **fields: object) -> dict[str, Any]:
        """A Dask request running ``functions`` of hostile.py."""
        return self.dask(*functions, File="hostile.py", **fields)


def _is_guard(pid: int) -> bool:
    """True when ``pid`` is the server's guard process (``measuring.server.pool.guard``)."""
    try:
        return "measuring.server.pool.guard" in psutil.Process(pid).cmdline()
    except psutil.Error:
        return True  # ended meanwhile
