"""
Tests for ``measuring.worker``'s ``run_job`` run in this process (``support.WorkerTestCase``):
from a Job message to the answer and the result files, for both engines, and every way a job
goes wrong.

What needs a real worker process (Ready, crashes, the job's log file) is tested with the pool.
"""

from __future__ import annotations

import os
from typing import Any

import pandas as pd

from measuring import wire
from measuring.test.support import FORMULA_NAMES, FORMULAS, WorkerTestCase


class RunJobTests(WorkerTestCase):
    """``run_job`` turns a Job message into result files and a Done answer, for both engines."""

    def test_resultsMatchPandas(self) -> None:
        """The files and values of FORMULAS hold the numbers pandas computes on the same data."""
        expected = {
            "mean_by_sensor": ("sensor", self.frame.groupby("sensor").value.mean()),
            "hourly": ("time", self.frame.set_index("time").value.resample("1h").mean()),
        }
        for engine in wire.ENGINES:
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
        for engine in wire.ENGINES:
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
        for engine in wire.ENGINES:
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
        self.assertFalse(os.path.exists(os.path.join(self.directory, "results")))
