"""
Tests for formulas sent with a Dask request (``"Code"`` and ``"Name"`` instead of ``"File"``):
what the dispatcher accepts, what the job carries to its worker and keeps on record, and what it
refuses, with which message.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from measuring.server.jobs.records import Job
from measuring.test.support import write_formulas, write_parts
from measuring.test.unit.test_dispatch import Harness

CODE = "def peak(df):\n    return df.value.max()\n"


class CodeTests(SynchronousTestCase):
    """Dask requests carrying their formulas as Code."""

    def setUp(self) -> None:
        self.root = os.path.realpath(self.mktemp())
        write_parts(os.path.join(self.root, "site"))
        write_formulas(os.path.join(self.root, "site"))
        self.harness = Harness(self, (self.root,))

    def dask(self, request: dict[str, Any]) -> dict[str, Any]:
        answer: dict[str, Any] = self.successResultOf(
            self.harness.dispatcher.handle({"Header": "Dask", "Request": request}, lambda _: None)
        )
        return answer

    def code(self, **fields: Any) -> dict[str, Any]:
        """The answer to an Async Dask request on ``site`` with Code, changed by ``fields``."""
        return self.dask(
            {"Directory": "site", "Base": "data.parquet", "Code": CODE, "Async": True, **fields}
        )

    def assertRefused(self, fields: dict[str, Any], *words: str) -> None:
        """The request with File work.py and ``fields`` is BadRequest saying ``words``."""
        request = {"Directory": "site", "Base": "data.parquet", "File": "work.py", **fields}
        answer = self.dask(request)
        self.assertEqual(answer["Error"]["Code"], "BadRequest", fields)
        for word in words:
            self.assertIn(word, answer["Error"]["Message"])

    def test_jobCarriesTheCode(self) -> None:
        """The job's message carries the Code and its Name, and no File."""
        self.code(Name="mine.py", Functions=["peak"])
        message = self.harness.pool.runs[0].message
        self.assertEqual(
            {key: message[key] for key in ("File", "Code", "Name", "Functions")},
            {"File": None, "Code": CODE, "Name": "mine.py", "Functions": ["peak"]},
        )

    def test_defaultName(self) -> None:
        """Without a Name the formulas are called formulas.py in messages."""
        self.code()
        self.assertEqual(self.harness.pool.runs[0].message["Name"], "formulas.py")

    def test_kept(self) -> None:
        """A job of Code is recorded with it, so that it can run again after a restart."""
        self.code(Name="mine.py")
        job = self.harness.pool.runs[0].job
        status = self.successResultOf(self.harness.queries.status(job))
        self.assertEqual((status["File"], status["Name"]), (None, "mine.py"))
        record = self.harness.database.get(job)
        assert record is not None
        spec = Job.from_record(record).spec
        self.assertEqual((spec.code, spec.name, spec.paths.file), (CODE, "mine.py", None))
        self.assertEqual(spec.message(job)["Code"], CODE)

    def test_refused(self) -> None:
        """
        Code and File together, neither, a bad Name or Code, a syntax error, a missing formula:
        refused at once, saying what to fix, in the words used for a file.
        """
        cases: list[tuple[dict[str, Any], list[str]]] = [
            ({"Code": CODE}, ['has both "File" and "Code"']),
            ({"Name": "x.py"}, ['"Name" names formulas sent as "Code"']),
        ]
        for fields, words in cases:
            self.assertRefused(fields, *words)
        refused: list[tuple[dict[str, Any], list[str]]] = [
            ({"Code": 5}, ['"Code" must be a string of Python source, not a number']),
            ({"Code": "x = 1\0"}, ['"Code" must not contain a NUL character']),
            ({"Name": "../work.py"}, ['"Name" must be a file name ending in .py']),
            ({"Name": "work"}, ['"Name" must be a file name ending in .py']),
            ({"Name": ".py"}, ['"Name" must be a file name']),
        ]
        for fields, words in refused:
            answer = self.code(**fields)
            self.assertEqual(answer["Error"]["Code"], "BadRequest", fields)
            for word in words:
                self.assertIn(word, answer["Error"]["Message"])
        answer = self.code(Code="def peak(df):\n    return (\n", Name="mine.py")
        self.assertEqual(answer["Error"]["Code"], "BadRequest", answer)
        self.assertRegex(answer["Error"]["Message"], r"^mine\.py line \d+: SyntaxError")
        answer = self.code(Functions=["nope"], Name="mine.py")
        self.assertEqual(answer["Error"]["Code"], "NotFound", answer)
        self.assertIn("mine.py has no formula named 'nope' (its formulas: peak)",
                      answer["Error"]["Message"])  # fmt: skip
        answer = self.dask({"Directory": "site", "Base": "data.parquet"})
        self.assertIn('has no "File" (a formula file in Directory), nor "Code"',
                      answer["Error"]["Message"])  # fmt: skip
        self.assertEqual(self.harness.pool.runs, [])
