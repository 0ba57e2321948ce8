"""
The operators' documentation says what the server does when something runs out or breaks, and
what formulas can do to the server: docs/deploy.md's "Operations" section and the warnings of
README.md and docs/deploy.md, checked against the commands and settings they name.
"""

from __future__ import annotations

import os
import re

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from measuring.local import PACKAGE_ROOT
from measuring.server.settings import BY_NAME

#: The subsections of Operations, in order.
OPERATIONS = [
    "A full state directory",
    "A damaged job database",
    "File descriptors",
    "Connections",
    "Privileges",
    "Processes a job leaves behind",
]


def _read(name: str) -> str:
    path = os.path.join(PACKAGE_ROOT, name)
    if not os.path.exists(path):
        raise SkipTest(f"measuring was imported from {PACKAGE_ROOT}, not from its repository")
    with open(path, encoding="utf-8") as f:
        return f.read()


def _section(text: str, title: str, level: str = "##") -> str:
    """The text of the section ``title`` (up to the next one of its level)."""
    found = re.search(rf"^{level} {re.escape(title)}\n(.*?)(?=^{level} |\Z)", text, re.S | re.M)
    assert found is not None, f"no section {title!r}"
    return found.group(1)


class OperationsTests(SynchronousTestCase):
    """docs/deploy.md, Operations."""

    def test_subsections(self) -> None:
        """Operations has its subsections, in order."""
        operations = _section(_read("docs/deploy.md"), "Operations")
        self.assertEqual(re.findall(r"^### (.*)$", operations, re.M), OPERATIONS)

    def test_namesWhatExists(self) -> None:
        """The settings and the command it names exist."""
        operations = _section(_read("docs/deploy.md"), "Operations")
        for flag in set(re.findall(r"`--([a-z-]+)", operations)) - {"uid", "gid", "sandbox"}:
            self.assertIn(flag, BY_NAME, flag)
        self.assertIn("measuring-admin recover", operations)
        self.assertIn("measuring-admin = measuring.server.admin:run", _read("setup.cfg"))


class WarningTests(SynchronousTestCase):
    """What a formula can do to the server without a sandbox is said where users look."""

    def test_signalAndDataRoots(self) -> None:
        """README and docs/deploy.md say a formula can signal the server and write the data."""
        for name in ("README.md", "docs/deploy.md"):
            text = _read(name)
            self.assertIn("signal", text, name)
            self.assertRegex(text, r"(?s)write[^.]*every data root", name)
            self.assertIn("--sandbox bwrap", text, name)
