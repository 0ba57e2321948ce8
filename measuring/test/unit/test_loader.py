"""
Tests for ``measuring.loader``: where a job's paths lead, reading Parquet with either engine, and
writing results so that they appear complete or not at all.
"""

from __future__ import annotations

import json
import os

import dask.dataframe as dd
import numpy as np
import pandas as pd
import pyarrow
from twisted.trial.unittest import SynchronousTestCase

from measuring import files, tables, wire
from measuring.errors import BadRequest, Forbidden, NotFound
from measuring.server import paths as data_paths
from measuring.test.support import sample_frame, write_dataset, write_formulas
from measuring.worker import dataset as datasets
from measuring.worker import output as worker_output


def make_folder(test: SynchronousTestCase, *parts: str) -> str:
    """A new, real, absolute folder for ``test`` (``parts`` below a fresh temporary one)."""
    path = os.path.join(os.path.realpath(test.mktemp()), *parts)
    os.makedirs(path)
    return path


class ResolveJobTests(SynchronousTestCase):
    """
    ``resolve_job`` keeps Directory inside a data root and Base and File inside Directory.

    The layout: ``root/lab`` holds a dataset and a formula file, ``other/lab2`` is inside the
    second root, and ``outside`` holds the same files but lies in no root.
    """

    def setUp(self) -> None:
        self.root, self.other = make_folder(self, "root"), make_folder(self, "other")
        self.roots = (self.root, self.other)
        self.lab = os.path.join(self.root, "lab")
        self.outside = make_folder(self, "outside")
        for folder in (self.root, self.lab, os.path.join(self.other, "lab2"), self.outside):
            os.makedirs(folder, exist_ok=True)
            write_dataset(folder, frame=sample_frame(10))
            write_formulas(folder)

    def resolve(
        self, directory: str, base: str = "time_series.parquet", file: str = "work.py"
    ) -> data_paths.JobPaths:
        return data_paths.resolve_job(self.roots, directory, base, file)

    def test_absoluteDirectoryInsideRoot(self) -> None:
        """An absolute Directory inside a root resolves to the real paths of all three fields."""
        self.assertEqual(
            self.resolve(self.lab),
            data_paths.JobPaths(
                self.lab,
                os.path.join(self.lab, "time_series.parquet"),
                os.path.join(self.lab, "work.py"),
            ),
        )

    def test_relativeDirectoryIsBelowFirstRoot(self) -> None:
        """A relative Directory is looked up below the first root only, never the second."""
        self.assertEqual(self.resolve("lab").directory, self.lab)
        error = self.assertRaises(NotFound, self.resolve, "lab2")
        self.assertIn("Directory 'lab2'", error.message)

    def test_absoluteDirectoryInSecondRoot(self) -> None:
        """An absolute Directory inside the second root is accepted."""
        lab2 = os.path.join(self.other, "lab2")
        self.assertEqual(self.resolve(lab2).base, os.path.join(lab2, "time_series.parquet"))

    def test_directoryLeadingOutIsForbidden(self) -> None:
        """A Directory leading out of the roots (``..``, elsewhere, symlinks) is Forbidden."""
        os.symlink(self.outside, os.path.join(self.root, "escape"))
        os.symlink(os.path.dirname(self.outside), os.path.join(self.lab, "up"))
        for directory in [
            "..",
            "lab/../..",
            "../outside",
            self.outside,
            "escape",
            "lab/up/outside",
        ]:
            error = self.assertRaises(Forbidden, self.resolve, directory)
            self.assertIn(f"Directory {directory!r} is outside the data roots", error.message)

    def test_baseOrFileLeadingOutIsForbidden(self) -> None:
        """Base and File leading out of Directory (``..``, absolute, symlinks) are Forbidden."""
        os.symlink(self.outside, os.path.join(self.lab, "linked"))
        for name in ["time_series.parquet", "work.py"]:
            os.symlink(os.path.join(self.outside, name), os.path.join(self.lab, "to-" + name))
            for path in [
                "../" + name,
                os.path.join(self.outside, name),
                "to-" + name,
                "linked/" + name,
            ]:
                for field in ["Base", "File"]:
                    fields = {"Base": "time_series.parquet", "File": "work.py", field: path}
                    error = self.assertRaises(
                        Forbidden, self.resolve, "lab", fields["Base"], fields["File"]
                    )
                    self.assertIn(f"{field} {path!r} leads outside", error.message)

    def test_symlinksStayingInsideAreFollowed(self) -> None:
        """Symlinks that stay inside the roots are fine and resolve to their real targets."""
        os.symlink(self.lab, os.path.join(self.root, "current"))
        os.mkdir(os.path.join(self.lab, "views"))
        os.symlink("../time_series.parquet", os.path.join(self.lab, "views", "latest.parquet"))
        os.symlink(self.lab, os.path.join(self.lab, "self"))
        paths = self.resolve("current", "views/latest.parquet", "self/work.py")
        self.assertEqual(
            paths,
            data_paths.JobPaths(
                self.lab,
                os.path.join(self.lab, "time_series.parquet"),
                os.path.join(self.lab, "work.py"),
            ),
        )

    def test_missingIsNotFoundNamingTheField(self) -> None:
        """A missing Directory, Base or File is NotFound, and the message names the field."""
        cases = [
            (("missing", "time_series.parquet", "work.py"), "Directory 'missing'"),
            (("lab", "missing.parquet", "work.py"), "Base 'missing.parquet'"),
            (("lab", "time_series.parquet", "missing.py"), "File 'missing.py'"),
        ]
        for fields, words in cases:
            error = self.assertRaises(NotFound, self.resolve, *fields)
            self.assertIn(words, error.message)

    def test_emptyOrNulIsBadRequest(self) -> None:
        """An empty field or one holding a NUL character is a BadRequest naming the field."""
        for index, field in enumerate(["Directory", "Base", "File"]):
            for value, words in [("", "must not be empty"), ("lab\0", "NUL")]:
                fields = ["lab", "time_series.parquet", "work.py"]
                fields[index] = value
                error = self.assertRaises(BadRequest, self.resolve, *fields)
                self.assertIn(field, error.message)
                self.assertIn(words, error.message)

    def test_resultsLeadingOutIsForbidden(self) -> None:
        """A ``results`` symlink in Directory that leads out of it makes the job Forbidden."""
        os.symlink(self.outside, os.path.join(self.lab, "results"))
        error = self.assertRaises(Forbidden, self.resolve, "lab")
        self.assertIn("results leads outside", error.message)


def read_both(path: str) -> dict[str, dd.DataFrame]:
    """The dataset at ``path`` as each engine reads it."""
    return {engine: datasets.read_dataset(path, engine) for engine in wire.ENGINES}


class ReadDatasetTests(SynchronousTestCase):
    """Both engines read the same rows, in the same order, with the same divisions."""

    def test_fileEnginesAgree(self) -> None:
        """A file of several row groups reads as exactly the data written, with either engine."""
        frame = sample_frame(4000)
        path = write_dataset(make_folder(self), frame=frame, row_group_size=1000)
        for engine, dataset in read_both(path).items():
            read = dataset.compute().reset_index(drop=True)
            pd.testing.assert_frame_equal(read, frame, check_dtype=False, obj=engine)

    def test_folderEnginesAgree(self) -> None:
        """A folder of 12 small files as Dask writes it (part.0 ... part.11) reads in file order,
        combined into one partition."""
        frame = sample_frame(3000)
        folder = os.path.join(make_folder(self), "dataset")
        dd.from_pandas(frame, npartitions=12).to_parquet(folder, write_index=False)
        for engine, dataset in read_both(folder).items():
            self.assertEqual(dataset.npartitions, 1, engine)
            read = dataset.compute().reset_index(drop=True)
            pd.testing.assert_frame_equal(read, frame, check_dtype=False, obj=engine)

    def assert_resamples(self, path: str, frame: pd.DataFrame, rule: str) -> None:
        """Both engines read ``frame``, sorted by time, with known divisions, and resample it."""
        for engine, dataset in read_both(path).items():
            where = f"{os.path.basename(path)} read with {engine}"
            self.assertTrue(dataset.known_divisions, where)
            self.assertEqual(dataset.divisions[0], frame.index[0], where)
            self.assertEqual(dataset.divisions[-1], frame.index[-1], where)
            pd.testing.assert_frame_equal(dataset.compute(), frame, check_dtype=False, obj=where)
            pd.testing.assert_series_equal(
                dataset.value.resample(rule).mean().compute(),
                frame.value.resample(rule).mean(),
                check_freq=False,
                obj=where,
            )

    def test_sortedFileGivesDivisions(self) -> None:
        """A file with a sorted time index has known divisions; resample gives pandas' numbers."""
        frame = sample_frame(4000).set_index("time")
        path = os.path.join(make_folder(self), "indexed.parquet")
        frame.to_parquet(path, row_group_size=1000)
        self.assert_resamples(path, frame, "10min")

    def test_sortedFolderGivesDivisions(self) -> None:
        """A folder of 12 files as Dask writes it, sorted by time, has known divisions."""
        frame = sample_frame(4000).set_index("time")
        path = os.path.join(make_folder(self), "parts")
        dd.from_pandas(frame, npartitions=12).to_parquet(path)
        self.assert_resamples(path, frame, "10min")

    def test_timeZoneKeptThroughResample(self) -> None:
        """A time index in a time zone resamples by that zone's days, as pandas does."""
        frame = sample_frame(4000)
        frame["time"] = pd.date_range("2026-01-01", periods=4000, freq="min", tz="Europe/Berlin")
        frame = frame.set_index("time")
        path = os.path.join(make_folder(self), "zoned.parquet")
        frame.to_parquet(path, row_group_size=1000)
        self.assert_resamples(path, frame, "1D")


def result_frames() -> dict[str, pd.DataFrame]:
    """Frames as formulas return them: a time index, a named index, and no index at all."""
    frame = sample_frame(2000)
    return {
        "hourly": frame.set_index("time").value.resample("10min").mean().to_frame(),
        "by_sensor": frame.groupby("sensor").value.agg(["mean", "count"]),
        "plain": frame.head(50),
    }


def read_back(path: str, output: str, index: list[str]) -> pd.DataFrame:
    """A written result read with pandas, its index restored, times parsed."""
    if output == "parquet":
        return pd.read_parquet(path)
    if output == "csv":
        frame = pd.read_csv(path)
    else:
        with open(path) as f:
            frame = pd.DataFrame(json.load(f))
    if "time" in frame:
        frame["time"] = pd.to_datetime(frame["time"])
    return frame.set_index(index) if index else frame


class WriteResultsTests(SynchronousTestCase):
    """``write_results`` puts each frame in ``results/<job>``, complete or not at all."""

    def setUp(self) -> None:
        self.directory = make_folder(self, "lab")
        self.results = os.path.join(self.directory, "results")

    def test_eachOutputRoundTrips(self) -> None:
        """Parquet, CSV and JSON results read back with pandas give the same numbers."""
        frames = result_frames()
        for output, ext in wire.OUTPUTS.items():
            job = "job-" + output
            files = worker_output.write_results(self.directory, job, frames, output)
            self.assertEqual(files, {name: f"results/{job}/{name}{ext}" for name in frames})
            for name, frame in frames.items():
                index = [level for level in frame.index.names if level is not None]
                read = read_back(os.path.join(self.directory, files[name]), output, index)
                pd.testing.assert_frame_equal(
                    read,
                    frame,
                    check_dtype=False,
                    check_index_type=False,
                    check_exact=True,
                    check_freq=False,
                    obj=files[name],
                )
        self.assertEqual(sorted(os.listdir(self.results)), ["job-csv", "job-json", "job-parquet"])

    def test_failingWriterLeavesNothing(self) -> None:
        """When one frame cannot be written, no result and no partial folder remain."""
        frames = {
            "good": sample_frame(10),
            "bad": pd.DataFrame({"mixed": pd.Series([1, "a"], dtype=object)}),
        }
        self.assertRaises(
            pyarrow.ArrowException,
            worker_output.write_results,
            self.directory,
            "job",
            frames,
            "parquet",
        )
        self.assertFalse(os.path.exists(self.results))

    def test_resultsLeadingOutIsForbidden(self) -> None:
        """A ``results`` symlink out of Directory is Forbidden and nothing is written there."""
        outside = make_folder(self, "outside")
        os.symlink(outside, self.results)
        self.assertRaises(
            Forbidden, worker_output.write_results, self.directory, "job", result_frames(), "csv"
        )
        self.assertEqual(os.listdir(outside), [])

    def test_removePartialCleansWhatAKilledWorkerLeft(self) -> None:
        """``remove_partial`` removes a job's half-written folder and leaves finished jobs alone."""
        worker_output.write_results(self.directory, "done", result_frames(), "csv")
        partial = os.path.join(self.results, ".killed.partial")
        os.makedirs(partial)
        write_dataset(partial)
        files.remove_partial(self.directory, "killed")
        files.remove_partial(self.directory, "never-started")
        self.assertEqual(os.listdir(self.results), ["done"])
        self.assertEqual(len(os.listdir(os.path.join(self.results, "done"))), 3)


class JsonValueTests(SynchronousTestCase):
    """Values and rows become plain JSON, as the answer and the JSON output carry them."""

    def test_jsonValue(self) -> None:
        """numpy scalars unwrap, NaN and infinities and missing times become null, times ISO."""
        cases: list[tuple[object, object]] = [
            (np.int64(3), 3),
            (np.float32(1.5), 1.5),
            (np.float64(2.25), 2.25),
            (np.bool_(True), True),
            (np.float64("nan"), None),
            (float("inf"), None),
            (-np.inf, None),
            (pd.NA, None),
            (pd.NaT, None),
            (np.datetime64("NaT"), None),
            (pd.Timestamp("2026-01-01 12:30"), "2026-01-01T12:30:00"),
            (pd.Timestamp("2026-01-01", tz="Europe/Berlin"), "2026-01-01T00:00:00+01:00"),
            (np.datetime64("2026-01-02T03:04:05"), "2026-01-02T03:04:05"),
            (
                [1, np.int64(2), [np.nan, pd.Timestamp("2026-01-02")]],
                [1, 2, [None, "2026-01-02T00:00:00"]],
            ),
            (np.array([1.0, np.nan]), [1.0, None]),
            ({"a": (np.int32(1), float("nan"))}, {"a": [1, None]}),
            ("text", "text"),
        ]
        for value, expected in cases:
            converted = tables.json_value(value)
            self.assertEqual(
                json.loads(json.dumps(converted, allow_nan=False)), expected, repr(value)
            )

    def test_recordsPutTheIndexFirst(self) -> None:
        """A frame's rows become records, a data-carrying index first, NaN and NaT as null."""
        frame = pd.DataFrame(
            {"value": [1.5, np.nan], "seen": [pd.Timestamp("2026-01-01"), pd.NaT]},
            index=pd.Index(["s1", "s2"], name="sensor"),
        )
        self.assertEqual(
            tables.records(frame),
            [
                {"sensor": "s1", "value": 1.5, "seen": "2026-01-01T00:00:00"},
                {"sensor": "s2", "value": None, "seen": None},
            ],
        )
        self.assertEqual(
            tables.records(frame.reset_index(drop=True)),
            [{"value": 1.5, "seen": "2026-01-01T00:00:00"}, {"value": None, "seen": None}],
        )
