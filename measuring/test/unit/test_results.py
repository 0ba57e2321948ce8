"""
Tests for result files of ``measuring.results`` as they are read back: JSON written one record a
line in chunks of 10,000 rows, as pandas reads it, and the pages ``read_rows`` cuts from JSON and
CSV files (the Result request), across those chunks and with values that hold newlines.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import pandas as pd
from twisted.trial.unittest import SynchronousTestCase

from measuring.server import results
from measuring.test.unit.test_loader import make_folder
from measuring.worker import output

#: Rows of the big frame: two and a half of the chunks JSON is written in.
ROWS = 25_000


def big_frame(named_index: bool) -> pd.DataFrame:
    """``ROWS`` rows of whole numbers, full-precision floats and text; indexed "row" if told."""
    n = np.arange(ROWS)
    frame = pd.DataFrame(
        {
            "n": n,
            "value": np.random.default_rng(7).normal(20.0, 5.0, ROWS),
            "sensor": [f"s{i % 7}" for i in n],
        }
    )
    return frame.set_index(pd.Index(n * 3 + 1, name="row")) if named_index else frame


def expected_records(frame: pd.DataFrame, start: int, stop: int) -> list[dict[str, Any]]:
    """Rows ``start`` to ``stop`` as the Result answer gives them: a named index first."""
    table = frame.reset_index() if frame.index.name else frame
    page: list[dict[str, Any]] = table.iloc[start:stop].to_dict("records")
    return page


class JsonResultTests(SynchronousTestCase):
    """A table written as JSON, past the 10,000 rows of a chunk, with and without an index."""

    def setUp(self) -> None:
        self.directory = make_folder(self, "lab")

    def write(self, frame: pd.DataFrame, job: str) -> str:
        """Write ``frame`` as the JSON result "big" of ``job``; returns its path relative to lab."""
        return output.write_results(self.directory, job, {"big": frame}, "json")["big"]

    def test_readsBackAsTheFrame(self) -> None:
        """pandas reads the file back equal to the frame: one record a line, no extra key."""
        for named in (False, True):
            frame = big_frame(named)
            path = os.path.join(self.directory, self.write(frame, f"job-{named}"))
            with open(path, encoding="utf-8") as f:
                lines = f.read().splitlines()
            self.assertEqual(len(lines), ROWS, "not one record per line")
            self.assertTrue(lines[0].startswith("[{") and lines[-1].endswith("}]"))
            keys = ["row", "n", "value", "sensor"] if named else ["n", "value", "sensor"]
            for number, line in enumerate(lines):
                record = json.loads(line.removeprefix("[").removesuffix("]").removesuffix(","))
                self.assertEqual(list(record), keys, f"line {number + 1} of {path}")
            read = pd.read_json(path, precise_float=True)
            pd.testing.assert_frame_equal(
                read.set_index("row") if named else read, frame, check_exact=True
            )

    def test_pagesAcrossChunks(self) -> None:
        """Pages across the 10,000-row chunks hold the right records; Rows counts them all."""
        for named in (False, True):
            frame = big_frame(named)
            file = self.write(frame, f"job-{named}")
            for offset, limit in [(9_995, 10), (19_990, 20), (0, 3), (24_998, 10)]:
                page = results.read_rows(self.directory, file, offset, limit)
                self.assertEqual((page["File"], page["Rows"], page["Offset"]), (file, ROWS, offset))
                self.assertEqual(
                    page["Records"],
                    expected_records(frame, offset, offset + limit),
                    (named, offset, limit),
                )
            past = results.read_rows(self.directory, file, ROWS, 10)
            self.assertEqual((past["Rows"], past["Records"]), (ROWS, []))


class CsvResultTests(SynchronousTestCase):
    """A CSV result whose text values hold newlines, commas and quotes."""

    def test_recordsNotLines(self) -> None:
        """A value holding newlines is one row of a page, whole; Rows is the number of records."""
        directory = make_folder(self, "lab")
        notes = ["plain", "two\nlines", 'a "quoted",\r\ncomma', "", "three\nlines\nhere", "end"]
        frame = pd.DataFrame({"n": range(len(notes)), "note": notes})
        file = output.write_results(directory, "job", {"notes": frame}, "csv")["notes"]
        with open(os.path.join(directory, file), encoding="utf-8") as f:
            self.assertGreater(len(f.read().splitlines()), len(notes) + 1)

        whole = results.read_rows(directory, file, 0, 100)
        self.assertEqual(whole["Rows"], len(notes))
        self.assertEqual(whole["Columns"], ["n", "note"])
        self.assertEqual(
            [record["note"] for record in whole["Records"]], [*notes[:3], None, *notes[4:]]
        )
        page = results.read_rows(directory, file, 1, 2)
        self.assertEqual(
            (page["Rows"], page["Records"]),
            (len(notes), [{"n": 1, "note": "two\nlines"}, {"n": 2, "note": notes[2]}]),
        )
        last = results.read_rows(directory, file, 4, 10)
        self.assertEqual(
            last["Records"], [{"n": 4, "note": "three\nlines\nhere"}, {"n": 5, "note": "end"}]
        )
