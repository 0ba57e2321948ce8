"""
The cluster when things go wrong, and over TLS: a scheduler down when the server starts and back
later, a scheduler stopped in the middle of a job, a scheduler reporting other versions, and a
``tls://`` cluster with a self-signed CA. Real ``dask scheduler`` and ``dask worker`` processes and
the real ``twistd -n measuring``, all on loopback, shared by the tests of a class
(``support.cluster.shared``): each test first puts the cluster in the state it needs.
"""

from __future__ import annotations

import contextlib
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
#: What the server logs when it finds the cluster unusable.
UNUSABLE = "jobs fail with Unavailable until the cluster is usable"
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


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


class FaultFixture:
    """
    A folder of data, a tcp:// cluster of one worker that the tests stop and start again (with
    the scheduler preload they need), and a server on it, started while the cluster was down.
    """

    def __init__(self) -> None:
        self.top = folder("faults")
        self.data = os.path.join(self.top, "data")
        os.makedirs(self.data)
        write_data(self.data)
        self.old_dask = os.path.join(self.top, "old_dask.py")
        with open(self.old_dask, "w") as f:
            f.write(OLD_DASK)
        self.cluster = DaskCluster(os.path.join(self.top, "dask"), workers=1)
        os.makedirs(os.path.join(self.top, "server"))
        self.server = Server(
            os.path.join(self.top, "server"), "--data-root", self.data,
            "--scheduler", self.cluster.address, "--scheduler-timeout", str(REACH),
            "--workers", "1",
        )  # fmt: skip
        wait_for(lambda: UNUSABLE in self.server.log(), "the server to say the cluster is away")
        self.start_log = self.server.log()

    def up(self, preload: str | None = None) -> None:
        """The cluster running, its scheduler with ``preload``."""
        if self.cluster.scheduler is not None and self.cluster.preload == preload:
            return
        self.cluster.stop()
        self.cluster.preload = preload
        self.cluster.start()

    def end(self) -> None:
        self.server.stop()
        self.cluster.stop()


class FaultTests(SynchronousTestCase):
    """Without its scheduler the server runs on, answers, and fails jobs quickly and clearly."""

    def setUp(self) -> None:
        self.fixture = shared.get("fault-cluster", FaultFixture, FaultFixture.end)
        self.cluster, self.server = self.fixture.cluster, self.fixture.server

    def request(self, *functions: str, **fields: Any) -> dict[str, Any]:
        request: dict[str, Any] = {"Directory": self.fixture.data, "Base": BASE, "File": "work.py"}
        return {"Header": "Dask", "Request": {**request, "Functions": list(functions), **fields}}

    def cluster_status(self, usable: bool | None = None) -> dict[str, Any]:
        """What Status says of the cluster, once the server has seen it (``usable`` or not)."""

        def looked() -> dict[str, Any] | None:
            cluster: dict[str, Any] = self.server.ask({"Header": "Info", "Request": "Status"})[
                "Response"
            ]["Cluster"]
            seen = cluster["Reachable"] is not None
            if usable is not None:
                seen = seen and (cluster["Reachable"] and cluster["Versions"] == "match") == usable
            return cluster if seen else None

        return wait_for(looked, "the server to look at the cluster")

    def test_downAtStartThenBack(self) -> None:
        """Down at start: logged, Info answers, a job is Unavailable in time; back: jobs run."""
        self.cluster.stop()
        self.assertIn(UNUSABLE, self.fixture.start_log)
        self.assertIn(
            f"scheduler at {self.cluster.address} cannot be reached", self.fixture.start_log
        )
        status = self.cluster_status(usable=False)
        self.assertEqual((status["Address"], status["Reachable"]), (self.cluster.address, False))
        self.assertIn("cannot be reached", status["Error"])
        started = time.monotonic()
        answer = self.server.ask(self.request("peak"))
        self.assertLess(time.monotonic() - started, REACH + 20)
        self.assertEqual(answer["Error"]["Code"], "Unavailable", answer)
        self.assertIn(
            f"scheduler at {self.cluster.address} cannot be reached", answer["Error"]["Message"]
        )
        self.fixture.up()
        answer = self.server.ask(self.request("peak"))
        self.assertEqual(answer["Status"], "OK", answer)
        self.cluster_status(usable=True)
        self.assertIn("back: the cluster", self.server.log())

    def test_stoppedDuringJob(self) -> None:
        """A job whose scheduler goes away fails Unavailable in a bounded time, saying so."""
        self.fixture.up()
        hold = os.path.join(self.fixture.data, "hold")
        open(hold, "w").close()
        self.addCleanup(_remove, hold)
        job = self.server.ask(self.request("held", Async=True))["Job"]
        wait_for(lambda: self.cluster.executing() > 0, "the held task to run")
        self.cluster.stop_scheduler()
        os.remove(hold)

        def ended() -> dict[str, Any] | None:
            status: dict[str, Any] = self.server.ask(
                {"Header": "Job", "Request": "Status", "Job": job}
            )["Response"]
            return status if status["State"] != "running" else None

        status = wait_for(ended, "the job to end", REACH + 30)
        self.assertEqual(status["Error"]["Code"], "Unavailable", status)
        self.assertIn("was lost during the job", status["Error"]["Message"])

    def test_versionMismatch(self) -> None:
        """Status, the log and a job's error name dask's versions here and on the scheduler."""
        self.fixture.up(preload=self.fixture.old_dask)
        status = self.cluster_status(usable=False)
        self.assertIn("2000.1.0 on the scheduler", status["Versions"])
        self.assertTrue(status["Reachable"])
        answer = self.server.ask(self.request("peak"))
        self.assertEqual(answer["Error"]["Code"], "Unavailable", answer)
        self.assertRegex(
            answer["Error"]["Message"], r"runs other versions than this server: dask \S+ here, "
            r"2000\.1\.0 on the scheduler"
        )  # fmt: skip
        self.assertIn("2000.1.0 on the scheduler", self.server.log())


class TLSFixture:
    """A tls:// cluster with a self-signed CA, and a server on it with the certificates."""

    def __init__(self) -> None:
        self.top = folder("tls")
        self.data = os.path.join(self.top, "data")
        os.makedirs(self.data)
        self.frame = write_data(self.data)
        key, cert = write_self_signed(self.top)
        self.files = (cert, cert, key)
        self.cluster = DaskCluster(os.path.join(self.top, "dask"), workers=1, tls=self.files)
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
