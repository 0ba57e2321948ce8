"""
A Dask request's files checked before its job is queued: paths resolved inside the data roots,
Base a Parquet file or a folder of Parquet files, File valid Python whose formulas include those
``Functions`` names, so that a mistake is answered at once instead of failing the job later.

The formula file is read with ``ast``, never imported: nothing here runs a client's code. Where
``ast`` cannot tell (a name bound by an assignment, a computed ``__all__``, ``globals()``), the
job goes ahead and the worker decides, as it always did. On object storage the same checks go
through fsspec (``measuring.storage``), and a formula file's source is read here, for the job to
carry. Every function here may block (it reads the file system or the storage): the dispatcher
runs it in the server's threads, never on the reactor. Standard library only (fsspec inside
``measuring.storage``).
"""

from __future__ import annotations

import ast
import importlib.util
import os
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import IO, Any

from measuring import files, storage
from measuring import formulas as words
from measuring.errors import BadRequest
from measuring.server.paths import JobPaths, resolve_job

#: A formula file larger than this is left to the worker (reading it here would cost too much).
MAX_FORMULA_BYTES = 8 * 2**20
#: The data files of a Base folder whose first bytes are checked.
MOST_PARTS = 64
PARQUET = b"PAR1"
#: Names that, called or read anywhere in a file, may bind module names ``ast`` cannot see.
DYNAMIC = frozenset({"globals", "vars", "locals", "exec", "eval", "setattr", "__import__"})
#: What a file that is not Parquet looks like, by its first bytes.
MAGIC = (
    (b"\x1f\x8b", "gzip-compressed data"),
    (b"PK\x03\x04", "a ZIP archive, such as an Excel workbook"),
    (b"ARROW1", "an Arrow IPC (Feather) file"),
    (b"\x89HDF\r\n\x1a\n", "an HDF5 file"),
    (b"SQLite format 3\x00", "an SQLite database"),
    (b"ORC", "an ORC file"),
    (b"Obj\x01", "an Avro file"),
    (b"\xd0\xcf\x11\xe0", "an old Excel or Office file"),
)

# ``warnings.catch_warnings`` changes process-wide state: one check at a time changes it.
_quiet = threading.Lock()


def check_job(
    roots: tuple[str, ...],
    directory: str,
    base: str,
    file: str,
    functions: tuple[str, ...] | None,
    private: tuple[str, ...] = (),
) -> JobPaths:
    """
    The job's real paths, once its files are checked; raises Forbidden, NotFound or BadRequest
    naming the field and what to fix.
    """
    paths = resolve_job(roots, directory, base, file, private)
    if storage.is_url(paths.directory):
        return check_stored(paths, base, functions)
    check_dataset(paths.base, base)
    if paths.file is not None:  # None: formulas sent as Code (``check_code``)
        check_formulas(paths.file, functions)
    return paths


def check_stored(paths: JobPaths, base: str, functions: tuple[str, ...] | None) -> JobPaths:
    """
    ``check_job``'s checks for a job on object storage, through fsspec; the paths, with the
    formula file's source read (the job carries it as Code).
    """
    fs = storage.filesystem(paths.directory)
    check_dataset(paths.base, base, fs)
    if paths.file is None:
        return paths
    name = paths.file.rpartition("/")[2]
    try:
        if fs.size(paths.file) > MAX_FORMULA_BYTES:
            raise BadRequest(
                f"File {name} is larger than {MAX_FORMULA_BYTES} bytes, the most a formula "
                f"file on object storage may be"
            )
        data = fs.cat_file(paths.file)
    except OSError as e:
        raise BadRequest(f"File {name} cannot be read: {e.strerror or e}") from None
    _judged(outline_source(data, name), name, functions)
    return replace(paths, source=importlib.util.decode_source(data))


# -- the dataset


def check_dataset(path: str, name: str, fs: Any = None) -> None:
    """
    BadRequest unless ``path`` is a Parquet file or a folder holding Parquet files (on the
    fsspec file system ``fs``, when given).
    """
    is_dir, opener = (os.path.isdir, open) if fs is None else (fs.isdir, fs.open)
    if not is_dir(path):
        _check_parquet(path, name, opener)
        return
    parts = files.data_files(path) if fs is None else storage.data_files(fs, path)
    if not parts:
        raise BadRequest(f"Base {name!r} is a folder that holds no Parquet files")
    for part in parts[:MOST_PARTS]:
        _check_parquet(part, f"{name.rstrip('/')}/{part[len(path) + 1 :]}", opener)


def _check_parquet(path: str, name: str, opener: Callable[[str, str], IO[bytes]] = open) -> None:
    try:
        with opener(path, "rb") as f:
            head = f.read(4096)
            size = f.seek(0, os.SEEK_END)
            f.seek(max(size - len(PARQUET), 0))
            tail = f.read(len(PARQUET))
    except OSError as e:
        why = e.strerror or str(e)
        raise BadRequest(f"Base {name!r} cannot be read by the server: {why}") from None
    if not head.startswith(PARQUET):
        raise BadRequest(f"{name} is not a Parquet file ({looks_like(head)})")
    if tail != PARQUET or size < 2 * len(PARQUET):
        raise BadRequest(
            f"{name} is not a whole Parquet file: it has no Parquet footer (was it cut short?)"
        )


def looks_like(head: bytes) -> str:
    """What the first bytes of a file that is not Parquet say it is, in words."""
    if not head:
        return "it is empty"
    for magic, what in MAGIC:
        if head.startswith(magic):
            return f"it looks like {what}"
    text = _text(head)
    if text is None:
        return f"it starts with the bytes {head[:4].hex(' ')}, not PAR1"
    stripped = text.lstrip()
    if stripped.startswith(("{", "[")):
        return "it looks like JSON text"
    lines = [line for line in text.splitlines()[:8] if line.strip()]
    for separator in (",", ";", "\t", "|"):
        counts = {line.count(separator) for line in lines[:-1] or lines}
        if len(counts) == 1 and counts != {0}:
            return "it looks like CSV text"
    return "it looks like text"


def _text(head: bytes) -> str | None:
    """``head`` as text, when it is UTF-8 (perhaps cut inside a character) without control bytes."""
    head = head.removeprefix(b"\xef\xbb\xbf")
    for cut in range(4):
        try:
            text = head[: len(head) - cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
        printable = all(c.isprintable() or c in "\t\r\n\f" for c in text)
        return text if printable else None
    return None


# -- the formula file


@dataclass
class Outline:
    """What ``ast`` can tell of a formula file's module without running it."""

    #: Public top-level functions, undecorated, in the order they are defined.
    defined: list[str] = field(default_factory=list)
    #: Other public names bound at top level, which may hold a function of the file.
    bound: set[str] = field(default_factory=set)
    #: The names of a literal ``__all__``; None when it has none or ``ast`` cannot tell.
    exported: tuple[str, ...] | None = None
    #: True when the module may bind names ``ast`` cannot see (``globals()``, ``import *``...).
    dynamic: bool = False
    #: True when ``__all__`` is set in some other way than once, to a literal list of strings.
    computed_all: bool = False

    def formulas(self) -> list[str]:
        """The formulas that are certainly there."""
        return [name for name in self.defined if self.exports(name)]

    def exports(self, name: str) -> bool:
        return self.exported is None or name in self.exported

    def lacks(self, name: str) -> bool:
        """True when the module certainly has no formula ``name``."""
        if not words.is_public(name) or not self.exports(name):
            return True
        return not self.dynamic and name not in self.defined and name not in self.bound

    def has_none(self) -> bool:
        """True when the module certainly defines no formula."""
        if self.dynamic or self.computed_all:
            return False
        return not any(self.exports(name) for name in [*self.defined, *self.bound])


def check_formulas(path: str, functions: tuple[str, ...] | None) -> Outline | None:
    """
    BadRequest for a formula file with a syntax error or, certainly, no formula; NotFound for a
    name of ``functions`` it certainly lacks. Returns what ``ast`` told (None: left to the worker).
    """
    return _judged(outline_file(path), path, functions)


def check_code(code: str, name: str, functions: tuple[str, ...] | None) -> Outline | None:
    """``check_formulas`` for formulas sent as Code, in the words used for a file ``name``."""
    return _judged(outline_source(code.encode("utf-8"), name), name, functions)


def _judged(
    outline: Outline | None, path: str, functions: tuple[str, ...] | None
) -> Outline | None:
    if outline is None:
        return None
    if functions is None and outline.has_none():
        raise BadRequest(words.none_defined(path))
    for name in functions or ():
        if outline.lacks(name):
            raise words.missing(path, name, outline.formulas())
    return outline


def outline_file(path: str) -> Outline | None:
    """The file's Outline; BadRequest when it is not Python; None when too large or too deep."""
    try:
        if os.path.getsize(path) > MAX_FORMULA_BYTES:
            return None
        with open(path, "rb") as f:
            data = f.read(MAX_FORMULA_BYTES + 1)
    except OSError as e:
        raise BadRequest(f"File {os.path.basename(path)} cannot be read: {e.strerror}") from None
    return outline_source(data, path)


def outline_source(data: bytes, path: str) -> Outline | None:
    """The Outline of Python source ``data`` read from ``path`` (its name, in messages)."""
    try:
        source = importlib.util.decode_source(data)
        with _quiet, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tree = ast.parse(source, path)
            compile(tree, path, "exec", dont_inherit=True)  # what only the compiler refuses
    except SyntaxError as e:
        raise BadRequest(words.syntax_error(path, e)) from None
    except (UnicodeDecodeError, ValueError) as e:
        raise BadRequest(f"{os.path.basename(path)} is not Python source: {e}") from None
    except (RecursionError, MemoryError):
        return None
    return outline(tree)


def outline(tree: ast.Module) -> Outline:
    """What a parsed module defines at its top level, and whether ``ast`` can be sure of it."""
    found = Outline()
    all_bindings = 0
    for statement in _top_level(tree.body):
        if isinstance(statement, ast.FunctionDef | ast.AsyncFunctionDef):
            if words.is_public(statement.name):
                if statement.decorator_list:
                    found.bound.add(statement.name)
                elif statement.name not in found.defined:
                    found.defined.append(statement.name)
        elif isinstance(statement, ast.ImportFrom) and any(a.name == "*" for a in statement.names):
            found.dynamic = True
        for node in _this_scope(statement):
            if isinstance(node, ast.Name) and node.id == "__all__":
                all_bindings += 1
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store | ast.Del):
                found.bound.add(node.id)
    for node in ast.walk(tree):
        if isinstance(node, ast.Global):
            found.bound.update(node.names)  # a function may bind them when the module runs
            all_bindings += 2 * ("__all__" in node.names)
        elif (isinstance(node, ast.Name) and node.id in DYNAMIC) or (
            isinstance(node, ast.Attribute) and node.attr in ("modules", "__dict__")
        ):
            found.dynamic = True
    found.bound = {name for name in found.bound if words.is_public(name)}
    if all_bindings:
        found.exported = _literal_all(tree) if all_bindings == 1 else None
        found.computed_all = found.exported is None
    return found


def _top_level(body: list[ast.stmt]) -> Iterator[ast.stmt]:
    """The statements run at module level: the body, and those inside if, try, with and loops."""
    for statement in body:
        yield statement
        if isinstance(statement, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            continue
        for name in ("body", "orelse", "finalbody"):
            yield from _top_level(getattr(statement, name, []))
        for handler in getattr(statement, "handlers", []):
            yield from _top_level(handler.body)
        for case in getattr(statement, "cases", []):
            yield from _top_level(case.body)


def _this_scope(statement: ast.stmt) -> Iterator[ast.AST]:
    """The nodes of one top-level statement in the module's own scope (not in nested bodies)."""
    if isinstance(statement, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
        yield from statement.decorator_list
        return
    stack: list[ast.AST] = []
    for name, value in ast.iter_fields(statement):
        if name not in ("body", "orelse", "finalbody", "handlers", "cases"):
            values = value if isinstance(value, list) else [value]
            stack += [item for item in values if isinstance(item, ast.AST)]
    while stack:
        node = stack.pop()
        yield node
        if not isinstance(node, ast.Lambda):
            stack.extend(ast.iter_child_nodes(node))


def _literal_all(tree: ast.Module) -> tuple[str, ...] | None:
    """The names of ``__all__ = [...]`` at the module's top level, when all are literal strings."""
    for statement in tree.body:
        if isinstance(statement, ast.Assign) and len(statement.targets) == 1:
            target, value = statement.targets[0], statement.value
        elif isinstance(statement, ast.AnnAssign) and statement.value is not None:
            target, value = statement.target, statement.value
        else:
            continue
        if not (isinstance(target, ast.Name) and target.id == "__all__"):
            continue
        if not isinstance(value, ast.List | ast.Tuple):
            return None
        names = [
            item.value
            for item in value.elts
            if isinstance(item, ast.Constant) and isinstance(item.value, str)
        ]
        return tuple(names) if len(names) == len(value.elts) else None
    return None
