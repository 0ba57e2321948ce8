"""
Tests for the cluster's settings, the server's view of the cluster (``server.cluster``), what a
job message carries, the version message (``measuring.cluster``) and finding a formula's line in
a cluster worker's traceback. No cluster here: ``test/e2e/test_cluster*`` run real ones.
"""

from __future__ import annotations

import os
import shutil
import traceback
from typing import Any

from twisted.internet import task
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import provider

from measuring.cluster import ClusterSettings, mismatches
from measuring.messages import CLUSTER_MARK
from measuring.server import app
from measuring.server.cluster import FRESH, WAIT, ClusterPool, ClusterView, worker_environment
from measuring.server.info import InfoService
from measuring.server.stats import Stats
from measuring.server.threads import Synchronous
from measuring.test.support.fakes import FakePool, HeldRunner
from measuring.test.unit.test_config import LoadTestCase
from measuring.test.unit.test_info import FakeJobs
from measuring.test.unit.test_info import FakePool as InfoPool
from measuring.worker.cluster import BLANK_FILENAME, in_file_remotely

ADDRESS = "tcp://scheduler.example:8786"


class SettingsTests(LoadTestCase):
    """``--scheduler`` and its TLS files, checked at start."""

    def write(self, name: str) -> str:
        path = os.path.join(self.cwd, name)
        with open(path, "w") as f:
            f.write("-----BEGIN CERTIFICATE-----\n")
        return path

    def tls(self) -> dict[str, object]:
        return {
            "scheduler": "tls://scheduler.example:8786",
            "scheduler-ca": self.write("ca.pem"),
            "scheduler-cert": self.write("cert.pem"),
            "scheduler-key": self.write("key.pem"),
        }

    def assertRefused(self, flags: dict[str, object], *words: str) -> None:
        error = self.assertRaises(UsageError, self.load, flags)
        for word in words:
            self.assertIn(word, str(error))

    def test_default(self) -> None:
        """Without --scheduler jobs compute here: no cluster settings."""
        settings = self.load()
        self.assertIsNone(settings.scheduler)
        self.assertIsNone(app.cluster_settings(settings))

    def test_address(self) -> None:
        """host:port means tcp://; the timeout and the address reach the cluster settings."""
        settings = self.load({"scheduler": "scheduler.example:8786", "scheduler-timeout": "3"})
        self.assertEqual(
            app.cluster_settings(settings), ClusterSettings(address=ADDRESS, timeout=3.0)
        )

    def test_badAddress(self) -> None:
        """Another scheme, or no host, stops the start naming the setting."""
        for value in ("udp://scheduler:8786", "tcp://", "tcp://:8786", ""):
            self.assertRefused({"scheduler": value}, "--scheduler must be an address")

    def test_fromFile(self) -> None:
        """The TOML file takes the cluster's settings too."""
        settings = self.load(toml='scheduler = "tcp://scheduler.example:8786"\n')
        self.assertEqual(settings.scheduler, ADDRESS)

    def test_tls(self) -> None:
        """A tls:// scheduler with its three files: real paths in the settings."""
        flags = self.tls()
        found = app.cluster_settings(self.load(flags))
        assert found is not None
        self.assertEqual(
            (found.ca, found.cert, found.key),
            (flags["scheduler-ca"], flags["scheduler-cert"], flags["scheduler-key"]),
        )
        self.assertTrue(found.tls)

    def test_tlsNeedsFiles(self) -> None:
        """A tls:// scheduler without its files stops the start, naming them."""
        flags = {**self.tls(), "scheduler-key": None}
        del flags["scheduler-key"]
        self.assertRefused(flags, "needs --scheduler-ca, --scheduler-cert and --scheduler-key")

    def test_filesNeedTls(self) -> None:
        """TLS files with a tcp:// scheduler, or with none, stop the start."""
        self.assertRefused({**self.tls(), "scheduler": ADDRESS}, "--scheduler-ca", "tls://")
        flags = self.tls()
        del flags["scheduler"]
        self.assertRefused(flags, "--scheduler-ca is for a tls:// --scheduler, and none is set")

    def test_unreadableFile(self) -> None:
        """A TLS file that does not exist stops the start."""
        flags = {**self.tls(), "scheduler-key": os.path.join(self.cwd, "missing.pem")}
        self.assertRefused(flags, "--scheduler-key", "is not a readable file")

    def test_notWithTheSandbox(self) -> None:
        """The sandbox has no network: it cannot go with a cluster."""
        self.patch(shutil, "which", lambda name: "/usr/bin/bwrap")
        self.assertRefused({"scheduler": ADDRESS, "sandbox": "bwrap"}, "--sandbox bwrap cannot go")


class MessageTests(SynchronousTestCase):
    """What the worker pool and a worker process are given with a cluster."""

    def test_jobsToldWhereTheClusterIs(self) -> None:
        """Every job message gains the cluster's settings, the rest unchanged."""
        pool = FakePool()
        settings = ClusterSettings(address="tls://s:8786", ca="/ca", cert="/c", key="/k")
        ClusterPool(pool, settings).run({"Type": "Job", "Job": "j"})
        self.assertEqual(
            pool.runs[0].message,
            {"Type": "Job", "Job": "j", "Cluster": settings.to_message()},
        )
        self.assertEqual(ClusterSettings.from_message(settings.to_message()), settings)

    def test_workersWarmForTheCluster(self) -> None:
        """Worker processes are marked to import distributed while warming up, with a cluster."""
        self.assertEqual(worker_environment(ClusterSettings(ADDRESS)), {CLUSTER_MARK: ADDRESS})
        self.assertEqual(worker_environment(None), {})


class FakeProbe:
    """Looks at a pretend cluster: what it says is set by the test; counts the looks."""

    def __init__(self) -> None:
        self.looks = 0
        self.answer: dict[str, Any] = {"Address": ADDRESS, "Reachable": True, "Workers": 2,
                                       "Threads": 4, "Memory": 8, "Tasks": 0, "Versions": "match",
                                       "WorkerList": []}  # fmt: skip

    def __call__(self) -> dict[str, Any]:
        self.looks += 1
        return dict(self.answer)


class ViewTests(SynchronousTestCase):
    """The server's view of the cluster: looked at in a thread, renewed when stale, logged."""

    def setUp(self) -> None:
        self.clock = task.Clock()
        self.runner = HeldRunner()
        self.probe = FakeProbe()
        self.view = ClusterView(self.clock, self.runner, ADDRESS, self.probe)
        self.logged: list[str] = []

        @provider(ILogObserver)
        def observe(event: LogEvent) -> None:
            if event.get("log_namespace") == "measuring.server.cluster.ClusterView":
                self.logged.append(formatEvent(event))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

    def messages(self) -> list[str]:
        return self.logged

    def test_firstLookAtStart(self) -> None:
        """At start the cluster is looked at in the runner's thread, and what it is logged."""
        self.view.startService()
        self.assertEqual(self.probe.looks, 0)
        self.runner.release()
        self.assertEqual(self.probe.looks, 1)
        self.assertEqual(
            self.messages(), [f"the cluster at {ADDRESS} is usable: 2 workers, 4 threads"]
        )

    def test_beforeTheFirstLook(self) -> None:
        """Asked before any look has ended, Info gets the address and Reachable null in time."""
        self.view.startService()
        answer = self.view.brief()
        self.assertNoResult(answer)
        self.clock.advance(WAIT)
        self.assertEqual(
            self.successResultOf(answer), {"Address": ADDRESS, "Reachable": None, "Checked": None}
        )

    def test_freshLookReused(self) -> None:
        """A look younger than FRESH seconds answers at once; an older one is renewed first."""
        self.view.startService()
        self.runner.release()
        self.successResultOf(self.view.current())
        self.assertEqual(self.probe.looks, 1)
        self.clock.advance(FRESH)
        self.probe.answer["Tasks"] = 7
        answer = self.view.brief()
        self.runner.release()
        self.assertEqual(self.successResultOf(answer)["Tasks"], 7)
        self.assertEqual(self.probe.looks, 2)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_slowLookGivesTheLastOne(self) -> None:
        """A renewal that takes longer than WAIT: the last look is given, with its time."""
        self.view.startService()
        self.runner.release()
        self.clock.advance(FRESH + 1)
        answer = self.view.current()
        self.clock.advance(WAIT)
        last = self.successResultOf(answer)
        self.assertEqual(last["Checked"], "1970-01-01T00:00:00+00:00")
        self.assertEqual(last["WorkerList"], [])
        self.runner.release()

    def test_lostAndBack(self) -> None:
        """Losing the cluster and finding it again are logged once each; Status shows why."""
        self.view.startService()
        self.runner.release()
        self.probe.answer = {"Address": ADDRESS, "Reachable": False, "Error": "it is gone"}
        for _ in range(2):
            self.clock.advance(FRESH)
            answer = self.view.brief()
            self.runner.release()
        self.assertEqual(self.successResultOf(answer)["Error"], "it is gone")
        self.probe.answer = FakeProbe().answer
        self.clock.advance(FRESH)
        self.view.current()
        self.runner.release()
        self.assertEqual(
            self.messages(),
            [
                f"the cluster at {ADDRESS} is usable: 2 workers, 4 threads",
                "it is gone: jobs fail with Unavailable until the cluster is usable (the server "
                "runs on)",
                f"back: the cluster at {ADDRESS} is usable: 2 workers, 4 threads",
            ],
        )

    def test_infoShowsTheCluster(self) -> None:
        """Status shows the brief view, All statistic all of it, each worker included."""
        self.view.startService()
        self.runner.release()
        pool, jobs = InfoPool(size=1, workers=[]), FakeJobs()
        info = InfoService(
            self.clock, pool, jobs, Stats(), ("/",), Synchronous(), cluster=self.view
        )
        status = self.successResultOf(info.answer("Status"))["Cluster"]
        self.assertEqual(status["Workers"], 2)
        self.assertNotIn("WorkerList", status)
        statistics = self.successResultOf(info.answer("All statistic"))["Cluster"]
        self.assertEqual(statistics["WorkerList"], [])


class MismatchTests(SynchronousTestCase):
    """The version message names each package that differs, and where."""

    def test_message(self) -> None:
        """Here, on the scheduler, and on workers (counted); packages that agree are left out."""
        versions = {
            "client": {"packages": {"dask": "2026.1", "numpy": "2.0", "python": "3.11"}},
            "scheduler": {"packages": {"dask": "2025.1", "numpy": "1.0", "python": "3.11"}},
            "workers": {
                "tcp://a": {"packages": {"dask": "2026.1", "numpy": "2.1", "python": "3.11"}},
                "tcp://b": {"packages": {"dask": "2026.1", "numpy": "2.1", "python": "3.11"}},
            },
        }
        self.assertEqual(
            mismatches(versions),
            ["dask 2026.1 here, 2025.1 on the scheduler", "numpy 2.0 here, 2.1 on 2 workers"],
        )

    def test_missing(self) -> None:
        """A package missing on one side is 'none' there."""
        versions = {
            "client": {"packages": {"lz4": None}},
            "scheduler": {"packages": {"lz4": "4.0"}},
            "workers": {},
        }
        self.assertEqual(mismatches(versions), ["lz4 none here, 4.0 on the scheduler"])


class RemoteLineTests(SynchronousTestCase):
    """A frame of a formula's code that ran on a cluster worker is found in its file."""

    def test_byNameAndLine(self) -> None:
        """Code pickled by value lost its file name; its function and line still match."""
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write(
                "def outer(df):\n    def inner(part):\n        return 1 // 0\n    return inner\n"
            )
        remote = traceback.FrameSummary(BLANK_FILENAME, 3, "inner")
        self.assertTrue(in_file_remotely(remote, path))
        self.assertFalse(in_file_remotely(traceback.FrameSummary(BLANK_FILENAME, 3, "other"), path))
        self.assertFalse(
            in_file_remotely(traceback.FrameSummary("/elsewhere.py", 3, "inner"), path)
        )
