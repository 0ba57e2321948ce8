"""
Jobs on a real dask.distributed cluster: ``dask scheduler`` and two ``dask worker`` processes on
loopback, started by the tests, and the real ``twistd -n measuring --scheduler ...``.

The cluster, a folder of data and two servers on it (one computing on the cluster, one in its own
worker processes, to compare numbers with) are made once for the class by its first test
(``support.cluster.shared``) and ended when the test run ends. Every test leaves the scheduler
without a task: its cleanup fails it otherwise.
"""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import pandas as pd
from twisted.trial.unittest import SynchronousTestCase

from measuring.client import BadRequest, Client, JobFailed, NotFound
from measuring.test.e2e.test_cli import cli
from measuring.test.support import FINISHED, Server, sample_frame, write_formulas
from measuring.test.support.cluster import DaskCluster, shared, wait_for
from measuring.test.support.formulas import CLUSTER_FORMULAS, FORMULAS

BASE = "series"
PARTITIONS = 4


def write_data(folder: str) -> pd.DataFrame:
    """A dataset of ``PARTITIONS`` Parquet files (a partition each) in ``folder``/series."""
    frame = sample_frame(rows=8_000)
    os.makedirs(os.path.join(folder, BASE))
    size = len(frame) // PARTITIONS
    for n in range(PARTITIONS):
        part = frame.iloc[n * size : (n + 1) * size]
        part.to_parquet(os.path.join(folder, BASE, f"part.{n}.parquet"), index=False)
    write_formulas(folder, CLUSTER_FORMULAS, name="work.py")
    return frame


@dataclass
class Fixture:
    """What a class of cluster tests shares."""

    cluster: DaskCluster
    data: str
    frame: pd.DataFrame
    on_cluster: Server
    local: Server

    def end(self) -> None:
        for server in (self.on_cluster, self.local):
            server.stop()
        self.cluster.stop()


def folder(name: str) -> str:
    """A new folder for shared fixtures, below trial's working directory."""
    return os.path.realpath(tempfile.mkdtemp(prefix=f"{name}-", dir="."))


def make_fixture() -> Fixture:
    top = folder("cluster")
    data = os.path.join(top, "data")
    os.makedirs(data)
    frame = write_data(data)
    cluster = DaskCluster(os.path.join(top, "dask"), workers=2).start()
    servers = []
    for name, extra in (("on-cluster", ["--scheduler", cluster.address]), ("local", [])):
        os.makedirs(os.path.join(top, name))
        servers.append(
            Server(os.path.join(top, name), "--data-root", data, "--stop-grace", "1", *extra)
        )
    return Fixture(cluster, data, frame, *servers)


class ClusterTestCase(SynchronousTestCase):
    """The class's shared cluster and servers; cleanup checks the scheduler holds no task."""

    def setUp(self) -> None:
        self.fixture = shared.get("tcp-cluster", make_fixture, Fixture.end)
        self.cluster = self.fixture.cluster
        self.server = self.fixture.on_cluster
        self.data = self.fixture.data
        self.addCleanup(self.nothing_left)

    def nothing_left(self) -> None:
        """The scheduler holds no task and no worker computes one, once the test is done."""
        self.unhold()
        wait_for(lambda: self.cluster.tasks() == 0, "the scheduler to hold no task", 10)
        wait_for(lambda: self.cluster.executing() == 0, "the workers to compute nothing", 10)

    def hold(self) -> None:
        open(os.path.join(self.data, "hold"), "w").close()

    def unhold(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(self.data, "hold"))

    def request(self, *functions: str, **fields: Any) -> dict[str, Any]:
        """A Dask request over the shared data running ``functions`` of work.py."""
        request: dict[str, Any] = {"Directory": self.data, "Base": BASE, "File": "work.py"}
        if functions:
            request["Functions"] = list(functions)
        return {"Header": "Dask", "Request": {**request, **fields}}

    def run_job(self, server: Server, *functions: str, **fields: Any) -> dict[str, Any]:
        """The answer to a job (sync) of ``functions``; it must be OK."""
        answer = server.ask(self.request(*functions, **fields))
        self.assertEqual(answer["Status"], "OK", answer)
        return answer

    def submit(self, *functions: str, **fields: Any) -> str:
        answer = self.server.ask(self.request(*functions, Async=True, **fields))
        self.assertEqual(answer["Status"], "Accepted", answer)
        return str(answer["Job"])

    def job_status(self, job: str) -> dict[str, Any]:
        answer = self.server.ask({"Header": "Job", "Request": "Status", "Job": job})
        self.assertEqual(answer["Status"], "OK", answer)
        status: dict[str, Any] = answer["Response"]
        return status

    def wait_for_state(self, job: str, *states: str) -> dict[str, Any]:
        """Poll Job Status until the job is in one of ``states``; returns that Status."""

        def reached() -> dict[str, Any] | None:
            status = self.job_status(job)
            return status if status["State"] in states else None

        return wait_for(reached, f"job {job} to be {' or '.join(states)}")

    def table(self, answer: dict[str, Any], name: str) -> pd.DataFrame:
        return pd.read_parquet(os.path.join(self.data, answer["Response"]["Results"][name]["File"]))


class ClusterJobTests(ClusterTestCase):
    """A job's computation runs on the cluster's workers and gives what a local run gives."""

    def test_partitionsOnClusterWorkers(self) -> None:
        """Each partition is computed by one of the cluster's workers, and both take part."""
        answer = self.run_job(self.server, "workers")
        addresses = set(self.table(answer, "workers")["address"])
        self.assertEqual(addresses, self.cluster.worker_addresses())

    def test_numbersEqualLocalRun(self) -> None:
        """Tables and single values are the same as the server's own workers compute."""
        names = ("mean_by_sensor", "peak", "count")
        remote = self.run_job(self.server, *names)
        local = self.run_job(self.fixture.local, *names)
        pd.testing.assert_frame_equal(
            self.table(remote, "mean_by_sensor"), self.table(local, "mean_by_sensor")
        )
        for name in ("peak", "count"):
            results = [answer["Response"]["Results"][name] for answer in (remote, local)]
            self.assertEqual(results[0], results[1])
        self.assertEqual(remote["Response"]["Results"]["count"]["Value"], len(self.fixture.frame))

    def test_progress(self) -> None:
        """Progress lines count the tasks on the scheduler up to all of them, then the answer."""
        with self.server.connect() as connection:
            connection.send(self.request("mean_by_sensor", "peak", Progress=True))
            lines = []
            while (line := connection.receive())["Header"] == "Progress":
                lines.append((line["Done"], line["Total"]))
        self.assertEqual(line["Status"], "OK", line)
        self.assertTrue(lines, "no Progress line")
        total = lines[-1][1]
        self.assertGreaterEqual(total, PARTITIONS)
        self.assertEqual(lines[-1], (total, total))
        self.assertEqual([done for done, _ in lines], sorted(done for done, _ in lines))

    def test_formulaRaisesOnWorker(self) -> None:
        """An exception in a task on a cluster worker names the formula file's line."""
        answer = self.server.ask(self.request("broken"))
        self.assertEqual(answer["Error"]["Code"], "JobFailed", answer)
        self.assertIn("ZeroDivisionError", answer["Error"]["Message"])
        self.assertRegex(answer["Error"]["Message"], r"\(work\.py line \d+\)")

    def test_moduleFunctionByValue(self) -> None:
        """A function of the formula file itself in the tasks reaches workers without it."""
        answer = self.run_job(self.server, "doubled")
        self.assertAlmostEqual(
            answer["Response"]["Results"]["doubled"]["Value"], 2 * self.fixture.frame.value.sum()
        )

    def test_fastparquet(self) -> None:
        """The fastparquet reader's own code travels to the workers too."""
        answer = self.run_job(self.server, "mean_by_sensor", Engine="fastparquet")
        expected = self.fixture.frame.groupby("sensor").value.mean()
        pd.testing.assert_series_equal(
            self.table(answer, "mean_by_sensor")["value"], expected, check_names=False
        )

    def test_sameFileNames(self) -> None:
        """Two jobs at once whose formula files share a name each run their own code."""
        for name, source in (("a", FORMULAS), ("b", FORMULAS.replace(".mean()", ".max()"))):
            os.makedirs(os.path.join(self.data, name), exist_ok=True)
            write_formulas(os.path.join(self.data, name), source, name="work.py")
        jobs = {name: self.submit("mean_by_sensor", File=f"{name}/work.py") for name in ("a", "b")}
        found = {}
        for name, job in jobs.items():
            status = self.wait_for_state(job, "done", "failed")
            self.assertEqual(status["State"], "done", status)
            found[name] = pd.read_parquet(
                os.path.join(self.data, status["Results"]["mean_by_sensor"]["File"])
            )["value"]
        by_sensor = self.fixture.frame.groupby("sensor").value
        pd.testing.assert_series_equal(found["a"], by_sensor.mean(), check_names=False)
        pd.testing.assert_series_equal(found["b"], by_sensor.max(), check_names=False)

    def test_inlineCode(self) -> None:
        """Formulas sent as Code compute on the cluster, named by their Name."""
        with open(os.path.join(self.data, "work.py")) as f:
            code = f.read()
        answer = self.server.ask(
            {"Header": "Dask", "Request": {"Directory": self.data, "Base": BASE, "Code": code,
                                           "Name": "sent.py", "Functions": ["workers", "broken"]}}
        )  # fmt: skip
        self.assertEqual(answer["Error"]["Code"], "JobFailed", answer)
        self.assertRegex(answer["Error"]["Message"], r"\(sent\.py line \d+\)")
        answer = self.server.ask(
            {"Header": "Dask", "Request": {"Directory": self.data, "Base": BASE, "Code": code,
                                           "Name": "sent.py", "Functions": ["workers"]}}
        )  # fmt: skip
        addresses = set(self.table(answer, "workers")["address"])
        self.assertLessEqual(addresses, self.cluster.worker_addresses())


class InlineCodeTests(ClusterTestCase):
    """Formulas sent with the request, to the server's own workers: the client and the CLI."""

    def test_client(self) -> None:
        """Client.run(code=path) runs a local file the server does not have; errors name it."""
        local = os.path.join(self.fixture.data, "..", "mine.py")
        write_formulas(os.path.dirname(local), FORMULAS, name="mine.py")
        with Client("127.0.0.1", self.fixture.local.port) as client:
            job = client.run(self.data, BASE, functions=["peak"], code=local)
            self.assertEqual(job.results["peak"].value, self.fixture.frame.value.max())
            error = self.assertRaises(
                NotFound, client.run, self.data, BASE, functions=["nope"], code=local
            )
            self.assertIn("mine.py has no formula named 'nope'", error.message)
            error = self.assertRaises(
                BadRequest, client.run, self.data, BASE, code="def broken(df):\n    return (\n"
            )
            self.assertRegex(error.message, r"^formulas\.py line \d+: SyntaxError")
            error = self.assertRaises(
                JobFailed, client.run, self.data, BASE, code="def broken(df):\n    return 1 // 0\n"
            )
            self.assertIn("ZeroDivisionError", error.message)

    def test_cli(self) -> None:
        """measuring-client run DIR BASE --code work.py sends the local file and shows results."""
        local = os.path.join(self.fixture.data, "..", "mine.py")
        write_formulas(os.path.dirname(local), FORMULAS, name="mine.py")
        done = cli("--server", f"127.0.0.1:{self.fixture.local.port}", "run", self.data, BASE,
                   "--code", local, "-f", "count")  # fmt: skip
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn(str(len(self.fixture.frame)), done.stdout)
        both = cli("--server", f"127.0.0.1:{self.fixture.local.port}", "run", self.data, BASE,
                   "work.py", "--code", local)  # fmt: skip
        self.assertEqual(both.returncode, 2, both.stderr)
        self.assertIn("give FILE", both.stderr)


class ClusterStopTests(ClusterTestCase):
    """Timeout, Cancel and a killed job process leave nothing of the job on the cluster."""

    def held_job(self, **fields: Any) -> str:
        """A job whose tasks wait on the cluster's workers; returns once they run there."""
        self.hold()
        job = self.submit("held", **fields)
        wait_for(
            lambda: self.cluster.executing() > 0 or self.job_status(job)["State"] in FINISHED,
            "the held tasks to run on the cluster",
        )
        return job

    def test_cancel(self) -> None:
        """A cancelled job's futures are released: the scheduler holds none of its tasks."""
        job = self.held_job()
        answer = self.server.ask({"Header": "Job", "Request": "Cancel", "Job": job})
        self.assertEqual(answer["Response"]["State"], "cancelled", answer)
        wait_for(lambda: self.cluster.tasks() == 0, "the scheduler to let go of the job", 10)
        self.assertIn("held", self.job_status(job)["Functions"])

    def test_timeout(self) -> None:
        """A job past its Timeout ends timed out, and the scheduler holds none of its tasks."""
        job = self.held_job(Timeout=3)
        status = self.wait_for_state(job, "timeout", "failed", "done")
        self.assertEqual(status["State"], "timeout", status)
        wait_for(lambda: self.cluster.tasks() == 0, "the scheduler to let go of the job", 10)

    def test_killedJobProcess(self) -> None:
        """A job whose process is killed outright leaves no task on the scheduler."""
        job = self.held_job()
        processes = self.server.ask({"Header": "Info", "Request": "Dask process"})
        pid = next(p["Pid"] for p in processes["Response"]["Processes"] if p["Job"] == job)
        os.kill(pid, signal.SIGKILL)
        status = self.wait_for_state(job, "failed", "done")
        self.assertIn("killed by signal 9", status["Error"]["Message"])
        wait_for(lambda: self.cluster.tasks() == 0, "the scheduler to let go of the job", 10)


class ClusterInfoTests(ClusterTestCase):
    """Info shows the cluster: its address, workers, threads, memory and tasks."""

    def test_status(self) -> None:
        """Status names the scheduler, its 2 workers and threads, their memory, no task."""

        def looked() -> dict[str, Any] | None:
            answer = self.server.ask({"Header": "Info", "Request": "Status"})
            cluster: dict[str, Any] = answer["Response"]["Cluster"]
            return cluster if cluster["Reachable"] is not None else None

        cluster = wait_for(looked, "the server's first look at the cluster")
        self.assertEqual(
            {key: cluster[key] for key in ("Address", "Reachable", "Workers", "Threads")},
            {"Address": self.cluster.address, "Reachable": True, "Workers": 2, "Threads": 2},
        )
        self.assertGreater(cluster["Memory"], 0)
        self.assertEqual(cluster["Versions"], "match")
        self.assertIn("Checked", cluster)

    def test_tasksWhileRunning(self) -> None:
        """While a job's tasks run, Status and All statistic count them; each worker listed."""
        self.hold()
        job = self.submit("held")

        def counted() -> dict[str, Any] | None:
            answer = self.server.ask({"Header": "Info", "Request": "All statistic"})
            cluster: dict[str, Any] = answer["Response"]["Cluster"]
            return cluster if cluster["TaskStates"]["processing"] > 0 else None

        cluster = wait_for(counted, "All statistic to count the job's tasks")
        self.assertEqual(
            {worker["Address"] for worker in cluster["WorkerList"]},
            self.cluster.worker_addresses(),
        )
        status = self.server.ask({"Header": "Info", "Request": "Status"})["Response"]
        self.assertGreater(status["Cluster"]["Tasks"], 0)
        self.unhold()
        self.assertEqual(self.wait_for_state(job, "done", "failed")["State"], "done")

    def test_statusIsQuick(self) -> None:
        """Status answers within a second, the cluster's figures included."""
        started = time.monotonic()
        for _ in range(5):
            self.server.ask({"Header": "Info", "Request": "Status"})
        self.assertLess((time.monotonic() - started) / 5, 1.0)
