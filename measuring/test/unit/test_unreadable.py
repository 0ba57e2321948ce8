"""
Tests for ``measuring.worker.unreadable``: which file of a Parquet dataset cannot be read, and
which row group, with either engine, for files damaged as disks and copies damage them (cut
short, bytes flipped inside a data page), in this process.
"""

from __future__ import annotations

import os

import pyarrow.parquet as pq
from twisted.trial.unittest import SynchronousTestCase

from measuring.test.support import sample_frame
from measuring.wire import ENGINES
from measuring.worker import unreadable

ROWS = 20_000
GROUP = 5_000


def write(path: str) -> None:
    """The sample data in four row groups, snappy-compressed (as pandas writes by default)."""
    sample_frame(rows=ROWS).to_parquet(path, row_group_size=GROUP, compression="snappy")


def flip_page(path: str, group: int) -> None:
    """Flip 64 bytes inside the first data page of row group ``group`` (from 0) of ``path``."""
    column = pq.ParquetFile(path).metadata.row_group(group).column(2)
    with open(path, "r+b") as f:
        f.seek(column.data_page_offset + 40)
        data = bytearray(f.read(64))
        f.seek(column.data_page_offset + 40)
        f.write(bytes(byte ^ 0xFF for byte in data))


def garble_footer(path: str) -> None:
    """Overwrite the first 32 bytes of the footer's metadata (its length and PAR1 kept)."""
    with open(path, "r+b") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(size - 8)
        length = int.from_bytes(f.read(4), "little")
        f.seek(size - 8 - length)
        f.write(b"\xff" * 32)


def cut(path: str) -> None:
    """Cut ``path`` to half its length."""
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


class LocateTests(SynchronousTestCase):
    """What ``locate`` says of a damaged dataset."""

    def setUp(self) -> None:
        self.folder = os.path.realpath(self.mktemp())
        self.plant = os.path.join(self.folder, "plant")
        os.makedirs(self.plant)
        for n in range(3):
            write(os.path.join(self.plant, f"part.{n}.parquet"))

    def test_flippedPageInAFolder(self) -> None:
        """A damaged data page: the file, in the folder as the request named it, its row group."""
        flip_page(os.path.join(self.plant, "part.1.parquet"), 2)
        for engine in ENGINES:
            said = unreadable.locate(self.plant, engine)
            assert said is not None, engine
            self.assertTrue(
                said.startswith("plant/part.1.parquet is not readable Parquet (row group 3 of 4)"),
                said,
            )

    def test_cutShort(self) -> None:
        """A file cut short: the file, and that its footer cannot be read."""
        single = os.path.join(self.folder, "time_series.parquet")
        write(single)
        cut(single)
        for engine in ENGINES:
            said = unreadable.locate(single, engine)
            self.assertEqual(
                (said or "").split(":")[0],
                "time_series.parquet is not readable Parquet (its footer cannot be read)",
                engine,
            )

    def test_garbledFooter(self) -> None:
        """A footer that is there but garbled: the file, and that its footer cannot be read."""
        garble_footer(os.path.join(self.plant, "part.2.parquet"))
        for engine in ENGINES:
            said = unreadable.locate(self.plant, engine) or ""
            self.assertTrue(
                said.startswith(
                    "plant/part.2.parquet is not readable Parquet (its footer cannot be read)"
                ),
                said,
            )

    def test_readableDataset(self) -> None:
        """Every file reads: nothing to say."""
        for engine in ENGINES:
            self.assertIsNone(unreadable.locate(self.plant, engine))

    def test_budget(self) -> None:
        """Out of time, it says nothing rather than guess."""
        flip_page(os.path.join(self.plant, "part.2.parquet"), 0)
        self.assertIsNone(unreadable.locate(self.plant, "pyarrow", budget=0))


class FromReadingTests(SynchronousTestCase):
    """Which errors came from reading Parquet."""

    def test_readerError(self) -> None:
        """An error raised inside pyarrow's reader is one."""
        path = os.path.join(os.path.realpath(self.mktemp()) + ".parquet")
        with open(path, "wb") as f:
            f.write(b"not parquet at all")
        with self.assertRaises(Exception) as raised:
            pq.read_table(path)
        self.assertTrue(unreadable.from_reading(raised.exception))

    def test_formulaError(self) -> None:
        """A formula's own ZeroDivisionError is not."""
        try:
            1 / 0  # noqa: B018
        except ZeroDivisionError as e:
            self.assertFalse(unreadable.from_reading(e))
