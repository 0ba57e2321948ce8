"""
The cluster when things go wrong, and over TLS: a scheduler down when the server starts and back
later, a scheduler stopped in the middle of a job, a scheduler reporting other versions, and a
``tls://`` cluster with a self-signed CA. Real ``dask scheduler`` and ``dask worker`` processes and
the real ``twistd -n measuring``, all on loopback; each test makes its own and ends them.
"""

from __future__ import annotations

import os
import time
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from measuring.test.e2e.test_cluster import BASE, folder, write_data
from measuring.test.e2e.test_tls import write_self_signed
from measuring.test.support import Server
from measuring.test.support.cluster import DaskCluster, shared, wait_for

#: --scheduler-timeout for these tests: a job that cannot reach the scheduler fails after it.
REACH = 2.0
#: A preload for the scheduler: it reports a dask version no one has.
OLD_DASK = """
import distributed.node
import distributed.versions


def _old(packages=None):
    found = distributed.versions.get_versions(packages)
    found["packages"]["dask"] = "2000.1.0"
    return found


distributed.node.get_versions = _old
"""


class FaultTestCase(SynchronousTestCase):
    """A folder of data, and clusters and servers on it that cleanup ends."""

    def setUp(self) -> None:
        self.top = folder("faults")
        self.data = os.path.join(self.top, "data")
        os.makedirs(self.data)
        write_data(self.data)

    def cluster(self, **options: Any) -> DaskCluster:
        """A cluster (not started) that cleanup stops."""
        cluster = DaskCluster(os.path.join(self.top, "dask"), **options)
        self.addCleanup(cluster.stop)
        return cluster

    def server(self, cluster: DaskCluster, *arguments: str) -> Server:
        """A server computing on ``cluster``; cleanup stops it."""
        where = os.path.join(self.top, "server")
        os.makedirs(where, exist_ok=True)
        server = Server(
            where, "--data-root", self.data, "--scheduler", cluster.address,
            "--scheduler-timeout", str(REACH), "--workers", "1", *arguments,
        )  # fmt: skip
        self.addCleanup(server.stop)
        return server

    def request(self, *functions: str, **fields: Any) -> dict[str, Any]:
        request: dict[str, Any] = {"Directory": self.data, "Base": BASE, "File": "work.py"}
        return {"Header": "Dask", "Request": {**request, "Functions": list(functions), **fields}}

    def cluster_status(self, server: Server) -> dict[str, Any]:
        """What Status says of the cluster, once the server has looked at it."""

        def looked() -> dict[str, Any] | None:
            cluster: dict[str, Any] = server.ask({"Header": "Info", "Request": "Status"})[
                "Response"
            ]["Cluster"]
            return cluster if cluster["Reachable"] is not None else None

        return wait_for(looked, "the server's first look at the cluster")


class SchedulerDownTests(FaultTestCase):
    """Without its scheduler the server runs on, answers, and fails jobs quickly and clearly."""

    def test_downAtStartThenBack(self) -> None:
        """Down at start: logged, Info answers, a job is Unavailable in time; back: jobs run."""
        cluster = self.cluster(workers=1)
        server = self.server(cluster)
        wait_for(lambda: "jobs fail with Unavailable" in server.log(), "the server to say so")
        status = self.cluster_status(server)
        self.assertEqual((status["Address"], status["Reachable"]), (cluster.address, False))
        self.assertIn("cannot be reached", status["Error"])
        started = time.monotonic()
        answer = server.ask(self.request("peak"))
        self.assertLess(time.monotonic() - started, REACH + 20)
        self.assertEqual(answer["Error"]["Code"], "Unavailable", answer)
        self.assertIn(
            f"scheduler at {cluster.address} cannot be reached", answer["Error"]["Message"]
        )
        cluster.start()
        answer = server.ask(self.request("peak"))
        self.assertEqual(answer["Status"], "OK", answer)
        wait_for(lambda: self.cluster_status(server)["Reachable"], "Status to see it back")
        self.assertIn("back: the cluster", server.log())

    def test_stoppedDuringJob(self) -> None:
        """A job whose scheduler goes away fails Unavailable in a bounded time, saying so."""
        cluster = self.cluster(workers=1).start()
        server = self.server(cluster)
        open(os.path.join(self.data, "hold"), "w").close()
        answer = server.ask(self.request("held", Async=True))
        wait_for(lambda: cluster.executing() > 0, "the held task to run")
        cluster.stop_scheduler()
        os.remove(os.path.join(self.data, "hold"))
        job = answer["Job"]

        def ended() -> dict[str, Any] | None:
            status: dict[str, Any] = server.ask({"Header": "Job", "Request": "Status", "Job": job})[
                "Response"
            ]
            return status if status["State"] != "running" else None

        status = wait_for(ended, "the job to end", REACH + 30)
        self.assertEqual(status["Error"]["Code"], "Unavailable", status)
        self.assertIn("was lost during the job", status["Error"]["Message"])


class VersionTests(FaultTestCase):
    """A cluster of other versions is refused, naming the packages and their versions."""

    def test_mismatch(self) -> None:
        """The start log, Status and a job's error name dask's versions here and there."""
        preload = os.path.join(self.top, "old_dask.py")
        with open(preload, "w") as f:
            f.write(OLD_DASK)
        cluster = self.cluster(workers=1, preload=preload).start()
        server = self.server(cluster)
        status = self.cluster_status(server)
        self.assertIn("2000.1.0 on the scheduler", status["Versions"])
        self.assertTrue(status["Reachable"])
        answer = server.ask(self.request("peak"))
        self.assertEqual(answer["Error"]["Code"], "Unavailable", answer)
        self.assertRegex(
            answer["Error"]["Message"], r"runs other versions than this server: dask \S+ here, "
            r"2000\.1\.0 on the scheduler"
        )  # fmt: skip
        self.assertIn("2000.1.0 on the scheduler", server.log())


class TLSFixture:
    """A tls:// cluster with a self-signed CA, and a server on it with the certificates."""

    def __init__(self) -> None:
        self.top = folder("tls")
        self.data = os.path.join(self.top, "data")
        os.makedirs(self.data)
        self.frame = write_data(self.data)
        key, cert = write_self_signed(self.top)
        self.files = (cert, cert, key)
        self.cluster = DaskCluster(os.path.join(self.top, "dask"), workers=2, tls=self.files)
        self.cluster.start()
        os.makedirs(os.path.join(self.top, "server"))
        self.server = Server(
            os.path.join(self.top, "server"), "--data-root", self.data,
            "--scheduler", self.cluster.address, "--scheduler-ca", cert,
            "--scheduler-cert", cert, "--scheduler-key", key,
        )  # fmt: skip

    def end(self) -> None:
        self.server.stop()
        self.cluster.stop()


class TLSTests(SynchronousTestCase):
    """Jobs on a cluster that speaks only TLS."""

    def setUp(self) -> None:
        self.tls = shared.get("tls-cluster", TLSFixture, TLSFixture.end)

    def request(self, *functions: str) -> dict[str, Any]:
        fields = {"Directory": self.tls.data, "Base": BASE, "File": "work.py"}
        return {"Header": "Dask", "Request": {**fields, "Functions": list(functions)}}

    def test_job(self) -> None:
        """A job computes on the TLS cluster's workers, and Status sees the cluster."""
        answer = self.tls.server.ask(self.request("count", "workers"))
        self.assertEqual(answer["Status"], "OK", answer)
        self.assertEqual(answer["Response"]["Results"]["count"]["Value"], len(self.tls.frame))
        status = self.tls.server.ask({"Header": "Info", "Request": "Status"})["Response"]
        self.assertEqual(status["Cluster"]["Address"], self.tls.cluster.address)
        self.assertTrue(self.tls.cluster.address.startswith("tls://"))

    def test_plainClientRefused(self) -> None:
        """A server speaking plain TCP to the TLS scheduler fails its jobs with Unavailable."""
        where = os.path.join(self.tls.top, "plain")
        os.makedirs(where, exist_ok=True)
        address = self.tls.cluster.address.replace("tls://", "tcp://")
        server = Server(where, "--data-root", self.tls.data, "--scheduler", address,
                        "--scheduler-timeout", str(REACH))  # fmt: skip
        self.addCleanup(server.stop)
        answer = server.ask(self.request("count"))
        self.assertEqual(answer["Error"]["Code"], "Unavailable", answer)
        self.assertIn("cannot be reached", answer["Error"]["Message"])
