"""
Tests for tables written partition by partition while Dask computes them
(``measuring.worker.output.ResultWriter``): one file when small, a folder of parts when not,
CSV and JSON always one file; Rows and Preview counted as parts are written; nothing left when a
part fails; and the pages ``read_rows`` cuts from a folder of parts.
"""

from __future__ import annotations

import json
import os

import dask
import dask.dataframe as dd
import pandas as pd
from twisted.trial.unittest import SynchronousTestCase

from measuring.client import Result
from measuring.errors import JobFailed
from measuring.server import results
from measuring.test.support import sample_frame
from measuring.test.unit.test_loader import make_folder
from measuring.worker import job as worker_job
from measuring.worker.output import ResultWriter, summarize

JOB = "20261201-120000-abcdef"


def kept(frame: pd.DataFrame) -> pd.DataFrame:
    """The rows a filter keeps: values above 20, the default index dropped as results drop it."""
    return frame[frame.value > 20].reset_index(drop=True)


class StreamTests(SynchronousTestCase):
    """A Dask table of several partitions streamed to disk, in each output format."""

    def setUp(self) -> None:
        self.directory = make_folder(self, "lab")
        self.frame = sample_frame(6000)
        self.dataset = dd.from_pandas(self.frame, npartitions=6)

    def stream(
        self, value: object, output: str = "parquet", small: int = 1, name: str = "kept"
    ) -> dict[str, object]:
        """Compute ``value`` streamed as result ``name``; its entry in the answer."""
        writer = ResultWriter(self.directory, JOB, output, small=small)
        (written,) = dask.compute(writer.stream(name, value), scheduler="threads")
        return summarize({name: written}, writer)[name]

    def path(self, entry: dict[str, object]) -> str:
        return os.path.join(self.directory, str(entry["File"]))

    def test_folderOfParts(self) -> None:
        """Past ``small``, Parquet is a folder of one part per partition, read back whole."""
        entry = self.stream(self.dataset[self.dataset.value > 20])
        expected = kept(self.frame)
        self.assertEqual(entry["File"], f"results/{JOB}/kept.parquet")
        self.assertEqual(
            (entry["Kind"], entry["Rows"], entry["Parts"]), ("DataFrame", len(expected), 6)
        )
        self.assertEqual(
            sorted(os.listdir(self.path(entry))), [f"part.0000{n}.parquet" for n in range(6)]
        )
        read = pd.read_parquet(self.path(entry))
        pd.testing.assert_frame_equal(read, expected, check_dtype=False)
        self.assertEqual(os.listdir(os.path.join(self.directory, "results")), [JOB])

    def test_smallCombined(self) -> None:
        """Parts that are small in all become one Parquet file; no Parts in the entry."""
        entry = self.stream(self.dataset[self.dataset.value > 20], small=2**20)
        self.assertTrue(os.path.isfile(self.path(entry)))
        self.assertNotIn("Parts", entry)
        pd.testing.assert_frame_equal(
            pd.read_parquet(self.path(entry)), kept(self.frame), check_dtype=False
        )

    def test_previewAndTypes(self) -> None:
        """Preview holds the first 20 rows in order, across empty first partitions."""
        late = self.dataset[self.dataset.time >= self.frame.time[4990]]
        entry = self.stream(late)
        expected = self.frame[self.frame.time >= self.frame.time[4990]].reset_index(drop=True)
        self.assertEqual(entry["Rows"], 1010)
        self.assertEqual(len(entry["Preview"]), 20)  # type: ignore[arg-type]
        self.assertEqual(
            [row["value"] for row in entry["Preview"]],  # type: ignore[attr-defined]
            [None if pd.isna(v) else v for v in expected.value[:20]],
        )
        self.assertEqual(entry["Columns"], ["time", "sensor", "value"])
        self.assertEqual(entry["Types"]["value"], "float64")  # type: ignore[index]

    def test_seriesWithIndex(self) -> None:
        """A Series with a time index keeps the index in every part."""
        indexed = self.dataset.set_index("time", sorted=True)
        entry = self.stream(indexed.value, name="value")
        self.assertEqual((entry["Kind"], entry["Index"]), ("Series", ["time"]))
        pd.testing.assert_series_equal(
            pd.read_parquet(self.path(entry)).value, self.frame.set_index("time").value
        )

    def test_csvOneFile(self) -> None:
        """CSV parts become one file with one header line, read back whole by pandas."""
        entry = self.stream(self.dataset[self.dataset.value > 20], "csv")
        read = pd.read_csv(self.path(entry), parse_dates=["time"])
        expected = kept(self.frame)
        self.assertEqual(entry["Rows"], len(expected))
        pd.testing.assert_frame_equal(read, expected, check_dtype=False)

    def test_jsonOneFile(self) -> None:
        """JSON parts become one array, one record a line, read back whole by pandas."""
        entry = self.stream(self.dataset[self.dataset.value > 20], "json")
        with open(self.path(entry), encoding="utf-8") as f:
            lines = f.read().splitlines()
        expected = kept(self.frame)
        self.assertEqual(len(lines), len(expected))
        self.assertEqual(json.loads("\n".join(lines))[0]["sensor"], expected.sensor[0])
        read = pd.read_json(self.path(entry), orient="records", convert_dates=["time"])
        pd.testing.assert_frame_equal(read, expected, check_dtype=False)

    def test_emptyResult(self) -> None:
        """A filter keeping nothing is an empty file with the columns, in every format."""
        for output in ("parquet", "csv", "json"):
            entry = self.stream(self.dataset[self.dataset.value > 1000], output, name=output)
            self.assertEqual((entry["Rows"], entry["Preview"]), (0, []), output)
            self.assertTrue(os.path.isfile(self.path(entry)), output)

    def test_pagesAcrossParts(self) -> None:
        """Job Result pages read from a folder of parts: right rows, Rows counted from footers."""
        entry = self.stream(self.dataset[self.dataset.value > 20])
        expected = kept(self.frame)
        file = str(entry["File"])
        for offset, limit in [(0, 5), (400, 600), (len(expected) - 3, 10)]:
            page = results.read_rows(self.directory, file, offset, limit)
            self.assertEqual(page["Rows"], len(expected))
            self.assertEqual(
                [record["value"] for record in page["Records"]],
                list(expected.value[offset : offset + limit]),
            )


class FailureTests(SynchronousTestCase):
    """A job whose writing fails leaves no results, and says why."""

    def setUp(self) -> None:
        self.directory = make_folder(self, "lab")
        self.dataset = dd.from_pandas(sample_frame(6000), npartitions=6)

    def compute(self, formulas: dict[str, object], writer: ResultWriter) -> None:
        values = worker_job.compute(formulas, self.dataset, "work.py", writer=writer)  # type: ignore[arg-type]
        summarize(values, writer)

    def test_failingPartitionLeavesNothing(self) -> None:
        """A partition that raises while others are written: JobFailed, and no folder at all."""

        def broken(frame: pd.DataFrame) -> pd.DataFrame:
            if frame.time.iloc[0] > pd.Timestamp("2026-01-01 00:40"):
                raise ValueError("bad reading")
            return frame

        writer = ResultWriter(self.directory, JOB, "parquet")
        formulas = {"fine": lambda df: df, "broken": lambda df: df.map_partitions(broken)}
        error = self.assertRaises(JobFailed, self.compute, formulas, writer)
        self.assertIn("ValueError: bad reading", error.message)
        self.assertFalse(os.path.exists(os.path.join(self.directory, "results")))

    def test_tooLargeWhileWriting(self) -> None:
        """Parts past ``max_bytes`` stop the job with the limit named; nothing is left."""
        writer = ResultWriter(self.directory, JOB, "csv", max_bytes=10_000)
        error = self.assertRaises(JobFailed, self.compute, {"all": lambda df: df}, writer)
        self.assertIn("more than the 10000 a job may write (--max-result-bytes)", error.message)
        self.assertFalse(os.path.exists(os.path.join(self.directory, "results")))


class ClientReadTests(SynchronousTestCase):
    """The client's ``Result.to_pandas`` reads both forms of a Parquet table from its file."""

    def test_bothForms(self) -> None:
        """A folder of parts and a single file read back as the same frame."""
        directory = make_folder(self, "lab")
        dataset = dd.from_pandas(sample_frame(6000), npartitions=6)
        for small, job in [(1, "folder"), (2**30, "single")]:
            writer = ResultWriter(directory, job, "parquet", small=small)
            (written,) = dask.compute(writer.stream("kept", dataset[dataset.value > 20]))
            entry = summarize({"kept": written}, writer)["kept"]
            result = Result(None, job, "kept", entry, directory)  # type: ignore[arg-type]
            self.assertEqual(result.parts, 6 if job == "folder" else 1)
            pd.testing.assert_frame_equal(
                result.to_pandas("file"), kept(sample_frame(6000)), check_dtype=False
            )
