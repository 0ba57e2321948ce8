"""
End to end, a job's life: background jobs, Progress, cancelling, time and memory limits, processes
a formula leaves behind, the queue, and jobs that outlive a crash or a stop of the server.

Each test starts the real ``twistd -n measuring`` in its own folder and speaks to it over sockets;
cleanup checks that every server stopped cleanly and left no process behind. Formulas that must
run for a while wait on marker files, so the tests never sleep longer than a poll.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import pandas as pd
import psutil
from twisted.trial.unittest import SynchronousTestCase

from measuring.messages import JOB_MARK
from measuring.test.support import Connection, Server, sample_frame, write_dataset, write_formulas

T = TypeVar("T")

PATIENCE = 60.0
POLL = 0.05
#: How long a stopping server may take, at most, to count as stopping "within a few seconds".
STOPPING = 15.0
FINISHED = ("done", "failed", "cancelled", "timeout")
JOB_ID = re.compile(r"\d{8}-\d{6}-[0-9a-f]{6}")

FORMULAS = '''
import os
import subprocess
import time


def _job():
    return os.environ["MEASURING_JOB"]


def _note(event):
    """Write the time of ``event`` (start, end) into times/<job>.<event>."""
    os.makedirs("times", exist_ok=True)
    path = os.path.join("times", f"{_job()}.{event}")
    with open(path + ".new", "w") as f:
        f.write(repr(time.time()))
    os.replace(path + ".new", path)


def mean_by_sensor(df):
    print(f"mean_by_sensor ran in job {_job()}")
    return df.groupby("sensor").value.mean()


def minutely(df):
    return df.set_index("time", sorted=True).value.resample("1min").mean()


def total(df):
    return df.value.sum()


def held(df):
    """Runs while the file "hold" exists, until "release-<job>" appears (a minute at most)."""
    _note("start")
    deadline = time.monotonic() + 60
    while (
        os.path.exists("hold")
        and not os.path.exists(f"release-{_job()}")
        and time.monotonic() < deadline
    ):
        time.sleep(0.02)
    _note("end")
    return len(df)


def spin(df):
    while True:
        time.sleep(0.01)


def hog(df):
    """Takes 8 MiB more every 20 ms (up to 4 GiB), and never returns."""
    chunks = []
    while True:
        if len(chunks) < 512:
            chunks.append(b"x" * (8 * 2**20))
        time.sleep(0.02)


def escape(df):
    """Starts two "sleep 300" that leave the job's process group; returns their pids."""
    sleeper = subprocess.Popen(["sleep", "300"], start_new_session=True)
    child = os.fork()
    if child == 0:
        try:
            os.setsid()
            os.execvp("sleep", ["sleep", "300"])
        finally:
            os._exit(127)
    return f"{sleeper.pid} {child}"
'''


def alive(pids: Iterable[int]) -> list[int]:
    """Those of ``pids`` that are still running (a zombie has ended)."""
    running = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                running.append(pid)
        except psutil.NoSuchProcess:
            continue
    return running


def carrying(job: str) -> list[int]:
    """Pids of the running processes whose environment marks them as ``job``'s."""
    found = []
    for process in psutil.process_iter(["environ", "status"]):
        environ = process.info["environ"] or {}
        if environ.get(JOB_MARK) == job and process.info["status"] != "zombie":
            found.append(process.pid)
    return found


class ServerTestCase(SynchronousTestCase):
    """A folder with the sample data and ``lifecycle.py``; servers on it, checked at cleanup."""

    def setUp(self) -> None:
        self.folder = os.path.realpath(self.mktemp())
        os.makedirs(self.folder)
        self.frame = sample_frame()
        write_dataset(self.folder, frame=self.frame)
        write_formulas(self.folder, FORMULAS, name="lifecycle.py")
        self.servers: list[Server] = []
        self.crashed: list[Server] = []

    def start(self, *arguments: str) -> Server:
        """
        A server on this folder (and its state directory, so a second one takes over the first
        one's jobs). ``--stop-grace 1`` comes first, so a stop never waits long for a job a test
        left running; the previous server's log is kept as ``server-<n>.log``.
        """
        log = os.path.join(self.folder, "server.log")
        if os.path.exists(log):
            shutil.copy(log, os.path.join(self.folder, f"server-{len(self.servers)}.log"))
        server = Server(self.folder, "--data-root", self.folder, "--stop-grace", "1", *arguments)
        self.servers.append(server)
        self.addCleanup(self.stop_and_check, server)
        return server

    def stop_and_check(self, server: Server) -> None:
        """Stop the server; it must stop cleanly and take every process it started with it."""
        left = server.descendants()
        code = server.stop()
        if server not in self.crashed and code not in (0, -signal.SIGTERM):
            self.fail(f"the server exited with {code}; see {server.log_path}")
        self.wait_for(lambda: not alive(left), "the server's processes ending with it")

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
        deadline = time.monotonic() + patience
        while True:
            value = condition()
            if value:
                return value
            if time.monotonic() > deadline:
                self.fail(f"waited {patience:g} s for {what if isinstance(what, str) else what()}")
            time.sleep(POLL)

    # -- requests

    def dask(self, *functions: str, **fields: object) -> dict[str, Any]:
        """A Dask request running ``functions`` of lifecycle.py over the sample data."""
        request = {"Directory": self.folder, "Base": "time_series.parquet", "File": "lifecycle.py"}
        return {"Header": "Dask", "Request": {**request, "Functions": list(functions), **fields}}

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

    # -- markers and notes the formulas leave

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


class AsyncJobTests(ServerTestCase):
    """Jobs in the background, followed with Job requests."""

    def test_asyncJobMatchesSyncAnswer(self) -> None:
        """An Async job is accepted at once, ends done as a sync one, and Job requests show it."""
        server = self.start()
        functions = ("mean_by_sensor", "minutely", "total")
        sync = server.ask(self.dask(*functions))
        self.assertEqual(sync["Status"], "OK", sync)

        accepted = server.ask(self.dask(*functions, Async=True))
        job = accepted["Job"]
        self.assertEqual(accepted, {"Header": "Dask", "Status": "Accepted", "Job": job})
        self.assertRegex(job, JOB_ID)
        seen: list[str] = []
        status = self.wait_for_job(server, job, *FINISHED, seen=seen)
        self.assertIn(seen[0], ("queued", "running"))
        self.assertEqual(seen, [s for s in ("queued", "running", "done") if s in seen], seen)
        self.assertEqual(status["State"], "done", status)
        self.assertEqual(status["Attempts"], 1)
        self.assertEqual(status["Directory"], self.folder)
        self.assertEqual(status["Functions"], list(functions))
        self.assertIsNotNone(status["Started"])
        self.assertIsNotNone(status["Finished"])
        self.assertIsInstance(status["Elapsed"], float)

        results = status["Results"]
        self.assertEqual(results["mean_by_sensor"]["File"], f"results/{job}/mean_by_sensor.parquet")
        self.assertEqual(_without_files(results), _without_files(sync["Response"]["Results"]))
        self.assert_means(results)
        self.assertAlmostEqual(results["total"]["Value"], self.frame.value.sum(), places=6)

        listed = server.ask({"Header": "Job", "Request": "List"})["Response"]["Jobs"]
        self.assertEqual(
            [(j["Job"], j["State"]) for j in listed], [(job, "done"), (sync["Job"], "done")]
        )

        log = self.job(server, "Log", job)["Response"]["Log"]
        self.assertIn(f"mean_by_sensor ran in job {job}", log)

        expected = self.frame.set_index("time").value.resample("1min").mean()
        records = []
        for offset in (0, 100):
            page = self.job(server, "Result", job, Name="minutely", Offset=offset, Limit=100)
            response = page["Response"]
            self.assertEqual(
                (response["Name"], response["Kind"], response["Rows"], response["Offset"]),
                ("minutely", "Series", len(expected), offset),
            )
            records += response["Records"]
        self.assertEqual(len(records), len(expected))
        self.assertEqual([pd.Timestamp(r["time"]) for r in records], list(expected.index))
        for record, value in zip(records, expected, strict=True):
            self.assertTrue(math.isclose(record["value"], value, rel_tol=1e-12), (record, value))
        scalar = self.job(server, "Result", job, Name="total")["Response"]
        self.assertEqual(scalar, {"Name": "total", **results["total"]})


def _without_files(results: dict[str, Any]) -> dict[str, Any]:
    """Results without their File, which names the job."""
    return {
        name: {k: v for k, v in entry.items() if k != "File"} for name, entry in results.items()
    }


class ProgressTests(ServerTestCase):
    """Progress lines while a job runs over a dataset of several Parquet files."""

    def setUp(self) -> None:
        super().setUp()
        parts = os.path.join(self.folder, "parts")
        os.makedirs(parts)
        for number, start in enumerate(range(0, len(self.frame), 2500)):
            chunk = self.frame.iloc[start : start + 2500]
            write_dataset(parts, f"part.{number}.parquet", frame=chunk)

    def receive_progress(
        self, connection: Connection
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """The Progress lines coming on ``connection``, and the answer after them."""
        lines = [connection.receive()]
        while lines[-1]["Header"] == "Progress":
            lines.append(connection.receive())
        *progress, answer = lines
        self.assertNotEqual(progress, [])
        for line in progress:
            self.assertEqual(set(line), {"Header", "Job", "Done", "Total", "Id"})
            self.assertEqual(line["Job"], answer["Job"])
            self.assertLessEqual(line["Done"], line["Total"])
        self.assertGreater(progress[-1]["Total"], 1)
        self.assertEqual(progress[-1]["Done"], progress[-1]["Total"])
        return progress, answer

    def test_progressBeforeAnswer(self) -> None:
        """A sync Progress request gets its job's Progress up to Done == Total, then its answer."""
        server = self.start()
        request = self.dask("mean_by_sensor", "total", Base="parts", Progress=True)
        with server.connect() as connection:
            connection.send({**request, "Id": "progress-1"})
            progress, answer = self.receive_progress(connection)
        self.assertEqual(answer["Status"], "OK", answer)
        self.assertEqual({line["Id"] for line in [*progress, answer]}, {"progress-1"})
        self.assert_means(answer["Response"]["Results"])

    def test_asyncProgressThenAnswer(self) -> None:
        """An Async Progress request gets Accepted, its job's Progress, then the job's answer."""
        server = self.start()
        request = self.dask("mean_by_sensor", "total", Base="parts", Progress=True, Async=True)
        with server.connect() as connection:
            accepted = connection.ask({**request, "Id": 7})
            self.assertEqual((accepted["Status"], accepted["Id"]), ("Accepted", 7), accepted)
            progress, answer = self.receive_progress(connection)
        self.assertEqual((answer["Header"], answer["Status"]), ("Dask", "OK"), answer)
        self.assertEqual(answer["Job"], accepted["Job"])
        self.assertEqual({line["Id"] for line in [*progress, answer]}, {7})
        self.assert_means(answer["Response"]["Results"])


class CancelTests(ServerTestCase):
    """Job Cancel on a queued, a running and a finished job."""

    def test_cancelQueuedJob(self) -> None:
        """A queued job that is cancelled never starts: cancelled, Attempts 0, no results."""
        server = self.start("--workers", "1")
        self.hold()
        running = self.submit(server, "held")
        queued = self.submit(server, "mean_by_sensor")
        self.wait_started(running)
        answer = self.job(server, "Cancel", queued)
        self.assertEqual((answer["Status"], answer["Response"]), ("OK", {"State": "cancelled"}))
        self.release_all()
        self.assertEqual(self.wait_for_job(server, running, *FINISHED)["State"], "done")
        status = self.status(server, queued)
        self.assertEqual((status["State"], status["Attempts"]), ("cancelled", 0))
        self.assertIsNone(status["Started"])
        self.assertEqual(status["Error"]["Code"], "Cancelled")
        self.assertFalse(os.path.exists(os.path.join(self.folder, "results", queued)))

    def test_cancelRunningJob(self) -> None:
        """A cancelled running job ends cancelled, its client gets Cancelled, its processes end."""
        server = self.start("--workers", "1")
        with server.connect() as client:
            client.send({**self.dask("spin"), "Id": "spinning"})
            (process,) = self.wait_for(
                lambda: self.info(server, "Dask process")["Processes"], "the job running"
            )
            job = process["Job"]
            answer = self.job(server, "Cancel", job)
            self.assertEqual(answer["Response"], {"State": "cancelled"})
            ended = client.receive()
        self.assertEqual((ended["Id"], ended["Job"]), ("spinning", job))
        self.assertEqual(ended["Error"]["Code"], "Cancelled", ended)
        status = self.status(server, job)
        self.assertEqual((status["State"], status["Attempts"]), ("cancelled", 1))
        self.assertEqual(status["Error"]["Code"], "Cancelled")
        self.assertEqual(self.info(server, "Dask process")["Count"], 0)
        self.wait_for(lambda: not alive([process["Pid"]]), "the job's worker ending")
        self.assertEqual(carrying(job), [])

    def test_cancelDoneJob(self) -> None:
        """Cancelling a job that is done answers done, and the job keeps its results."""
        server = self.start()
        answer = server.ask(self.dask("total"))
        job = answer["Job"]
        cancel = self.job(server, "Cancel", job)
        self.assertEqual((cancel["Status"], cancel["Response"]), ("OK", {"State": "done"}))
        status = self.status(server, job)
        self.assertEqual(status["State"], "done")
        self.assertEqual(status["Results"], answer["Response"]["Results"])


class LimitTests(ServerTestCase):
    """Time and memory limits stop a job and all its processes; the server carries on."""

    def test_requestTimeout(self) -> None:
        """A looping formula with "Timeout": 1 ends timeout, and its client gets Code Timeout."""
        server = self.start()
        answer = server.ask(self.dask("spin", Timeout=1))
        self.assertEqual(answer["Error"]["Code"], "Timeout", answer)
        self.assertIn("limit of 1 s", answer["Error"]["Message"])
        status = self.status(server, answer["Job"])
        self.assertEqual(status["State"], "timeout")
        self.assertEqual(status["Error"]["Code"], "Timeout")
        self.assertEqual(self.info(server, "Dask process")["Count"], 0)

    def test_timeoutCappedByServer(self) -> None:
        """A Timeout above --job-timeout is held to --job-timeout."""
        server = self.start("--job-timeout", "2")
        job = self.submit(server, "spin", Timeout=100)
        status = self.wait_for_job(server, job, *FINISHED, patience=STOPPING)
        self.assertEqual((status["State"], status["Error"]["Code"]), ("timeout", "Timeout"))
        self.assertIn("limit of 2 s", status["Error"]["Message"])

    def test_memoryLimit(self) -> None:
        """Memory without end fails the job with MemoryLimit and its size; the server goes on."""
        server = self.start("--job-memory", "300MB")
        answer = server.ask(self.dask("hog"))
        self.assertEqual(answer["Error"]["Code"], "MemoryLimit", answer)
        message = answer["Error"]["Message"]
        self.assertIn("more than its limit of 286 MiB (--job-memory)", message)
        used = re.search(r"used ([\d.]+) (MiB|GiB) of memory", message)
        assert used is not None, message
        self.assertGreater(float(used[1]) * (2**30 if used[2] == "GiB" else 2**20), 300e6)
        status = self.status(server, answer["Job"])
        self.assertEqual((status["State"], status["Error"]["Code"]), ("failed", "MemoryLimit"))
        self.assertEqual(self.info(server, "Status")["State"], "running")
        self.assertEqual(self.info(server, "Dask process")["Count"], 0)


class LeftoverProcessTests(ServerTestCase):
    """Processes a formula starts end with its job."""

    def test_escapedChildrenEnd(self) -> None:
        """Processes a formula left outside its group end with the job; warm workers remain."""
        server = self.start()
        answer = server.ask(self.dask("escape"))
        self.assertEqual(answer["Status"], "OK", answer)
        children = [int(pid) for pid in answer["Response"]["Results"]["escape"]["Value"].split()]
        self.assertEqual(len(children), 2)
        self.wait_for(lambda: not alive(children), "the formula's sleep 300 ending")
        self.assertEqual(carrying(answer["Job"]), [])

        def only_workers() -> bool:
            tree = self.info(server, "All process")["Service"]["Tree"]
            workers = {process["Pid"] for process in tree if process["Role"] == "worker"}
            return len(workers) == 2 and set(server.descendants()) == workers

        self.wait_for(only_workers, "the server's processes to be its two warm workers")


class QueueTests(ServerTestCase):
    """At most --workers jobs run; the others wait in arrival order, up to --max-queued."""

    def test_atMostWorkersRunInArrivalOrder(self) -> None:
        """Five jobs on two workers: at most two run at once, in arrival order, and all end done."""
        server = self.start("--workers", "2")
        self.hold()
        jobs = [self.submit(server, "held")]
        self.wait_started(jobs[0])
        jobs += [self.submit(server, "held") for _ in range(4)]
        self.assertEqual(self.info(server, "Status")["Jobs"], {"Running": 2, "Queued": 3})
        # Release one job at a time, once the next one runs too: starts cannot tie.
        for index, job in enumerate(jobs):
            self.wait_started(*jobs[index : index + 2])
            self.release(job)
            self.assertEqual(self.wait_for_job(server, job, *FINISHED)["State"], "done")
        for job in jobs:
            self.assertEqual(self.status(server, job)["Results"]["held"]["Value"], len(self.frame))

        starts = [self.noted(job, "start") or 0.0 for job in jobs]
        ends = [self.noted(job, "end") or 0.0 for job in jobs]
        self.assertEqual(sorted(starts), starts)
        events = sorted([(end, -1) for end in ends] + [(start, 1) for start in starts])
        running = most = 0
        for _, change in events:
            running += change
            most = max(most, running)
        self.assertEqual(most, 2)

    def test_busyBeyondMaxQueued(self) -> None:
        """With one job running and --max-queued 1 waiting, a new job gets Busy at once."""
        server = self.start("--workers", "1", "--max-queued", "1")
        self.hold()
        running = self.submit(server, "held")
        self.wait_started(running)
        queued = self.submit(server, "held")
        answer = server.ask(self.dask("total", Async=True))
        self.assertEqual((answer["Status"], answer["Error"]["Code"]), ("Error", "Busy"), answer)
        self.assertIn("--max-queued 1", answer["Error"]["Message"])
        self.assertEqual(self.info(server, "Status")["Jobs"], {"Running": 1, "Queued": 1})
        listed = server.ask({"Header": "Job", "Request": "List"})["Response"]["Jobs"]
        self.assertEqual([job["Job"] for job in listed], [queued, running])


class DurabilityTests(ServerTestCase):
    """Accepted jobs outlive a crash or a stop of the server."""

    def test_jobsSurviveKill(self) -> None:
        """After kill -9 the next server runs every job to done, the interrupted one twice."""
        server = self.start("--workers", "1")
        self.hold()
        jobs = [self.submit(server, "held", "mean_by_sensor") for _ in range(3)]
        self.wait_started(jobs[0])
        self.assertEqual(self.status(server, jobs[1])["State"], "queued")
        self.crash(server)
        self.release_all()

        server = self.start("--workers", "1")
        for job in jobs:
            status = self.wait_for_job(server, job, *FINISHED)
            self.assertEqual(status["State"], "done", status)
            self.assertEqual(status["Results"]["held"]["Value"], len(self.frame))
            self.assert_means(status["Results"])
        attempts = [self.status(server, job)["Attempts"] for job in jobs]
        self.assertEqual(attempts, [2, 1, 1])
        self.assertEqual(sorted(os.listdir(os.path.join(self.folder, "results"))), sorted(jobs))

    def test_stopRequeuesRunningJob(self) -> None:
        """SIGTERM stops the server after the grace; the next server runs the running job again."""
        server = self.start("--workers", "1", "--stop-grace", "1")
        self.hold()
        job = self.submit(server, "held")
        self.wait_started(job)
        workers = server.descendants()
        server.process.send_signal(signal.SIGTERM)
        try:
            code = server.process.wait(STOPPING)
        except subprocess.TimeoutExpired:
            self.fail(f"the server did not stop within {STOPPING:g} s of SIGTERM")
        self.assertIn(code, (0, -signal.SIGTERM))
        self.wait_for(lambda: not alive(workers), "the workers ending with the server")
        self.assertEqual(self.recorded(job), ("queued", 1))
        self.release_all()

        server = self.start("--workers", "1")
        status = self.wait_for_job(server, job, *FINISHED)
        self.assertEqual((status["State"], status["Attempts"]), ("done", 2), status)
        self.assertEqual(status["Results"]["held"]["Value"], len(self.frame))

    def recorded(self, job: str) -> tuple[str, int]:
        """A job's state and attempts in the job database, read while no server runs."""
        path = os.path.join(self.folder, ".measuring", "jobs.sqlite")
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            row = db.execute("SELECT state, attempts FROM jobs WHERE id = ?", (job,)).fetchone()
        return (row[0], row[1])
