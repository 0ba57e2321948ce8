"""The code stays as the project's checks want it: ruff (lint and format) and mypy are clean."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from measuring.local import PACKAGE_ROOT


class CheckTests(SynchronousTestCase):
    """Each check runs from the repository root, with the project's own configuration."""

    def check(self, tool: str, *arguments: str) -> None:
        if not os.path.exists(os.path.join(PACKAGE_ROOT, "setup.cfg")):
            raise SkipTest(f"measuring was imported from {PACKAGE_ROOT}, not its repository")
        if importlib.util.find_spec(tool) is None:
            raise SkipTest(f"{tool} is not installed (pip install '.[test]')")
        result = subprocess.run(
            [sys.executable, "-m", tool, *arguments],
            cwd=PACKAGE_ROOT,
            capture_output=True,
            text=True,
            timeout=600,
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)

    def test_ruffLint(self) -> None:
        """ruff finds nothing to say about the code."""
        self.check("ruff", "check", "measuring", "twisted")

    def test_ruffFormat(self) -> None:
        """The code is formatted as ruff formats it."""
        self.check("ruff", "format", "--check", "measuring", "twisted")

    def test_mypy(self) -> None:
        """mypy (configured in setup.cfg) finds no type error."""
        self.check("mypy")
