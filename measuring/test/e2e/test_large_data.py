"""
End to end, data larger than a job's memory and a time index from the file, through the real
``twistd -n measuring``: a groupby and a filter written out over a dataset about three times
larger in memory than ``--job-memory``; results streamed to disk that appear complete or not at
all when the job is stopped while writing; and ``"Index"``: resample from the files' statistics,
an unknown column, data not sorted, and the hint a formula gets when it needs the index.
"""

from __future__ import annotations

import os
from typing import ClassVar

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from measuring.client import Client
from measuring.test.e2e.test_cli import cli
from measuring.test.support import BASE, ServerTestCase

LARGE_FORMULAS = '''
import os
import time


def mean_by_sensor(df):
    return df.groupby("sensor").value.mean()


def kept(df):
    return df[df.value > 17.4]


def hourly(df):
    return df.value.resample("1h").mean()


def _stall(frame, partition_info=None):
    """Partition 2 says it is being written, then waits to be stopped."""
    if partition_info and partition_info["number"] == 2:
        open("writing", "w").close()
        time.sleep(300)
    return frame


def stalled(df):
    return df.repartition(npartitions=4).map_partitions(_stall)
'''

#: Rows of the large dataset: about 800 MB as pandas frames, in row groups of 200 000 rows.
LARGE_ROWS = 28_000_000
GROUP_ROWS = 200_000
SENSORS = np.array([f"sensor-{i:02d}" for i in range(20)])


def write_large(path: str) -> tuple[np.ndarray, np.ndarray]:
    """The large dataset (time, sensor, value), written a row group at a time; sensors, values."""
    rng = np.random.default_rng(3)
    sensors = rng.integers(0, len(SENSORS), LARGE_ROWS).astype(np.int8)
    values = rng.normal(20.0, 5.0, LARGE_ROWS)
    start = np.datetime64("2026-01-01T00:00:00", "ms")
    schema = pa.schema(
        [("time", pa.timestamp("ms")), ("sensor", pa.string()), ("value", pa.float64())]
    )
    with pq.ParquetWriter(path, schema) as writer:
        for first in range(0, LARGE_ROWS, GROUP_ROWS):
            rows = slice(first, first + GROUP_ROWS)
            times = start + np.arange(first, min(first + GROUP_ROWS, LARGE_ROWS)) * 100
            group = pa.table(
                {
                    "time": pa.array(times),
                    "sensor": pa.array(SENSORS[sensors[rows]]),
                    "value": pa.array(values[rows]),
                }
            )
            writer.write_table(group, row_group_size=GROUP_ROWS)
    return sensors, values


class LargeDataTests(ServerTestCase):
    """A dataset about three times larger than --job-memory, reduced and written within it."""

    formulas: ClassVar[dict[str, str]] = {"large.py": LARGE_FORMULAS}

    def test_largerThanMemory(self) -> None:
        """Groupby and filter-to-file complete under 300MB; pandas' numbers, every row written."""
        sensors, values = write_large(os.path.join(self.folder, "large.parquet"))
        server = self.start("--job-memory", "300MB", "--workers", "1")
        answer = server.ask(self.dask("mean_by_sensor", "kept", Base="large.parquet"))
        self.assertEqual(answer["Status"], "OK", answer)
        results = answer["Response"]["Results"]

        means = np.bincount(sensors, values) / np.bincount(sensors)
        got = pd.read_parquet(os.path.join(self.folder, results["mean_by_sensor"]["File"]))
        pd.testing.assert_series_equal(
            got.value.sort_index(),
            pd.Series(means, index=pd.Index(SENSORS, name="sensor"), name="value"),
            check_index_type=False,
            rtol=1e-12,
        )

        expected = values[values > 17.4]
        entry = results["kept"]
        self.assertEqual(entry["Rows"], len(expected))
        self.assertGreater(entry["Parts"], 1)
        self.assertEqual([row["value"] for row in entry["Preview"]], list(expected[:20]))
        written = pd.read_parquet(os.path.join(self.folder, entry["File"]))
        self.assertEqual(len(written), len(expected))
        np.testing.assert_array_equal(written.value.to_numpy(), expected)
        self.assertEqual(list(written.columns), ["time", "sensor", "value"])
        del written

        last = {"Name": "kept", "Offset": len(expected) - 2, "Limit": 10}
        page = self.job(server, "Result", answer["Job"], **last)
        self.assertEqual(page["Response"]["Rows"], len(expected))
        self.assertEqual([r["value"] for r in page["Response"]["Records"]], list(expected[-2:]))

    def test_stoppedWhileWriting(self) -> None:
        """A job cancelled while its table is being written leaves no results, not even parts."""
        server = self.start()
        job = self.submit(server, "stalled")
        self.wait_for(lambda: os.path.exists(os.path.join(self.folder, "writing")), "writing")
        results = os.path.join(self.folder, "results")
        self.assertEqual(os.listdir(results), [f".{job}.partial"])
        self.assertEqual(self.job(server, "Cancel", job)["Status"], "OK")
        self.wait_for_job(server, job, "cancelled")
        self.wait_for(lambda: not os.listdir(results), "the partial results to be removed")


class IndexTests(ServerTestCase):
    """The request's "Index" through the real server."""

    formulas: ClassVar[dict[str, str]] = {"large.py": LARGE_FORMULAS}
    rows: ClassVar[int] = 20_000

    def test_resample(self) -> None:
        """With "Index": "time", resample works without set_index, to pandas' numbers."""
        server = self.start()
        answer = server.ask(self.dask("hourly", Index="time"))
        self.assertEqual(answer["Status"], "OK", answer)
        entry = answer["Response"]["Results"]["hourly"]
        self.assertEqual((entry["Kind"], entry["Index"]), ("Series", ["time"]))
        expected = self.frame.set_index("time").value.resample("1h").mean()
        got = pd.read_parquet(os.path.join(self.folder, entry["File"])).value
        pd.testing.assert_series_equal(got, expected, check_freq=False)

    def test_clientAndCommandLine(self) -> None:
        """The client's ``index=`` and ``measuring-client run --index`` send the Index field."""
        server = self.start()
        expected = self.frame.set_index("time").value.resample("1h").mean()
        with Client("127.0.0.1", server.port) as client:
            job = client.run(self.folder, BASE, "large.py", ["hourly"], index="time")
            got = job.results["hourly"].to_pandas()
        pd.testing.assert_series_equal(got, expected, check_freq=False)
        ran = cli(
            "run", self.folder, BASE, "large.py", "-f", "hourly", "--index", "time",
            MEASURING_SERVER=f"127.0.0.1:{server.port}",
        )  # fmt: skip
        self.assertEqual(ran.returncode, 0, ran.stderr)
        rows = [line.split() for line in ran.stdout.split("\n\n")[0].splitlines()]
        self.assertEqual(rows[2][:3], ["hourly", "Series", str(len(expected))])

    def test_withoutIndex(self) -> None:
        """Without "Index", a resample fails with JobFailed naming the fix."""
        server = self.start()
        answer = server.ask(self.dask("hourly"))
        self.assertEqual(answer["Error"]["Code"], "JobFailed", answer)
        self.assertIn('with "Index": "time" in the request', answer["Error"]["Message"])

    def test_unknownColumn(self) -> None:
        """An Index the dataset does not have is NotFound naming its columns."""
        server = self.start()
        answer = server.ask(self.dask("hourly", Index="tiem"))
        self.assertEqual(answer["Error"]["Code"], "NotFound", answer)
        self.assertIn("its columns: time, sensor, value", answer["Error"]["Message"])

    def test_unsorted(self) -> None:
        """Data whose row groups overlap in time is JobFailed saying it is not sorted."""
        frame = self.frame.sort_values(["sensor", "time"])
        frame.to_parquet(os.path.join(self.folder, "by_sensor.parquet"), row_group_size=2000)
        server = self.start()
        answer = server.ask(self.dask("hourly", Index="time", Base="by_sensor.parquet"))
        self.assertEqual(answer["Error"]["Code"], "JobFailed", answer)
        self.assertIn("the dataset is not sorted by 'time'", answer["Error"]["Message"])
