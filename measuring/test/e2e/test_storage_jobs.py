"""
Jobs on a data root on object storage, through the real ``twistd -n measuring`` against moto's
server mode on loopback (``support.storage``): the dataset and the formula file uploaded to
``s3://plant/data/<site>/``, results published under ``<site>/results/<job>/`` and read back with
pandas, Job Result pages and the Arrow stream on them, the allow-list, and a failed job that
leaves nothing behind; and the same dataset computed on a dask.distributed cluster, whose workers
read it from the storage. The AWS settings reach the server, its jobs and the cluster's workers
from the environment.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import pandas as pd
from twisted.trial.unittest import SynchronousTestCase

from measuring import storage
from measuring.client import Client
from measuring.test.support import Server, sample_frame, write_dataset
from measuring.test.support.cluster import DaskCluster, shared
from measuring.test.support.servers import BASE, ServerTestCase
from measuring.test.support.storage import ROOT, moto

WORK = """
def mean_by_sensor(df):
    return df.groupby("sensor").value.mean()


def warm(df):
    return df[df.value > 25]


def peak(df):
    return df.value.max()
"""

BROKEN = """
def warm(df):
    return df[df.value > 25]


def broken(df):
    return df.value.map_partitions(lambda part: 1 / 0, meta=("value", "f8"))


def slow(df):
    import time

    return df.value.map_partitions(lambda part: time.sleep(60) or part, meta=("value", "f8"))
"""


@dataclass
class Site:
    """A dataset and formula files on object storage, and a server with a data root there."""

    site: str
    frame: pd.DataFrame
    server: Server

    @classmethod
    def make(cls) -> Site:
        moto()
        folder = os.path.realpath(tempfile.mkdtemp(prefix="storage-", dir="."))
        frame = sample_frame(rows=5_000)
        site = f"{ROOT}/site-{time.monotonic_ns()}"
        fs = storage.filesystem(site)
        fs.put_file(write_dataset(folder, frame=frame), f"{site}/{BASE}")
        for name, source in (("work.py", WORK), ("broken.py", BROKEN)):
            fs.pipe_file(f"{site}/{name}", source.encode())
        return cls(site, frame, Server(folder, "--data-root", folder, "--data-root", ROOT))

    def end(self) -> None:
        self.server.stop()


class StorageJobTests(SynchronousTestCase):
    """A server whose second data root is on object storage runs jobs there (one for the class)."""

    def setUp(self) -> None:
        shared_site = shared.get("storage-site", Site.make, Site.end)
        self.site, self.frame, self.server = (
            shared_site.site, shared_site.frame, shared_site.server
        )  # fmt: skip
        self.fs = storage.filesystem(self.site)
        self.fs.invalidate_cache()

    def run_job(self, file: str = "work.py", **fields: Any) -> dict[str, Any]:
        request = {"Directory": self.site, "Base": BASE, "File": file, **fields}
        return self.server.ask({"Header": "Dask", "Request": request})

    def job(self, request: str, job: str, **fields: Any) -> dict[str, Any]:
        return self.server.ask({"Header": "Job", "Request": request, "Job": job, **fields})

    def test_resultsOnStorage(self) -> None:
        """A groupby and a filter land under results/<job>/ as URLs, equal to pandas' numbers."""
        answer = self.run_job()
        self.assertEqual(answer["Status"], "OK", answer)
        job, results = answer["Job"], answer["Response"]["Results"]
        means = pd.read_parquet(results["mean_by_sensor"]["File"])
        self.assertEqual(
            results["mean_by_sensor"]["File"], f"{self.site}/results/{job}/mean_by_sensor.parquet"
        )
        expected = self.frame.groupby("sensor").value.mean()
        pd.testing.assert_series_equal(means["value"], expected, check_names=False)
        warm = pd.read_parquet(results["warm"]["File"])
        expected_warm = self.frame[self.frame.value > 25]
        self.assertEqual(results["warm"]["Rows"], len(expected_warm))
        pd.testing.assert_frame_equal(
            warm.reset_index(drop=True), expected_warm.reset_index(drop=True), check_dtype=False
        )
        self.assertAlmostEqual(results["peak"]["Value"], self.frame.value.max())
        self.fs.invalidate_cache()
        self.assertEqual(
            sorted(self.fs.ls(f"{self.site}/results/{job}")),
            [
                f"{self.site[5:]}/results/{job}/{name}.parquet"
                for name in ("mean_by_sensor", "warm")
            ],
        )
        self.assertFalse(self.fs.exists(storage.partial_prefix(self.site, job)))

    def test_resultPages(self) -> None:
        """Job Result pages and the Arrow stream read results on object storage."""
        answer = self.run_job(Functions=["warm"])
        job = answer["Job"]
        page = self.job("Result", job, Name="warm", Offset=2, Limit=3)["Response"]
        expected = self.frame[self.frame.value > 25].reset_index(drop=True)
        self.assertEqual(page["Rows"], len(expected))
        self.assertEqual([r["value"] for r in page["Records"]], list(expected.value[2:5]))
        with Client("127.0.0.1", self.server.port) as client:
            result = client.job(job).results["warm"]
            fetched = result.to_pandas(progress=False)
        pd.testing.assert_frame_equal(
            fetched.reset_index(drop=True), expected, check_dtype=False, check_like=True
        )

    def test_fastparquet(self) -> None:
        """The fastparquet engine reads the dataset on object storage too."""
        answer = self.run_job(Functions=["mean_by_sensor"], Engine="fastparquet")
        self.assertEqual(answer["Status"], "OK", answer)
        means = pd.read_parquet(answer["Response"]["Results"]["mean_by_sensor"]["File"])
        expected = self.frame.groupby("sensor").value.mean()
        pd.testing.assert_series_equal(means["value"], expected, check_names=False)

    def test_code(self) -> None:
        """Formulas sent as Code run over a dataset on object storage too."""
        request = {"Directory": self.site, "Base": BASE, "Code": WORK, "Name": "mine.py",
                   "Functions": ["peak"]}  # fmt: skip
        answer = self.server.ask({"Header": "Dask", "Request": request})
        self.assertEqual(answer["Status"], "OK", answer)
        self.assertAlmostEqual(
            answer["Response"]["Results"]["peak"]["Value"], self.frame.value.max()
        )

    def test_refused(self) -> None:
        """Outside the prefix and '..' are Forbidden, a missing Base NotFound, naming the field."""
        for directory in ("s3://plant/elsewhere", "s3://other/data", f"{self.site}/../x"):
            answer = self.server.ask(
                {"Header": "Dask", "Request": {"Directory": directory, "Base": BASE,
                                               "File": "work.py"}}
            )  # fmt: skip
            self.assertEqual(answer["Error"]["Code"], "Forbidden", answer)
            self.assertIn("Directory", answer["Error"]["Message"])
        answer = self.run_job(Base="missing.parquet")
        self.assertEqual(answer["Error"]["Code"], "NotFound", answer)
        self.assertIn("Base 'missing.parquet'", answer["Error"]["Message"])
        answer = self.run_job(Base="work.py")
        self.assertEqual(answer["Error"]["Code"], "BadRequest", answer)
        self.fs.pipe_file(f"{self.site}/bad.py", b"def mean(df):\n    return df.value.mean(\n")
        answer = self.run_job("bad.py")
        self.assertEqual(answer["Error"]["Code"], "BadRequest", answer)
        self.assertIn("bad.py line", answer["Error"]["Message"])
        answer = self.run_job(Functions=["hourly"])
        self.assertEqual(answer["Error"]["Code"], "NotFound", answer)
        self.assertIn("work.py has no formula named 'hourly'", answer["Error"]["Message"])

    def test_failedLeavesNothing(self) -> None:
        """A formula that raises fails its job; no results/.<job>.partial/ prefix is left."""
        answer = self.run_job("broken.py")
        self.assertEqual(answer["Error"]["Code"], "JobFailed", answer)
        self.assertIn("ZeroDivisionError", answer["Error"]["Message"])
        self.assertNothingOf(answer["Job"])

    def test_timeoutLeavesNothing(self) -> None:
        """A job stopped by its Timeout leaves nothing of itself on the storage."""
        answer = self.run_job("broken.py", Functions=["warm", "slow"], Timeout=1)
        self.assertEqual(answer["Error"]["Code"], "Timeout", answer)
        self.assertNothingOf(answer["Job"])

    def assertNothingOf(self, job: str) -> None:
        """Nothing on the storage carries the job's id: no results, no partial prefix."""
        self.fs.invalidate_cache()
        left = [key for key in self.fs.find(self.site) if job in key]
        self.assertEqual(left, [])


class StorageClusterTests(ServerTestCase):
    """On a cluster, the workers read the dataset from object storage; results land there."""

    formulas: ClassVar[dict[str, str]] = {}
    rows = 4_000

    def setUp(self) -> None:
        super().setUp()
        moto()
        self.site = f"{ROOT}/cluster-{time.monotonic_ns()}"
        fs = storage.filesystem(self.site)
        size = self.rows // 4
        for n in range(4):
            local = os.path.join(self.folder, f"part.{n}.parquet")
            self.frame.iloc[n * size : (n + 1) * size].to_parquet(local, index=False)
            fs.put_file(local, f"{self.site}/series/part.{n}.parquet")
        fs.pipe_file(f"{self.site}/work.py", WORK.encode())
        self.cluster = DaskCluster(os.path.join(self.folder, "dask"), workers=2).start()
        self.addCleanup(self.cluster.stop)

    def test_onCluster(self) -> None:
        """A groupby and a filter computed on the cluster equal pandas', published as URLs."""
        server = self.start("--data-root", ROOT, "--scheduler", self.cluster.address)
        request = {"Directory": self.site, "Base": "series", "File": "work.py"}
        answer = server.ask({"Header": "Dask", "Request": request})
        self.assertEqual(answer["Status"], "OK", answer)
        results = answer["Response"]["Results"]
        self.assertTrue(results["warm"]["File"].startswith(f"{self.site}/results/"))
        means = pd.read_parquet(results["mean_by_sensor"]["File"])
        expected = self.frame.groupby("sensor").value.mean()
        pd.testing.assert_series_equal(means["value"], expected, check_names=False)
        warm = pd.read_parquet(results["warm"]["File"])
        self.assertEqual(len(warm), int((self.frame.value > 25).sum()))
