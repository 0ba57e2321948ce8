"""
The import rules of the three runtimes, checked rather than hoped for.

- ``measuring.worker`` never imports twisted or ``measuring.server``;
- ``measuring.client`` never imports twisted, ``measuring.server``, ``measuring.worker`` or dask,
  and imports pandas or pyarrow only inside the functions that hand back tables;
- the shared modules (``wire``, ``errors``, ``messages``, ``files``, ``tables``) import nothing
  from the runtimes;
- nothing but ``measuring.server`` imports ``measuring.server``.

Every ``import`` statement of every module is read (those inside functions too), and importing
each runtime in a fresh interpreter is checked for what it really loads.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

import measuring

PACKAGE = os.path.dirname(measuring.__file__)
SHARED = ("wire", "errors", "messages", "files", "tables", "formulas")


def _modules(folder: str) -> dict[str, str]:
    """Every module below ``folder`` of the package, by dotted name, to its path."""
    found = {}
    for where, folders, names in os.walk(os.path.join(PACKAGE, folder)):
        folders[:] = [name for name in folders if name not in ("__pycache__", "test")]
        for name in names:
            if name.endswith(".py"):
                relative = os.path.relpath(os.path.join(where, name), os.path.dirname(PACKAGE))
                dotted = relative[: -len(".py")].replace(os.sep, ".").removesuffix(".__init__")
                found[dotted] = os.path.join(where, name)
    return found


def _imports(path: str, top_level_only: bool = False) -> set[str]:
    """The modules a file imports, by absolute dotted name."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    names: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _forbidden(imported: set[str], prefixes: tuple[str, ...]) -> list[str]:
    return sorted(
        name
        for name in imported
        for prefix in prefixes
        if name == prefix or name.startswith(f"{prefix}.")
    )


def _loaded_by(module: str) -> set[str]:
    """The top-level packages a fresh interpreter holds after ``import module``."""
    program = (
        f"import json, sys; import {module}; "
        "print(json.dumps(sorted({name.split('.')[0] for name in sys.modules})))"
    )
    output = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    return set(json.loads(output))


class ImportRuleTests(SynchronousTestCase):
    """No runtime imports what it may not."""

    def assertNone(self, modules: dict[str, str], prefixes: tuple[str, ...], top: bool = False):
        for name, path in modules.items():
            bad = _forbidden(_imports(path, top), prefixes)
            self.assertEqual(bad, [], f"{name} imports {bad}")

    def test_worker(self) -> None:
        """Nothing in measuring.worker imports twisted, the server or the client."""
        modules = _modules("worker")
        self.assertIn("measuring.worker.job", modules)
        self.assertNone(modules, ("twisted", "measuring.server", "measuring.client"))

    def test_client(self) -> None:
        """measuring.client imports neither twisted nor the server, worker or dask anywhere."""
        modules = _modules("client")
        self.assertIn("measuring.client.cli", modules)
        self.assertNone(
            modules, ("twisted", "measuring.server", "measuring.worker", "dask", "distributed")
        )

    def test_clientTopLevel(self) -> None:
        """The client's modules import pandas, numpy and pyarrow only inside functions."""
        self.assertNone(_modules("client"), ("pandas", "numpy", "pyarrow"), top=True)

    def test_shared(self) -> None:
        """The shared modules import no runtime, and nothing outside the standard library."""
        for name in SHARED:
            path = os.path.join(PACKAGE, f"{name}.py")
            bad = _forbidden(
                _imports(path),
                ("twisted", "measuring.server", "measuring.worker", "measuring.client", "dask"),
            )
            self.assertEqual(bad, [], f"measuring.{name} imports {bad}")
            top = _forbidden(_imports(path, True), ("pandas", "numpy", "pyarrow", "psutil"))
            self.assertEqual(top, [], f"measuring.{name} imports {top} when imported")

    def test_serverOnlyFromServer(self) -> None:
        """Only measuring.server (and its tap's plugin) imports measuring.server."""
        outside = {
            name: path
            for name, path in _modules("").items()
            if not name.startswith("measuring.server")
        }
        # local.py starts the server as a subprocess: it never imports it.
        self.assertNone(outside, ("measuring.server",))


class LoadedModulesTests(SynchronousTestCase):
    """What importing each runtime really loads, in a fresh interpreter."""

    def test_client(self) -> None:
        """Importing the client loads no twisted, dask, pandas, numpy or pyarrow."""
        loaded = _loaded_by("measuring.client")
        self.assertEqual(loaded & {"twisted", "dask", "pandas", "numpy", "pyarrow"}, set())

    def test_worker(self) -> None:
        """Importing the worker's job module loads no twisted."""
        self.assertNotIn("twisted", _loaded_by("measuring.worker.job"))

    def test_server(self) -> None:
        """The server's wiring loads dask.utils at most: never pandas, numpy or pyarrow."""
        loaded = _loaded_by("measuring.server.tap")
        self.assertEqual(loaded & {"pandas", "numpy", "pyarrow", "fastparquet"}, set())


class VocabularyTests(SynchronousTestCase):
    """Every runtime's names for the protocol's Codes are the ones ``wire`` declares."""

    def test_codes(self) -> None:
        """The server's error types and the client's exceptions are one per Code of wire."""
        from measuring import client, errors, wire

        self.assertEqual(list(errors.ERRORS), list(wire.CODES))
        self.assertEqual(sorted(client.ERRORS), sorted(wire.CODES))

    def test_documented(self) -> None:
        """docs/protocol.md has a row for every Code."""
        from measuring import wire
        from measuring.local import PACKAGE_ROOT

        path = os.path.join(PACKAGE_ROOT, "docs", "protocol.md")
        if not os.path.exists(path):
            self.skipTest("measuring was not imported from its repository")
        with open(path, encoding="utf-8") as f:
            text = f.read()
        for code in wire.CODES:
            self.assertIn(f"| `{code}` |", text, code)
