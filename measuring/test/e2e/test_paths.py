"""
Property tests of ``data_paths.resolve_directory`` and ``data_paths.resolve_job``: whatever path a
client sends, through whatever symlinks the data holds, the answer is a refusal (BadRequest,
Forbidden, NotFound) or real paths inside a data root and outside the server's state directory.

The folders, below a temporary ``base``::

    root/             first data root (relative paths start here)
      private/        the server's state directory, inside the root as by default
      private-x/      an ordinary folder whose name starts like the state directory's
      a/  a/b/        folders holding data.parquet (a folder in a/, a file elsewhere) and work.py
    other/b/          second data root
    outside/          no root: what no path may reach
    root-x/           no root either, though its name starts like the first root's

``SymlinkTests`` adds fixed symlinks of every kind (inside, out, into the state directory, to
other links, loops); ``RandomTreeTests`` draws a new set of symlinks for every example.
"""

from __future__ import annotations

import itertools
import os
import shutil

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from measuring.errors import BadRequest, Forbidden, NotFound
from measuring.server import paths as data_paths

#: Folders of the layout; ``root-x`` and ``private-x`` only share a prefix with a root or the state
#: directory, so a check by string prefix would be caught.
FOLDERS = [
    *("root", "root/private", "root/private-x", "root/a", "root/a/b"),
    *("other", "other/b", "outside", "root-x"),
]
LINK_NAMES = ["l1", "l2", "l3", "results"]
#: Where symlinks may point, relative to ``base`` ("nowhere" does not exist).
TARGETS = [
    *FOLDERS,
    ".",
    "root/work.py",
    "root/private/work.py",
    "root/private/data.parquet",
    "root/a/data.parquet",
    "outside/work.py",
    "outside/data.parquet",
    "root/l1",
    "root/a/l2",
    "nowhere",
]
#: Path segments a client may send (repeated ones are drawn more often), and the last segments
#: of a Base and of a File.
SEGMENTS = ["a"] * 3 + ["b"] * 2 + [".", "..", "", "private", "private-x", "root-x", "outside"]
SEGMENTS += LINK_NAMES
ODD_LEAVES = [*LINK_NAMES, "..", "."]
BASE_LEAVES = ["data.parquet"] * 4 + ["work.py", *ODD_LEAVES]
FILE_LEAVES = ["work.py"] * 4 + ["data.parquet", *ODD_LEAVES]
ANCHORS = ["/", "{base}/", "{root}/", "{root}-x/", "{other}/", "{private}/", "{outside}/"]
PROPERTY = settings(max_examples=300, deadline=None, database=None)


@st.composite
def client_paths(draw: st.DrawFn, leaves: list[str] | None = None) -> str:
    """A path as a client might send it: mostly relative, any mix of segments."""
    segments = draw(st.lists(st.sampled_from(SEGMENTS), min_size=leaves is None, max_size=3))
    if leaves is not None:
        segments.append(draw(st.sampled_from(leaves)))
    prefix = draw(st.sampled_from(["", "", "", "", "", *ANCHORS]))
    return prefix + "/".join(segments)


directories = client_paths()
bases = client_paths(BASE_LEAVES)
files = client_paths(FILE_LEAVES)


#: Symlinks as (folder, name, target, absolute target?).
Links = list[tuple[str, str, str, bool]]
links = st.lists(
    st.tuples(
        st.sampled_from(FOLDERS),
        st.sampled_from(LINK_NAMES),
        st.sampled_from(TARGETS),
        st.booleans(),
    ),
    max_size=8,
)


def build(base: str, symlinks: Links) -> None:
    """The folders and files of the module docstring in ``base``, and ``symlinks``."""
    for folder in FOLDERS:
        os.makedirs(os.path.join(base, folder), exist_ok=True)
        for name in ("data.parquet", "work.py"):
            with open(os.path.join(base, folder, name), "w") as f:
                f.write("x = 1\n")
    os.remove(os.path.join(base, "root/a/data.parquet"))
    os.makedirs(os.path.join(base, "root/a/data.parquet"))
    for folder, name, target, absolute in symlinks:
        link = os.path.join(base, folder, name)
        if os.path.lexists(link):
            continue
        to = os.path.join(base, target)
        os.symlink(to if absolute else os.path.relpath(to, os.path.dirname(link)), link)


FIXED_LINKS: Links = [
    ("root", "l1", "root/a", False),  # inside
    ("root", "l2", "outside", False),  # out, relative
    ("root", "l3", "root/private", True),  # into the state directory
    ("root/a", "l1", "root", False),  # up, staying inside
    ("root/a", "l2", "root/l1", False),  # a link to a link
    ("root/a", "l3", "other/b", True),  # into the second root
    ("root", "results", "root/private", False),  # results into the state directory
    ("root/a/b", "l1", "root/private/work.py", False),
    ("root/a/b", "l2", "outside/work.py", True),
    ("root/a/b", "l3", "root/a/b/l3", False),  # a loop
    ("other/b", "results", "outside", True),  # results leading out
    ("root/private", "l1", "root/a", False),
    ("other", "l1", "root/private", True),
    ("other", "l2", "root/a", False),  # from one root into the other
    ("other/b", "l1", "outside/data.parquet", False),
    ("outside", "l1", "root/a", False),  # from outside back in
    ("outside", "l2", "root/l2", True),
]


class PathsTestCase(SynchronousTestCase):
    """Checks that a resolution either refuses or stays where it must."""

    def place(self, base: str) -> None:
        """Note the roots and the state directory of the layout in ``base``."""
        self.base = base
        self.roots = (os.path.join(base, "root"), os.path.join(base, "other"))
        self.private = (os.path.join(base, "root", "private"),)

    def fill(self, path: str) -> str:
        """``path`` with its placeholders replaced by the layout's folders."""
        return path.format(
            base=self.base,
            root=self.roots[0],
            other=self.roots[1],
            private=self.private[0],
            outside=os.path.join(self.base, "outside"),
        )

    def assertAllowed(self, path: str, where: object) -> None:
        """``path`` is absolute, real, inside a data root and outside the state directory."""
        self.assertTrue(os.path.isabs(path), where)
        self.assertEqual(os.path.realpath(path), path, where)
        self.assertTrue(any(os.path.commonpath([path, root]) == root for root in self.roots), where)
        self.assertFalse(
            any(os.path.commonpath([path, folder]) == folder for folder in self.private), where
        )

    def check_directory(self, directory: str) -> None:
        """``resolve_directory`` refuses ``directory`` or gives an allowed, existing folder."""
        directory = self.fill(directory)
        try:
            real = data_paths.resolve_directory(self.roots, directory, self.private)
        except (BadRequest, Forbidden, NotFound):
            return
        self.assertAllowed(real, directory)
        self.assertTrue(os.path.isdir(real), directory)

    def check_job(self, directory: str, base: str, file: str) -> None:
        """``resolve_job`` refuses the three paths or gives allowed ones, Base and File inside."""
        fields = (self.fill(directory), self.fill(base), self.fill(file))
        try:
            paths = data_paths.resolve_job(self.roots, *fields, self.private)
        except (BadRequest, Forbidden, NotFound):
            return
        assert paths.file is not None  # a File was given
        for path in (paths.directory, paths.base, paths.file):
            self.assertAllowed(path, fields)
        for path in (paths.base, paths.file):
            self.assertEqual(os.path.commonpath([path, paths.directory]), paths.directory, fields)
        self.assertTrue(os.path.isdir(paths.directory), fields)
        self.assertTrue(os.path.isfile(paths.file), fields)
        self.assertTrue(os.path.exists(paths.base), fields)


class SymlinkTests(PathsTestCase):
    """Any path through a fixed tree of symlinks of every kind."""

    def setUp(self) -> None:
        base = os.path.realpath(self.mktemp())
        build(base, FIXED_LINKS)
        self.place(base)

    def test_examples(self) -> None:
        """Paths through each kind of link resolve or are refused as a user expects."""
        allowed = [
            ("l1", "data.parquet", "work.py", "root/a"),
            ("a/l2", "data.parquet", "l1/a/work.py", "root/a"),
            ("{other}/l2", "data.parquet", "work.py", "root/a"),
            ("{other}/l2", "l2/data.parquet", "l2/l2/work.py", "root/a"),
            ("{outside}/l1", "data.parquet", "work.py", "root/a"),
        ]
        for directory, base, file, real in allowed:
            paths = data_paths.resolve_job(
                self.roots, self.fill(directory), base, file, self.private
            )
            self.assertEqual(paths.directory, os.path.join(self.base, real))
        refused = [
            ("l2", "data.parquet", "work.py", Forbidden),
            ("l3", "data.parquet", "work.py", Forbidden),
            ("private/l1/../..", "data.parquet", "work.py", Forbidden),
            ("a/b/l3", "data.parquet", "work.py", NotFound),
            ("{other}/b", "data.parquet", "work.py", Forbidden),
            ("{other}/l1", "data.parquet", "work.py", Forbidden),
            ("a/b", "data.parquet", "l1", Forbidden),
            ("a/b", "l2", "work.py", Forbidden),
            ("a/b", "l3", "work.py", NotFound),
            ("{outside}/l2", "data.parquet", "work.py", Forbidden),
            ("a", "l1/private/data.parquet", "work.py", Forbidden),
            ("{other}/l2", "l3/data.parquet", "work.py", Forbidden),
        ]
        for directory, base, file, error in refused:
            self.assertRaises(
                error,
                data_paths.resolve_job,
                self.roots,
                self.fill(directory),
                base,
                file,
                self.private,
            )

    @PROPERTY
    @given(directories)
    def test_directory(self, directory: str) -> None:
        """Any Directory resolves inside a root and outside the state directory, or is refused."""
        self.check_directory(directory)

    @PROPERTY
    @given(directories, bases, files)
    def test_job(self, directory: str, base: str, file: str) -> None:
        """Any Directory, Base and File resolve inside a root, out of the state dir, or refuse."""
        self.check_job(directory, base, file)


class RandomTreeTests(PathsTestCase):
    """Any path through a tree of symlinks drawn for each example."""

    def setUp(self) -> None:
        self.trees = os.path.realpath(self.mktemp())
        os.makedirs(self.trees)
        self.count = itertools.count()

    def tree(self, symlinks: Links) -> None:
        """A fresh layout holding ``symlinks``, removed at the end of the example."""
        base = os.path.join(self.trees, str(next(self.count)))
        build(base, symlinks)
        self.place(base)

    @PROPERTY
    @given(links, directories, bases, files)
    def test_job(self, symlinks: Links, directory: str, base: str, file: str) -> None:
        """Whatever the links, Directory, Base and File stay inside the roots or are refused."""
        self.tree(symlinks)
        try:
            self.check_directory(directory)
            self.check_job(directory, base, file)
        finally:
            shutil.rmtree(self.base)
