"""
Tests for ``measuring.worker`` run in this process (``support.WorkerTestCase``): importing a
formula file, choosing its formulas, and computing them in one Dask call.

What needs a real worker process (Ready, crashes, the job's log file) is tested with the pool.
"""

from __future__ import annotations

import sys

import pandas as pd
from dask.callbacks import Callback

from measuring.errors import JobFailed, NotFound
from measuring.test.support import FORMULA_NAMES, FORMULAS, WorkerTestCase, write_formulas
from measuring.worker import dataset as datasets
from measuring.worker import job as worker_job

#: The name the worker imports a formula file under.
MODULE = "measuring_formulas"


class ImportFormulasTests(WorkerTestCase):
    """``import_formulas`` imports the file, or says which line of it is wrong."""

    def test_importsTheFileBesideItsHelpers(self) -> None:
        """The formula file is imported, and can import a module from its own folder."""
        write_formulas(self.directory, "SCALE = 3\n", name="helpers.py")
        path = self.formulas("from helpers import SCALE\n\n\ndef scaled(df):\n    return SCALE\n")
        module = worker_job.import_formulas(path)
        self.assertEqual(module.scaled(None), 3)
        self.assertIs(sys.modules[MODULE], module)

    def test_syntaxErrorNamesFileAndLine(self) -> None:
        """A syntax error is JobFailed naming the file, the line and the error."""
        path = self.formulas("def fine(df):\n    return 1\n\n\ndef broken(df:\n    return 2\n")
        error = self.assertRaises(JobFailed, worker_job.import_formulas, path)
        self.assertIn("work.py line 5: SyntaxError", error.message)
        self.assertIn("SyntaxError", self.stderr.getvalue())

    def test_exceptionAtImportNamesItAndLine(self) -> None:
        """An exception while importing is JobFailed with its type, message and line."""
        path = self.formulas("import math\n\nLIMIT = math.sqrt(-1)\n")
        error = self.assertRaises(JobFailed, worker_job.import_formulas, path)
        self.assertEqual(
            error.message, "importing work.py raised ValueError: math domain error (work.py line 3)"
        )
        self.assertIn("Traceback", self.stderr.getvalue())


IMPORTS = """
from os.path import join
from helpers import shared
import math

LIMIT = 3
square = math.sqrt


class Table:
    pass
"""


class FindFormulasTests(WorkerTestCase):
    """A formula is a public top-level function of the file, narrowed by __all__ and Functions."""

    def find(self, source: str, wanted: list[str] | None = None) -> list[str]:
        """The names of the formulas ``source`` defines, as ``find_formulas`` chooses them."""
        write_formulas(self.directory, "def shared(df):\n    return 1\n", name="helpers.py")
        path = self.formulas(source)
        return list(worker_job.find_formulas(worker_job.import_formulas(path), path, wanted))

    def test_publicFunctionsDefinedInTheFile(self) -> None:
        """Public functions defined in the file are formulas, in order; private or imported not."""
        self.assertEqual(self.find(IMPORTS + FORMULAS), FORMULA_NAMES)

    def test_allNarrows(self) -> None:
        """``__all__`` narrows the formulas, and cannot make an imported function one."""
        source = IMPORTS + FORMULAS + '\n__all__ = ["count", "peak", "join", "shared"]\n'
        self.assertEqual(self.find(source), ["peak", "count"])

    def test_functionsNarrowInTheirOrder(self) -> None:
        """Functions chooses formulas, in the order it names them."""
        self.assertEqual(self.find(FORMULAS, ["count", "peak"]), ["count", "peak"])

    def test_unknownFunctionIsNotFound(self) -> None:
        """A Functions name that is no formula is NotFound, listing the file's formulas."""
        for name in ["nope", "_helper", "shared"]:
            error = self.assertRaises(NotFound, self.find, IMPORTS + FORMULAS, ["peak", name])
            self.assertEqual(
                error.message,
                f"work.py has no formula named {name!r} (its formulas: {', '.join(FORMULA_NAMES)})",
            )

    def test_noFormulasIsJobFailed(self) -> None:
        """A file without formulas is JobFailed saying what a formula is."""
        error = self.assertRaises(JobFailed, self.find, IMPORTS + "def _private(df):\n    pass\n")
        self.assertIn("work.py defines no formulas", error.message)


class ComputeTests(WorkerTestCase):
    """``compute`` calls every formula, then computes all their results in one Dask call."""

    def test_oneDaskComputeForAllFormulas(self) -> None:
        """Three lazy formulas are computed by one run of the Dask scheduler, to pandas' numbers."""
        formulas = {
            "total": lambda df: df.value.sum(),
            "by_sensor": lambda df: df.groupby("sensor").value.mean(),
            "readings": lambda df: df.value.count(),
        }
        dataset = datasets.read_dataset(self.base, "fastparquet")
        starts: list[object] = []
        with Callback(start=starts.append):
            values = worker_job.compute(formulas, dataset, self.base)
        self.assertEqual(len(starts), 1)
        self.assertAlmostEqual(values["total"], self.frame.value.sum())
        pd.testing.assert_series_equal(
            values["by_sensor"].sort_index(),
            self.frame.groupby("sensor").value.mean(),
            check_index_type=False,
        )
        self.assertEqual(values["readings"], 3995)

    def test_progressFromFirstToLastTask(self) -> None:
        """With ``progress``, (0, n) is reported as Dask starts and (n, n) when its n tasks end."""
        reports: list[tuple[int, int]] = []
        # fastparquet reads one partition per row group: several partitions, several tasks.
        dataset = datasets.read_dataset(self.base, "fastparquet")
        formulas = {"readings": lambda df: df.value.count()}
        values = worker_job.compute(
            formulas, dataset, self.base, lambda *done: reports.append(done)
        )
        self.assertEqual(values, {"readings": 3995})
        total = reports[0][1]
        self.assertGreater(total, 1)
        self.assertEqual((reports[0], reports[-1]), ((0, total), (total, total)))
        self.assertEqual(reports, sorted(reports))
        self.assertEqual({reported for _, reported in reports}, {total})
