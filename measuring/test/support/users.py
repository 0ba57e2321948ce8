"""
Running the server as another user from a test run as root: which folders that user can reach,
and a Python they can run with this one's packages. Plain Python; no reactor here.

This Python may live where others cannot go (pyenv under /root). Then the system's Python of
the same version gets a virtual environment of its own, readable by all, whose one ``.pth`` file
names this Python's site-packages: the same packages (built for the same CPython version), run
by an interpreter the other user can start.
"""

from __future__ import annotations

import os
import site
import subprocess
import sys

from twisted.trial.unittest import SkipTest, SynchronousTestCase


def reachable(path: str) -> bool:
    """Whether any user may pass through every folder down to ``path``, and read ``path``."""
    path = os.path.realpath(path)
    if not os.stat(path).st_mode & 0o004:
        return False
    while path != os.path.dirname(path):
        path = os.path.dirname(path)
        if not os.stat(path).st_mode & 0o001:
            return False
    return True


def _packages() -> list[str]:
    return [path for path in site.getsitepackages() if os.path.isdir(path)]


def python_for_others(case: SynchronousTestCase) -> str:
    """A Python with this one's packages that any user can run; skips the test if none can be."""
    if all(reachable(path) for path in [sys.executable, sys.base_prefix, *_packages()]):
        return sys.executable
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    system = os.path.join("/usr/bin", version)
    if not os.path.exists(system) or not reachable(system):
        raise SkipTest(f"this Python is not readable by other users, and there is no {system}")
    unreachable = [path for path in _packages() if not reachable(path)]
    if unreachable:
        raise SkipTest(f"other users cannot read this Python's packages in {unreachable[0]}")
    folder = os.path.realpath(case.mktemp())
    os.makedirs(folder)
    os.chmod(os.path.dirname(folder), 0o755)  # trial's folder for the test is 0700
    made = subprocess.run(
        [system, "-m", "venv", "--without-pip", os.path.join(folder, "venv")],
        capture_output=True,
        text=True,
    )
    if made.returncode != 0:
        raise SkipTest(f"cannot make a virtual environment with {system}: {made.stderr}")
    packages = os.path.join(folder, "venv", "lib", version, "site-packages")
    with open(os.path.join(packages, "measuring-test.pth"), "w") as f:
        f.write("".join(path + "\n" for path in _packages()))
    return os.path.join(folder, "venv", "bin", "python")
