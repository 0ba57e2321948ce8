"""
Tests for ``measuring.server.submission``: a Dask request's formula file read with ``ast`` (never
imported) and its Base checked to be Parquet, before any job is created; and the dispatcher
running those checks through its blocking-call runner, so that a slow disk holds up no other
request.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from measuring.errors import BadRequest, MeasuringError, NotFound
from measuring.server import submission
from measuring.server.dispatch import Dispatcher
from measuring.test.support import sample_frame, write_dataset, write_formulas, write_parts
from measuring.test.support.fakes import HeldRunner
from measuring.test.unit.test_dispatch import Harness


class FormulaFileTests(SynchronousTestCase):
    """What ``ast`` tells of a formula file, and what it leaves to the worker."""

    def check(self, source: str, functions: tuple[str, ...] | None = None) -> Any:
        """``check_formulas`` on a file ``work.py`` holding ``source``."""
        folder = self.mktemp()
        os.makedirs(folder)
        return submission.check_formulas(write_formulas(folder, source), functions)

    def refused(
        self, source: str, functions: tuple[str, ...] | None, error: type[MeasuringError]
    ) -> str:
        """The message of the ``error`` ``check`` raises."""
        raised = self.assertRaises(error, self.check, source, functions)
        return raised.message

    def test_misspelledFormula(self) -> None:
        """A name the file does not define is NotFound, listing the formulas it has."""
        source = "def hourly_mean(df):\n    return 1\n\ndef peak(df):\n    return 2\n"
        self.assertEqual(
            self.refused(source, ("hourly_maen",), NotFound),
            "work.py has no formula named 'hourly_maen' (its formulas: hourly_mean, peak)",
        )
        self.assertIsNotNone(self.check(source, ("peak", "hourly_mean")))

    def test_privateOrNotExported(self) -> None:
        """A private function, or one a literal ``__all__`` leaves out, is no formula."""
        source = "__all__ = ['a']\n\ndef a(df): pass\n\ndef b(df): pass\n\ndef _c(df): pass\n"
        for name in ("b", "_c"):
            self.assertIn("(its formulas: a)", self.refused(source, (name,), NotFound))

    def test_syntaxError(self) -> None:
        """A syntax error is BadRequest naming the line, found by the parser or the compiler."""
        self.assertEqual(
            self.refused("def a(df):\n    return (\n", None, BadRequest)[:22],
            "work.py line 2: Syntax",
        )
        self.assertEqual(
            self.refused("def a(df):\n    pass\n\nreturn 3\n", None, BadRequest),
            "work.py line 4: SyntaxError: 'return' outside function",
        )

    def test_noFormulas(self) -> None:
        """A file with nothing that can be a formula is BadRequest when it names none."""
        message = self.refused("import os\n\ndef _helper(df): pass\n", None, BadRequest)
        self.assertIn("work.py defines no formulas", message)

    def test_leftToTheWorker(self) -> None:
        """Where ``ast`` cannot tell (an assignment, a computed __all__...), nothing is refused."""
        for source in [
            "import functools\n\npeak = functools.partial(max)\n",
            "__all__ = [name for name in dir() if name.startswith('p')]\n\ndef peak(df): pass\n",
            "from statistics import *\n",
            "globals()['peak'] = lambda df: 1\n",
            "def _make():\n    global peak\n    def peak(df): pass\n\n_make()\n",
            "import functools\n\n@functools.cache\ndef peak(df): pass\n",
        ]:
            self.check(source, ("peak",))
        self.assertIsNone(self.check("def a(df): pass\n\nx = 1" + " + 1" * 200_000))

    def test_neverRunsTheFile(self) -> None:
        """The file is parsed, not run: its top-level code has no effect."""
        folder = os.path.realpath(self.mktemp())
        os.makedirs(folder)
        marker = os.path.join(folder, "ran")
        source = f"open({marker!r}, 'w').close()\n\ndef a(df): pass\n"
        submission.check_formulas(write_formulas(folder, source), ("a",))
        self.assertFalse(os.path.exists(marker))

    def test_notText(self) -> None:
        """A file that is not UTF-8 Python source is BadRequest."""
        folder = self.mktemp()
        os.makedirs(folder)
        path = os.path.join(folder, "work.py")
        with open(path, "wb") as f:
            f.write(b"def a(df):\n    return '\xff\xfe'\n")
        raised = self.assertRaises(BadRequest, submission.check_formulas, path, None)
        self.assertIn("work.py", raised.message)


class DatasetTests(SynchronousTestCase):
    """Base is a Parquet file, or a folder of them; anything else says what it looks like."""

    def setUp(self) -> None:
        self.folder = os.path.realpath(self.mktemp())
        os.makedirs(self.folder)

    def write(self, name: str, data: bytes) -> str:
        path = os.path.join(self.folder, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def refused(self, path: str, name: str) -> str:
        raised = self.assertRaises(BadRequest, submission.check_dataset, path, name)
        return raised.message

    def test_parquet(self) -> None:
        """A Parquet file, and a folder of Parquet parts (with _ and . files beside), pass."""
        submission.check_dataset(write_dataset(self.folder, "one.parquet"), "one.parquet")
        parts = write_parts(self.folder, "parts")
        self.write("parts/_SUCCESS", b"")
        self.write("parts/.part.0.parquet.crc", b"crc")
        submission.check_dataset(parts, "parts")

    def test_csv(self) -> None:
        """A CSV file given as Base is named, with what it looks like."""
        path = os.path.join(self.folder, "time_series.csv")
        sample_frame(20).to_csv(path, index=False)
        self.assertEqual(
            self.refused(path, "time_series.csv"),
            "time_series.csv is not a Parquet file (it looks like CSV text)",
        )

    def test_otherFiles(self) -> None:
        """JSON, an empty file, a gzip file and binary noise each read as what they are."""
        for name, data, words in [
            ("a.json", b'[{"a": 1}]', "it looks like JSON text"),
            ("b.parquet", b"", "it is empty"),
            ("c.gz", b"\x1f\x8b\x08\x00rest", "it looks like gzip-compressed data"),
            ("d.bin", b"\x00\x01\x02\x03\x04", "00 01 02 03, not PAR1"),
            ("e.txt", "température\n".encode(), "it looks like text"),
        ]:
            message = self.refused(self.write(name, data), name)
            self.assertTrue(message.startswith(f"{name} is not a Parquet file ("), message)
            self.assertIn(words, message)

    def test_cutShort(self) -> None:
        """A Parquet file without its footer is refused as cut short."""
        with open(write_dataset(self.folder, "whole.parquet"), "rb") as f:
            data = f.read()
        path = self.write("cut.parquet", data[: len(data) // 2])
        self.assertIn("cut short", self.refused(path, "cut.parquet"))

    def test_folders(self) -> None:
        """An empty folder, or one with a CSV among its parts, is refused naming the file."""
        os.makedirs(os.path.join(self.folder, "empty", "_temporary"))
        self.assertEqual(
            self.refused(os.path.join(self.folder, "empty"), "empty"),
            "Base 'empty' is a folder that holds no Parquet files",
        )
        parts = write_parts(self.folder, "mixed")
        self.write("mixed/day=2/readings.csv", b"a,b\n1,2\n")
        self.assertEqual(
            self.refused(parts, "mixed"),
            "mixed/day=2/readings.csv is not a Parquet file (it looks like CSV text)",
        )


class SubmissionDispatchTests(SynchronousTestCase):
    """The dispatcher checks a Dask request's files through its runner, before any job exists."""

    def setUp(self) -> None:
        self.root = os.path.realpath(self.mktemp())
        write_parts(self.root)
        write_formulas(self.root)
        self.harness = Harness(self, (self.root,))

    def ask(self, dispatcher: Dispatcher, request: dict[str, Any]) -> defer.Deferred[Any]:
        return dispatcher.handle(request, lambda line: None)

    def dask(self, **fields: Any) -> dict[str, Any]:
        return {
            "Header": "Dask",
            "Request": {"Directory": ".", "Base": "data.parquet", "File": "work.py", **fields},
        }

    def assertNoJob(self) -> None:
        self.assertEqual(self.harness.pool.runs, [])
        self.assertEqual(self.successResultOf(self.harness.queries.recent(None, 10)), [])

    def test_mistakesRefusedWithoutJob(self) -> None:
        """A misspelled formula, a CSV Base, a syntax error: refused, and no job is recorded."""
        sample_frame(5).to_csv(os.path.join(self.root, "time_series.csv"), index=False)
        write_formulas(self.root, "def a(df):\n    return (\n", "broken.py")
        cases: list[tuple[dict[str, Any], str, str]] = [
            ({"Functions": ["hourly_maen"]}, "NotFound", "no formula named 'hourly_maen'"),
            ({"Base": "time_series.csv"}, "BadRequest", "time_series.csv is not a Parquet file"),
            ({"File": "broken.py"}, "BadRequest", "broken.py line 2: SyntaxError"),
        ]
        for fields, code, message in cases:
            answer = self.successResultOf(
                self.ask(self.harness.dispatcher, self.dask(Async=True, **fields))
            )
            self.assertEqual((answer["Status"], answer["Error"]["Code"]), ("Error", code))
            self.assertIn(message, answer["Error"]["Message"])
            self.assertNotIn("Job", answer)
        self.assertNoJob()

    def test_slowCheckHoldsUpNothing(self) -> None:
        """While a Dask request's paths are resolved, Status is answered; then the job runs."""
        runner, checked = HeldRunner(), []

        def slow_check(*arguments: Any) -> Any:
            checked.append(arguments)
            return submission.check_job(*arguments)

        harness = self.harness
        dispatcher = Dispatcher(
            harness.info, harness.jobs, harness.queries, harness.stats, (self.root,),
            blocking=runner, check=slow_check,
        )  # fmt: skip
        submitted = self.ask(dispatcher, self.dask(Async=True))
        self.assertNoResult(submitted)
        self.assertEqual(checked, [], "the paths were resolved in the caller's thread")
        status = self.ask(dispatcher, {"Header": "Info", "Request": "Status"})
        self.assertEqual(self.successResultOf(status)["Status"], "OK")
        self.assertEqual(harness.pool.runs, [])

        runner.release()
        self.assertEqual(len(checked), 1)
        answer = self.successResultOf(submitted)
        self.assertEqual(answer["Status"], "Accepted")
        self.assertEqual([run.message["Job"] for run in harness.pool.runs], [answer["Job"]])
