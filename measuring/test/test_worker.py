"""
Tests for ``measuring.worker`` run in this process: importing a formula file, choosing its
formulas, computing them, and ``run_job`` from a Job message to the answer and the result files.

What needs a real worker process (Ready, crashes, the job's log file) is tested with the pool.
"""

from __future__ import annotations

import io
import os
import sys
import tempfile
from typing import Any

import dask
import pandas as pd
from dask.callbacks import Callback
from twisted.trial.unittest import SynchronousTestCase

from measuring import loader, worker
from measuring.errors import JobFailed, NotFound
from measuring.jobs import JobSpec
from measuring.messages import Message
from measuring.test.support import FORMULAS, sample_frame, write_dataset, write_formulas

#: The name the worker imports a formula file under.
MODULE = "measuring_formulas"
#: What ``FORMULAS`` defines, in order (``_helper`` is private).
FORMULA_NAMES = ["mean_by_sensor", "peak", "hourly", "count"]


def forget_modules(folder: str) -> None:
    """Remove the modules imported from ``folder`` (the formula file, its helpers)."""
    for name, module in list(sys.modules.items()):
        if (getattr(module, "__file__", None) or "").startswith(folder + os.sep):
            del sys.modules[name]


def restore_environ(saved: dict[str, str]) -> None:
    """Put back the environment ``saved`` (a job sets its mark in it)."""
    os.environ.clear()
    os.environ.update(saved)


class WorkerTestCase(SynchronousTestCase):
    """
    A Directory with a small dataset (four row groups), and cleanups that undo what a job changes
    in this process: the working directory, the environment and temporary folder, ``sys.path``,
    ``sys.modules`` and what it prints on stderr.
    """

    def setUp(self) -> None:
        self.addCleanup(os.chdir, os.getcwd())
        self.addCleanup(restore_environ, dict(os.environ))
        tmp = os.path.abspath(self.mktemp())
        os.makedirs(tmp)
        self.patch(tempfile, "tempdir", tmp)
        self.addCleanup(sys.path.__setitem__, slice(None), list(sys.path))
        self.stderr = io.StringIO()
        self.patch(sys, "stderr", self.stderr)
        self.directory = os.path.realpath(self.mktemp())
        os.makedirs(self.directory)
        self.addCleanup(forget_modules, self.directory)
        self.frame = sample_frame(4000)
        self.base = write_dataset(self.directory, frame=self.frame, row_group_size=1000)

    def formulas(self, source: str = FORMULAS) -> str:
        """Write ``source`` as the formula file ``work.py``; returns its path."""
        return write_formulas(self.directory, source)

    def run_job(
        self,
        source: str = FORMULAS,
        job: str = "job",
        functions: tuple[str, ...] | None = None,
        output: str = "parquet",
        engine: str = "pyarrow",
        base: str | None = None,
    ) -> Message:
        """Run a job as the server would send it and return the worker's answer."""
        paths = loader.JobPaths(self.directory, base or self.base, self.formulas(source))
        return worker.run_job(JobSpec(paths, functions, output, engine).message(job))

    def error(self, answer: Message) -> tuple[str, str]:
        """The Code and Message of an Error answer."""
        self.assertEqual(answer["Type"], "Error", answer)
        return answer["Error"]["Code"], answer["Error"]["Message"]

    def read(self, entry: dict[str, Any]) -> pd.DataFrame:
        """The result file an answer's entry names, read with pandas."""
        path = os.path.join(self.directory, entry["File"])
        if path.endswith(".csv"):
            return pd.read_csv(path)
        if path.endswith(".json"):
            return pd.read_json(path, orient="records")
        return pd.read_parquet(path).reset_index()


class ImportFormulasTests(WorkerTestCase):
    """``import_formulas`` imports the file, or says which line of it is wrong."""

    def test_importsTheFileBesideItsHelpers(self) -> None:
        """The formula file is imported, and can import a module from its own folder."""
        write_formulas(self.directory, "SCALE = 3\n", name="helpers.py")
        path = self.formulas("from helpers import SCALE\n\n\ndef scaled(df):\n    return SCALE\n")
        module = worker.import_formulas(path)
        self.assertEqual(module.scaled(None), 3)
        self.assertIs(sys.modules[MODULE], module)

    def test_syntaxErrorNamesFileAndLine(self) -> None:
        """A syntax error is JobFailed naming the file, the line and the error."""
        path = self.formulas("def fine(df):\n    return 1\n\n\ndef broken(df:\n    return 2\n")
        error = self.assertRaises(JobFailed, worker.import_formulas, path)
        self.assertIn("work.py line 5: SyntaxError", error.message)
        self.assertIn("SyntaxError", self.stderr.getvalue())

    def test_exceptionAtImportNamesItAndLine(self) -> None:
        """An exception while importing is JobFailed with its type, message and line."""
        path = self.formulas("import math\n\nLIMIT = math.sqrt(-1)\n")
        error = self.assertRaises(JobFailed, worker.import_formulas, path)
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
        return list(worker.find_formulas(worker.import_formulas(path), path, wanted))

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
        dataset = loader.read_dataset(self.base, "fastparquet")
        starts: list[object] = []
        with Callback(start=starts.append):
            values = worker.compute(formulas, dataset, self.base)
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
        dataset = loader.read_dataset(self.base, "fastparquet")
        formulas = {"readings": lambda df: df.value.count()}
        values = worker.compute(formulas, dataset, self.base, lambda *done: reports.append(done))
        self.assertEqual(values, {"readings": 3995})
        total = reports[0][1]
        self.assertGreater(total, 1)
        self.assertEqual((reports[0], reports[-1]), ((0, total), (total, total)))
        self.assertEqual(reports, sorted(reports))
        self.assertEqual({reported for _, reported in reports}, {total})

    def test_progressIsThrottled(self) -> None:
        """No report comes sooner than ``every`` seconds after the one before, but the final one."""
        reports: list[tuple[int, int]] = []
        dataset = loader.read_dataset(self.base, "fastparquet")
        with worker.ProgressReporter(lambda *done: reports.append(done), every=3600):
            dask.compute(dataset.value.sum(), scheduler="threads")
        total = reports[0][1]
        self.assertEqual(reports, [(0, total), (total, total)])


class RunJobTests(WorkerTestCase):
    """``run_job`` turns a Job message into result files and a Done answer, for both engines."""

    def test_resultsMatchPandas(self) -> None:
        """The files and values of FORMULAS hold the numbers pandas computes on the same data."""
        expected = {
            "mean_by_sensor": ("sensor", self.frame.groupby("sensor").value.mean()),
            "hourly": ("time", self.frame.set_index("time").value.resample("1h").mean()),
        }
        for engine in loader.ENGINES:
            job = "job-" + engine
            answer = self.run_job(job=job, engine=engine)
            self.assertEqual(answer["Type"], "Done", answer)
            results = answer["Results"]
            self.assertEqual(list(results), FORMULA_NAMES)
            self.assertEqual(results["peak"], {"Kind": "Scalar", "Value": self.frame.value.max()})
            self.assertEqual(results["count"], {"Kind": "Scalar", "Value": 4000})
            for name, (index, series) in expected.items():
                entry = results[name]
                self.assertEqual(
                    {key: entry[key] for key in ["Kind", "File", "Rows", "Columns", "Index"]},
                    {
                        "Kind": "Series",
                        "File": f"results/{job}/{name}.parquet",
                        "Rows": len(series),
                        "Columns": ["value"],
                        "Index": [index],
                    },
                )
                for table in [self.read(entry), pd.DataFrame(entry["Preview"])]:
                    table[index] = table[index].astype(series.index.dtype)
                    pd.testing.assert_series_equal(
                        table.set_index(index).value.sort_index(),
                        series,
                        check_freq=False,
                        obj=f"{name} read with {engine}",
                    )
            self.assertEqual(
                sorted(os.listdir(os.path.join(self.directory, "results", job))),
                ["hourly.parquet", "mean_by_sensor.parquet"],
            )
        self.assertEqual(
            sorted(os.listdir(os.path.join(self.directory, "results"))),
            ["job-fastparquet", "job-pyarrow"],
        )

    def test_previewShowsTheFirstTwentyRows(self) -> None:
        """Preview holds the first 20 rows as JSON records: times in ISO 8601, NaN as null."""
        source = "def first(df):\n    return df.head(50)\n"
        for engine in loader.ENGINES:
            entry = self.run_job(source, job="job-" + engine, engine=engine)["Results"]["first"]
            self.assertEqual(entry["Rows"], 50)
            self.assertEqual(entry["Columns"], ["time", "sensor", "value"])
            self.assertEqual(entry["Index"], [])
            self.assertEqual(len(entry["Preview"]), 20)
            self.assertEqual(
                entry["Preview"][:2],
                [
                    {"time": "2026-01-01T00:00:00", "sensor": self.frame.sensor[0], "value": None},
                    {
                        "time": "2026-01-01T00:00:01",
                        "sensor": self.frame.sensor[1],
                        "value": self.frame.value[1],
                    },
                ],
            )

    def test_indexIsTheSameWithEitherEngine(self) -> None:
        """Row numbers from partitions are not written; an unnamed index with data is "index"."""
        source = (
            "def hot(df):\n    return df[df.value > 25]\n\n\n"
            "def summary(df):\n    return df.value.describe()\n"
        )
        expected_hot = self.frame[self.frame.value > 25].reset_index(drop=True)
        for engine in loader.ENGINES:
            results = self.run_job(source, job="job-" + engine, engine=engine)["Results"]
            self.assertEqual(results["hot"]["Index"], [])
            hot = pd.read_parquet(os.path.join(self.directory, results["hot"]["File"]))
            pd.testing.assert_frame_equal(hot, expected_hot, check_dtype=False)
            self.assertEqual(results["summary"]["Index"], ["index"])
            self.assertEqual(
                results["summary"]["Preview"][0],
                {"index": "count", "value": float(self.frame.value.count())},
            )
            summary = pd.read_parquet(os.path.join(self.directory, results["summary"]["File"]))
            self.assertEqual(summary.index.name, "index")

    def test_scalarsAreValuesInTheAnswer(self) -> None:
        """A single value goes into the answer as plain JSON, and nothing is written for it."""
        source = """
            def latest(df):
                return df.time.max()

            def nothing(df):
                return df.value.sum() * float("nan")

            def label(df):
                return "s1"

            def hot(df):
                return (df.value > 30).any()

            def readings(df):
                return df.value.count()
        """
        answer = self.run_job(source)
        self.assertEqual(
            answer,
            {
                "Type": "Done",
                "Results": {
                    "latest": {"Kind": "Scalar", "Value": "2026-01-01T01:06:39"},
                    "nothing": {"Kind": "Scalar", "Value": None},
                    "label": {"Kind": "Scalar", "Value": "s1"},
                    "hot": {"Kind": "Scalar", "Value": True},
                    "readings": {"Kind": "Scalar", "Value": 3995},
                },
            },
        )
        self.assertFalse(os.path.exists(os.path.join(self.directory, "results", "job")))

    def test_processesCarryTheJobsMark(self) -> None:
        """A process a formula starts sees the job's id in MEASURING_JOB."""
        source = """
            import subprocess
            import sys

            def mark(df):
                code = "import os; print(os.environ['MEASURING_JOB'], end='')"
                run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
                return run.stdout
        """
        answer = self.run_job(source, job="job-7")
        self.assertEqual(answer["Results"]["mark"], {"Kind": "Scalar", "Value": "job-7"})

    def test_runAgainReplacesTheResults(self) -> None:
        """A job run again replaces its results folder whole, and leaves no temporary folder."""
        results = os.path.join(self.directory, "results")
        self.run_job()
        # What a run cut short while writing, or while replacing, leaves behind.
        os.makedirs(os.path.join(results, ".job.partial", "half"))
        os.makedirs(os.path.join(results, ".job.old", "stale"))
        answer = self.run_job(functions=("mean_by_sensor",))
        self.assertEqual(
            answer["Results"]["mean_by_sensor"]["File"], "results/job/mean_by_sensor.parquet"
        )
        self.assertEqual(os.listdir(results), ["job"])
        self.assertEqual(os.listdir(os.path.join(results, "job")), ["mean_by_sensor.parquet"])

    def test_functionsNarrowTheJob(self) -> None:
        """Only the formulas Functions names run, and only their results are written."""
        answer = self.run_job(functions=("hourly", "count"))
        self.assertEqual(list(answer["Results"]), ["hourly", "count"])
        self.assertEqual(
            os.listdir(os.path.join(self.directory, "results", "job")), ["hourly.parquet"]
        )

    def test_csvAndJsonOutputs(self) -> None:
        """Output csv and json write files that pandas reads back to the same numbers."""
        expected = self.frame.groupby("sensor").value.mean()
        for output in ["csv", "json"]:
            entry = self.run_job(job=output, output=output, functions=("mean_by_sensor",))[
                "Results"
            ]["mean_by_sensor"]
            self.assertEqual(entry["File"], f"results/{output}/mean_by_sensor.{output}")
            written = self.read(entry).set_index("sensor").value.sort_index()
            pd.testing.assert_series_equal(written, expected, check_index_type=False, obj=output)

    def test_errors(self) -> None:
        """Each way a job goes wrong answers an Error whose Code and Message say what and where."""
        notes = os.path.join(self.directory, "notes.parquet")
        with open(notes, "w") as f:
            f.write("not parquet\n")
        explode = (
            "def _explode(part):\n    raise ValueError('bad reading')\n\n\n"
            "def broken(df):\n    return df.map_partitions(_explode, meta=df._meta)\n"
        )
        cases: list[tuple[str, dict[str, Any], str, list[str]]] = [
            ("def broken(df:\n    pass\n", {}, "JobFailed", ["work.py line 1", "SyntaxError"]),
            (
                "import math\nLIMIT = math.sqrt(-1)\n",
                {},
                "JobFailed",
                ["importing work.py", "ValueError: math domain error", "work.py line 2"],
            ),
            (
                "def ratio(df):\n    scale = 0\n    return 1 / scale\n",
                {},
                "JobFailed",
                ["formula 'ratio'", "ZeroDivisionError: division by zero", "work.py line 3"],
            ),
            (explode, {}, "JobFailed", ["broken", "ValueError: bad reading", "work.py line 2"]),
            (
                "def leave(df):\n    raise SystemExit(3)\n",
                {},
                "JobFailed",
                ["formula 'leave'", "sys.exit(3)", "work.py line 2"],
            ),
            (
                "def pair(df):\n    return [df.value.max(), 1]\n",
                {},
                "JobFailed",
                ["formula 'pair' returned a list", "a DataFrame, a Series or a single value"],
            ),
            (
                "def named(df):\n    return {'peak': 1}\n",
                {},
                "JobFailed",
                ["formula 'named' returned a dict", "a DataFrame, a Series or a single value"],
            ),
            ("def _private(df):\n    pass\n", {}, "JobFailed", ["work.py defines no formulas"]),
            (
                FORMULAS,
                {"functions": ("peak", "nope")},
                "NotFound",
                ["'nope'", "its formulas: mean_by_sensor, peak, hourly, count"],
            ),
            (FORMULAS, {"base": notes}, "JobFailed", ["cannot read notes.parquet as Parquet"]),
        ]
        for number, (source, fields, code, words) in enumerate(cases):
            answer = self.run_job(source, job=f"job-{number}", **fields)
            self.assertEqual(self.error(answer)[0], code, answer)
            for word in words:
                self.assertIn(word, self.error(answer)[1])
        self.assertFalse(os.path.exists(os.path.join(self.directory, "results")))

    def test_tracebackGoesToTheLog(self) -> None:
        """A formula's traceback is printed on stderr, which is the job's log."""
        self.run_job("def ratio(df):\n    scale = 0\n    return 1 / scale\n")
        log = self.stderr.getvalue()
        self.assertIn("Traceback", log)
        self.assertIn(f'File "{self.directory}/work.py", line 3, in ratio', log)
        self.assertIn("ZeroDivisionError: division by zero", log)

    def test_failedWriteLeavesNothing(self) -> None:
        """When a result cannot be written the job fails and no file, whole or partial, remains."""
        source = """
            import pandas as pd

            def good(df):
                return df.groupby("sensor").value.mean()

            def bad(df):
                return pd.DataFrame({"mixed": pd.Series([1, "a"], dtype=object)})
        """
        code, message = self.error(self.run_job(source))
        self.assertEqual(code, "JobFailed")
        self.assertIn(f"writing the results to {self.directory}/results failed", message)
        self.assertEqual(os.listdir(os.path.join(self.directory, "results")), [])
