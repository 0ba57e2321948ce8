"""
``WorkerTestCase``: a Directory for running ``measuring.worker`` in this process, and cleanups
that undo what a job changes in it. No worker process, no reactor.
"""

from __future__ import annotations

import io
import os
import sys
import tempfile
from typing import Any

import pandas as pd
from twisted.trial.unittest import SynchronousTestCase

from measuring.messages import Message
from measuring.server import paths as data_paths
from measuring.server.jobs.scheduler import JobSpec
from measuring.test.support.data import sample_frame, write_dataset, write_formulas
from measuring.test.support.formulas import FORMULAS
from measuring.worker import job as worker_job


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
        paths = data_paths.JobPaths(self.directory, base or self.base, self.formulas(source))
        return worker_job.run_job(JobSpec(paths, functions, output, engine).message(job))

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
