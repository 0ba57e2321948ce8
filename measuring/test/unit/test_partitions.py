"""
Tests for how ``measuring.worker.dataset`` cuts a dataset into partitions (from its row groups,
the job's memory and its threads; small files combined; kept through a column projection) and
indexes it by a column with divisions from the Parquet statistics, with both engines.
"""

from __future__ import annotations

import os

import dask.dataframe as dd
import pandas as pd
from twisted.trial.unittest import SynchronousTestCase

from measuring import wire
from measuring.errors import JobFailed, NotFound
from measuring.test.support import sample_frame, write_dataset
from measuring.test.unit.test_loader import make_folder
from measuring.worker import dataset as datasets
from measuring.worker.dataset import RowGroup, budget, plan

MiB = 2**20


def groups(*sizes: int, low: int = 0) -> list[RowGroup]:
    """Row groups of ``sizes`` MiB of one file, each holding the index range after the last."""
    found = []
    for number, size in enumerate(sizes):
        found.append(RowGroup("f", number, 1000, size * MiB, low + number, low + number + 0.5))
    return found


def sizes(partitions: list[datasets.Partition]) -> list[int]:
    """Each partition's size in MiB."""
    return [partition.bytes // MiB for partition in partitions]


class PlanTests(SynchronousTestCase):
    """``budget`` and ``plan``: how many threads, how big partitions are, which row groups."""

    def test_threadsShareTheMemory(self) -> None:
        """Each thread gets PER_THREAD and a partition of 1/WORKING_SET of the rest of its share."""
        free = (1500 - 300) * MiB
        for threads in (1, 2, 4):
            share = (free - threads * datasets.PER_THREAD) // (threads * datasets.WORKING_SET)
            self.assertEqual(
                budget(1500 * MiB, threads, 300 * MiB), datasets.Budget(threads, share)
            )

    def test_bounds(self) -> None:
        """However much memory, partitions stay below the most; no limit gives the most."""
        self.assertEqual(budget(None, 2), datasets.Budget(2, datasets.MOST_PARTITION))
        self.assertEqual(budget(64 * 2**30, 1), datasets.Budget(1, datasets.MOST_PARTITION))

    def test_fewerThreadsWhenMemoryIsShort(self) -> None:
        """Memory too short for every thread's partition runs fewer threads, at least one."""
        least = datasets.PER_THREAD + datasets.WORKING_SET * datasets.LEAST_PARTITION
        self.assertEqual(budget(300 * MiB + 2 * least, 8, 300 * MiB).threads, 2)
        self.assertEqual(budget(300 * MiB + least, 8, 300 * MiB).threads, 1)
        self.assertEqual(
            budget(100 * MiB, 2, 300 * MiB), datasets.Budget(1, datasets.LEAST_PARTITION)
        )

    def test_rowGroupsCombined(self) -> None:
        """Small row groups are combined in order up to the partition size, never split."""
        self.assertEqual(sizes(plan(groups(*[10] * 20), 40 * MiB, 1)), [40, 40, 40, 40, 40])
        self.assertEqual(sizes(plan(groups(10, 10, 100, 5, 5), 64 * MiB, 1)), [20, 100, 10])

    def test_enoughForTheThreads(self) -> None:
        """A dataset is cut finer than the memory allows, so that every thread has 4 partitions."""
        self.assertEqual(len(plan(groups(*[20] * 16), 256 * MiB, 2)), 8)
        self.assertEqual(len(plan(groups(*[20] * 16), 256 * MiB, 4)), 16)

    def test_notFinerThanWorthIt(self) -> None:
        """Data that is small in all is not cut below 16 MiB for the threads' sake."""
        self.assertEqual(sizes(plan(groups(*[1] * 40), 256 * MiB, 8)), [16, 16, 8])

    def test_touchingRangesStayTogether(self) -> None:
        """With a sorted index, a row group starting where the last ended joins its partition."""
        touching = [RowGroup("f", i, 10, 10 * MiB, i // 2, i // 2 + 1) for i in range(4)]
        self.assertEqual(sizes(plan(touching, 10 * MiB, 1, sorted_index=True)), [40])
        self.assertEqual(sizes(plan(touching, 10 * MiB, 1)), [10, 10, 10, 10])


def write_groups(folder: str, frame: pd.DataFrame, rows: int, name: str = "data.parquet") -> str:
    """``frame`` as one Parquet file of row groups of ``rows`` rows."""
    return write_dataset(folder, name, frame, row_group_size=rows)


def read(
    path: str, engine: str, partition: int = 64 * 1024, index: str | None = None
) -> dd.DataFrame:
    """The dataset in partitions of at most ``partition`` bytes, one thread."""
    return datasets.read_dataset(path, engine, index, partition)


class PartitionTests(SynchronousTestCase):
    """Both engines read the same partitions, sized as the plan says, and keep them projected."""

    def setUp(self) -> None:
        self.folder = make_folder(self)
        self.frame = sample_frame(40_000)

    def test_oneFileOfManyRowGroups(self) -> None:
        """A file of 40 row groups reads as partitions of whole row groups, rows in order."""
        path = write_groups(self.folder, self.frame, 1000)
        width = datasets.Source.open(path).row_groups(None)[0].bytes
        for engine in wire.ENGINES:
            dataset = read(path, engine, partition=4 * width)
            self.assertEqual(dataset.npartitions, 10, engine)
            pd.testing.assert_frame_equal(
                dataset.compute().reset_index(drop=True), self.frame, check_dtype=False, obj=engine
            )

    def test_folderOfSmallFilesCombined(self) -> None:
        """A folder of 40 small files reads as a few partitions, in the files' order."""
        folder = os.path.join(self.folder, "parts")
        dd.from_pandas(self.frame, npartitions=40).to_parquet(folder, write_index=False)
        width = datasets.Source.open(folder).row_groups(None)[0].bytes
        for engine in wire.ENGINES:
            dataset = read(folder, engine, partition=8 * width)
            self.assertEqual(dataset.npartitions, 5, engine)
            pd.testing.assert_frame_equal(
                dataset.compute().reset_index(drop=True), self.frame, check_dtype=False, obj=engine
            )

    def test_projectionKeepsPartitions(self) -> None:
        """Selecting one column reads only it, in as many partitions as before (none fused)."""
        path = write_groups(self.folder, self.frame, 1000)
        for engine in wire.ENGINES:
            dataset = read(path, engine, partition=100_000)
            column = dataset.value
            self.assertEqual(column.optimize().npartitions, dataset.npartitions, engine)
            self.assertGreater(dataset.npartitions, 10, engine)
            read_columns = [
                node.operand("columns")
                for node in dataset[["sensor", "value"]].optimize(fuse=False).expr.walk()
                if type(node).__name__ == "FromMapProjectable"
            ]
            self.assertEqual(read_columns, [["sensor", "value"]], engine)
            pd.testing.assert_series_equal(
                column.compute().reset_index(drop=True), self.frame.value, obj=engine
            )

    def test_pandasTypesAsDask(self) -> None:
        """Texts read as Dask's own reader gives them, with either engine."""
        path = write_groups(self.folder, self.frame, 1000)
        expected = dd.read_parquet(path).dtypes
        for engine in wire.ENGINES:
            pd.testing.assert_series_equal(read(path, engine).dtypes, expected, obj=engine)


class IndexTests(SynchronousTestCase):
    """``index``: divisions from the statistics, resample as pandas, clear errors otherwise."""

    def setUp(self) -> None:
        self.folder = make_folder(self)
        self.frame = sample_frame(40_000)

    def assert_resamples(self, path: str, frame: pd.DataFrame) -> None:
        """Both engines index ``frame`` by time with known divisions; resample is pandas'."""
        expected = frame.set_index("time").value.resample("10min").mean()
        for engine in wire.ENGINES:
            dataset = read(path, engine, index="time")
            self.assertTrue(dataset.known_divisions, engine)
            self.assertGreater(dataset.npartitions, 1, engine)
            self.assertEqual(dataset.divisions[0], frame.time.min(), engine)
            self.assertEqual(dataset.divisions[-1], frame.time.max(), engine)
            self.assertEqual(list(dataset.columns), ["sensor", "value"], engine)
            pd.testing.assert_series_equal(
                dataset.value.resample("10min").mean().compute(),
                expected,
                check_freq=False,
                obj=engine,
            )

    def test_sortedFile(self) -> None:
        """A file sorted by time is indexed by it, divisions from the row groups' statistics."""
        self.assert_resamples(write_groups(self.folder, self.frame, 1000), self.frame)

    def test_rowGroupsOutOfOrder(self) -> None:
        """Files each sorted, in no order, that do not overlap are read in time order."""
        folder = os.path.join(self.folder, "shuffled")
        os.mkdir(folder)
        for number, start in enumerate([30_000, 0, 20_000, 10_000]):
            chunk = self.frame.iloc[start : start + 10_000]
            write_groups(folder, chunk, 2500, f"part.{number}.parquet")
        self.assert_resamples(folder, self.frame)

    def test_timeZone(self) -> None:
        """A zoned time column keeps its zone in the index and the divisions."""
        # Not across a change of summer time: Dask's resample then repeats bins (from_pandas too).
        times = pd.date_range("2026-01-05", periods=len(self.frame), freq="min", tz="Europe/Berlin")
        frame = self.frame.assign(time=times)
        self.assert_resamples(write_groups(self.folder, frame, 1000), frame)

    def test_storedIndexMovesAside(self) -> None:
        """An index the file keeps becomes a column when the job indexes by another."""
        frame = self.frame.set_index("sensor")
        path = os.path.join(self.folder, "kept.parquet")
        frame.to_parquet(path, row_group_size=1000)
        for engine in wire.ENGINES:
            dataset = read(path, engine, index="time")
            self.assertEqual(sorted(dataset.columns), ["sensor", "value"], engine)
            self.assertTrue(dataset.known_divisions, engine)

    def test_unsorted(self) -> None:
        """Row groups whose times overlap are JobFailed naming them and the fix; not sorted."""
        frame = self.frame.sort_values(["sensor", "time"], kind="stable")
        path = write_groups(self.folder, frame, 1000)
        for engine in wire.ENGINES:
            error = self.assertRaises(JobFailed, read, path, engine, index="time")
            self.assertIn("the dataset is not sorted by 'time'", error.message)
            self.assertIn("of data.parquet", error.message)
            self.assertIn("sort the data by 'time' once", error.message)

    def test_unknownColumn(self) -> None:
        """An index column the dataset lacks is NotFound naming the columns it has."""
        path = write_groups(self.folder, self.frame, 1000)
        for engine in wire.ENGINES:
            error = self.assertRaises(NotFound, read, path, engine, index="tiem")
            self.assertEqual(
                error.message,
                "the dataset has no column 'tiem' to index by (its columns: time, sensor, value)",
            )

    def test_withoutIndexNoDivisions(self) -> None:
        """Without ``index``, the time column is a column and the divisions are unknown."""
        path = write_groups(self.folder, self.frame, 1000)
        for engine in wire.ENGINES:
            dataset = read(path, engine)
            self.assertFalse(dataset.known_divisions, engine)
            self.assertIn("time", dataset.columns)
