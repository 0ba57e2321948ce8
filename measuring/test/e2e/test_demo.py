"""``python -m measuring.demo``: the README's first command, run as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys

import pandas as pd
from twisted.trial.unittest import SynchronousTestCase

from measuring.test.support import environment, naming


class DemoTests(SynchronousTestCase):
    """The demo runs the product's main job end to end and cleans up after itself."""

    def test_demo(self) -> None:
        """It prints results that match the sample data, keeps the files and stops the server."""
        folder = os.path.realpath(self.mktemp())
        result = subprocess.run(
            [sys.executable, "-m", "measuring.demo", "--days", "1", "--folder", folder],
            env=environment(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        data = pd.read_parquet(os.path.join(folder, "time_series.parquet"))
        self.assertEqual(len(data), 5 * 86_400)
        self.assertIn(f"\npeak: {float(data.value.max())!r}\n", result.stdout)
        self.assertIn(f"\nalarm_count: {int((data.value > 31.0).sum())}\n", result.stdout)
        [job] = os.listdir(os.path.join(folder, "results"))
        stats = pd.read_parquet(os.path.join(folder, "results", job, "stats_by_sensor.parquet"))
        expected = data.groupby("sensor", observed=True).value.mean()
        pd.testing.assert_series_equal(
            stats["mean"], expected, check_names=False, check_index_type=False
        )
        self.assertIn("Server stopped.", result.stdout)
        self.assertIn(f"The data, the formulas and the results are in {folder}", result.stdout)
        self.assertEqual(naming(folder), [], "the demo left its server or workers running")
