"""
The settings are declared once (``settings.SETTINGS``): twistd's options, the keys of the TOML
file, the ``Config`` and README's option table all say the same, with the same defaults.
"""

from __future__ import annotations

import dataclasses
import os
import re

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from measuring.local import PACKAGE_ROOT
from measuring.server import config, tap
from measuring.server.settings import BY_NAME, SETTINGS

# Settings that become something else in the Config: the token file's contents, too.
CONFIG_ONLY = {"tokens"}
RENAMED = {"port": "ports", "data-root": "data_roots"}


def _readme_options() -> dict[str, str]:
    """README's option table: each ``--name`` to its default column, backticks removed."""
    path = os.path.join(PACKAGE_ROOT, "README.md")
    if not os.path.exists(path):
        raise SkipTest(f"measuring was imported from {PACKAGE_ROOT}, not from its repository")
    rows = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            match = re.match(r"\| `--([a-z-]+)[^`]*` \|.*\| (.*) \|$", line.rstrip("\n"))
            if match:
                rows[match.group(1)] = match.group(2).replace("`", "")
    return rows


def _usage_options() -> dict[str, str]:
    """``twistd measuring --help``: each ``--name`` to the default it shows."""
    shown = {}
    for line in tap.Options().getUsage(width=10_000).splitlines():
        match = re.match(r"\s+--([a-z-]+)=?\s+(.*)$", line)
        if match:
            default = re.search(r"\[default: (.*)\]$", match.group(2))
            shown[match.group(1)] = default.group(1) if default else ""
    return shown


class DeclarationTests(SynchronousTestCase):
    """One declaration per setting, and everything else agrees with it."""

    def test_readme(self) -> None:
        """README's table lists exactly the declared settings (and --config), same defaults."""
        readme = _readme_options()
        self.assertEqual(sorted(readme), sorted([*BY_NAME, "config"]))
        for setting in SETTINGS:
            self.assertEqual(readme[setting.name], setting.shown, setting.name)

    def test_help(self) -> None:
        """--help lists exactly the declared settings (and twistd's own), same defaults."""
        usage = _usage_options()
        self.assertEqual(sorted(set(usage) - {"config", "help", "version"}), sorted(BY_NAME))
        for setting in SETTINGS:
            self.assertEqual(usage[setting.name], setting.shown, setting.name)

    def test_config(self) -> None:
        """Every declared setting is a field of Config, and every field is a setting."""
        fields = {field.name for field in dataclasses.fields(config.Config)}
        declared = {RENAMED.get(s.name, s.attribute) for s in SETTINGS}
        self.assertEqual(fields - CONFIG_ONLY, declared)

    def test_fileKeys(self) -> None:
        """The TOML file takes exactly the declared settings as keys."""
        self.assertEqual(set(config._PARSERS), set(BY_NAME))

    def test_defaultsParse(self) -> None:
        """Every default is a value its own parser accepts unchanged (where it is one)."""
        for setting in SETTINGS:
            default = setting.default_for({}, "/srv")
            if default is not None:
                self.assertEqual(setting.parse(default), default, setting.name)
