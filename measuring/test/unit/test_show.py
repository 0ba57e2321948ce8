"""
Tests for ``measuring.client.show``: what ``measuring-client`` prints and draws for people.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
from twisted.trial.unittest import SynchronousTestCase

from measuring.client import show


class ChartTests(SynchronousTestCase):
    """``plot`` draws each numeric column of a table on an axis of its own."""

    def test_axisPerColumn(self) -> None:
        """A count beside means gets its own axis; a text column is left out."""
        frame = pd.DataFrame(
            {"count": [100_000, 99_000], "mean": [20.1, 19.8], "max": [35.0, 34.2],
             "unit": ["bar", "bar"]},
            index=pd.Index(["s1", "s2"], name="sensor"),
        )  # fmt: skip
        figure = show.chart(frame, "stats")
        self.assertEqual([axis.get_ylabel() for axis in figure.axes], ["count", "mean", "max"])
        # Each axis is scaled to its own column: the means are not flattened by the counts.
        self.assertLess(figure.axes[1].get_ylim()[1], 100)

    def test_series(self) -> None:
        """A Series over time is one line on one axis."""
        series = pd.Series(
            [1.0, 2.0, 3.0], index=pd.date_range("2026-01-01", periods=3, freq="h"), name="value"
        )
        figure = show.chart(series, "hourly")
        [axis] = figure.axes
        self.assertEqual((axis.get_ylabel(), len(axis.get_lines())), ("value", 1))

    def test_nothingNumeric(self) -> None:
        """A table without a numeric column is a ValueError saying so."""
        error = self.assertRaises(ValueError, show.chart, pd.DataFrame({"a": ["x"]}), "t")
        self.assertIn("no numeric column", str(error))

    def test_jobsTable(self) -> None:
        """The jobs table shows Base and File inside their Directory, and a failed job's error."""
        found: list[dict[str, Any]] = [
            {"Job": "j1", "State": "failed", "Submitted": "t", "Directory": "/srv/plant",
             "Base": "/srv/plant/ts.parquet", "File": "/srv/plant/work.py",
             "Error": {"Code": "JobFailed", "Message": "formula 'a' raised KeyError"}},
            {"Job": "j2", "State": "done", "Submitted": "t", "Directory": "/srv/plant",
             "Base": "/srv/plant/ts.parquet", "File": "/srv/plant/work.py"},
        ]  # fmt: skip
        lines = show.jobs(found).splitlines()
        self.assertEqual(
            lines[0].split(), ["Job", "State", "Submitted", "Directory", "Base", "File", "Error"]
        )
        self.assertEqual(lines[1].split()[4:7], ["ts.parquet", "work.py", "JobFailed:"])
        self.assertEqual(
            lines[2].split(), ["j2", "done", "t", "/srv/plant", "ts.parquet", "work.py"]
        )
