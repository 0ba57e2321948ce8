"""
The project as a user installs it: a wheel, in a fresh virtual environment, with its plugin.

These tests need the repository (setup.cfg beside the package) and, for the wheel, the package
index or pip's cache. They take a minute: building, creating a venv, installing the dependencies.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from measuring.local import PACKAGE_ROOT

REPOSITORY = PACKAGE_ROOT
_PATTERNS = shutil.ignore_patterns(
    ".git", "_trial_temp*", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", "venv",
    ".venv",
)  # fmt: skip


def ignored(folder: str, names: list[str]) -> set[str]:
    """
    What the build tree leaves out of ``folder``: version control, build and test leftovers, and
    virtual environments (``venv/``, ``.venv/``, and any folder holding a ``pyvenv.cfg``).
    """
    environments = {
        name for name in names if os.path.isfile(os.path.join(folder, name, "pyvenv.cfg"))
    }
    return set(_PATTERNS(folder, names)) | environments


def _repository() -> str:
    if not os.path.exists(os.path.join(REPOSITORY, "setup.cfg")):
        raise SkipTest(f"measuring was imported from {REPOSITORY}, not from its repository")
    return REPOSITORY


def _run(*command: str, cwd: str | None = None, timeout: float = 600) -> str:
    result = subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )
    if result.returncode != 0:
        output = result.stdout + result.stderr
        raise AssertionError(f"{' '.join(command)} exited with {result.returncode}:\n{output}")
    return result.stdout


class LayoutTests(SynchronousTestCase):
    """The repository keeps out of Twisted's own package."""

    def test_noInitUnderTwisted(self) -> None:
        """twisted/ and twisted/plugins/ hold no __init__.py, which would overwrite Twisted's."""
        root = _repository()
        for folder in ("twisted", os.path.join("twisted", "plugins")):
            self.assertFalse(os.path.exists(os.path.join(root, folder, "__init__.py")), folder)

    def test_pluginIsOneLine(self) -> None:
        """The plugin only names measuring.server.tap, so that `twistd --help` stays fast."""
        path = os.path.join(_repository(), "twisted", "plugins", "measuring_plugin.py")
        with open(path) as f:
            lines = [line for line in f.read().splitlines() if line.strip()]
        self.assertEqual(lines[0], "from twisted.application.service import ServiceMaker")
        self.assertTrue(
            lines[1].startswith('measuring = ServiceMaker("measuring", "measuring.server.tap"')
        )
        self.assertEqual(len(lines), 2)


class BuildTreeTests(SynchronousTestCase):
    """The copy of the repository a wheel is built from holds no virtual environment."""

    def test_noVirtualEnvironments(self) -> None:
        """venv/, .venv/ and a folder with pyvenv.cfg are left out; the package is copied."""
        root = os.path.realpath(self.mktemp())
        for folder in ("measuring", "venv/lib", ".venv/lib", "env311/lib", "docs"):
            os.makedirs(os.path.join(root, folder))
        for path in ("measuring/__init__.py", "venv/pyvenv.cfg", "env311/pyvenv.cfg",
                     "docs/pyvenv.cfg.md"):  # fmt: skip
            open(os.path.join(root, path), "w").close()
        copy = os.path.join(self.mktemp(), "copy")
        shutil.copytree(root, copy, ignore=ignored)
        self.assertEqual(sorted(os.listdir(copy)), ["docs", "measuring"])


class WheelTests(SynchronousTestCase):
    """``pip install .`` gives a working ``twistd measuring`` in a fresh environment."""

    def test_freshInstall(self) -> None:
        """A wheel installed in a new venv lists the plugin in `twistd --help` and runs the demo."""
        work = os.path.realpath(self.mktemp())
        source = os.path.join(work, "source")
        shutil.copytree(_repository(), source, ignore=ignored)
        wheels = os.path.join(work, "wheels")
        _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", wheels, source)
        [wheel] = os.listdir(wheels)
        names = zipfile.ZipFile(os.path.join(wheels, wheel)).namelist()
        self.assertIn("twisted/plugins/measuring_plugin.py", names)
        self.assertNotIn("twisted/__init__.py", names)
        self.assertNotIn("twisted/plugins/__init__.py", names)
        # The dashboard's page, script and styles, and the chart library with its licence.
        for name in ("index.html", "login.html", "static/dashboard.js", "static/charts.js",
                     "static/dashboard.css", "static/vendor/uPlot.iife.min.js",
                     "static/vendor/uPlot.min.css", "static/vendor/uPlot.LICENSE"):  # fmt: skip
            self.assertIn(f"measuring/server/web/{name}", names)

        venv = os.path.join(work, "venv")
        _run(sys.executable, "-m", "venv", venv)
        _run(os.path.join(venv, "bin", "pip"), "install", "-q", os.path.join(wheels, wheel))
        usage = _run(os.path.join(venv, "bin", "twistd"), "--help", cwd=work)
        self.assertIn("measuring", usage)

        demo = os.path.join(work, "demo")
        output = _run(
            os.path.join(venv, "bin", "python"), "-m", "measuring.demo", "--folder", demo, cwd=work
        )
        self.assertIn("Server stopped.", output)
        self.assertIn(f"The data, the formulas and the results are in {demo}", output)
        self.assertEqual(len(os.listdir(os.path.join(demo, "results"))), 1)
