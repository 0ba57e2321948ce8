"""
What a formula file is said to lack, in the same words wherever it is found out: by the server,
which reads the file with ``ast`` when the job is submitted, or by the worker, which imports it.

A formula is a public (not ``_``-prefixed) top-level function of the file, narrowed by its
``__all__``. Standard library only; imports nothing else of ``measuring`` but the errors.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from measuring.errors import NotFound


def is_public(name: str) -> bool:
    """True for a name that may be a formula's."""
    return not name.startswith("_")


def missing(path: str, name: str, formulas: Iterable[str]) -> NotFound:
    """The error for ``Functions`` naming ``name``, which the file at ``path`` does not define."""
    listed = ", ".join(formulas) or "none"
    return NotFound(
        f"{os.path.basename(path)} has no formula named {name!r} (its formulas: {listed})"
    )


def none_defined(path: str) -> str:
    """What to say of a file that defines no formulas."""
    return (
        f"{os.path.basename(path)} defines no formulas: a formula is a public top-level function "
        f"that takes the dataset"
    )


def syntax_error(path: str, error: SyntaxError) -> str:
    """A formula file's syntax error in one line: ``work.py line 3: SyntaxError: ...``."""
    return f"{os.path.basename(path)} line {error.lineno}: {type(error).__name__}: {error.msg}"
