"""
Which paths a request may name inside a data root on object storage (``measuring.storage``):
checked by their text, nothing outside the root's prefix.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from measuring import files, storage
from measuring.errors import BadRequest, Forbidden
from measuring.messages import STORAGE_MARK
from measuring.server.paths import resolve_job

ROOT = "s3://plant/data"


class ResolveTests(SynchronousTestCase):
    """What a request may name inside an object-storage root: by its text, nothing outside."""

    roots = ("/srv/data", ROOT)

    def test_roots(self) -> None:
        """A root URL is made plain; other schemes and '..' parts are refused."""
        self.assertEqual(storage.parse_root("s3://plant/data/"), ROOT)
        for bad in ("gs://plant/data", "s3://", "s3://plant/../x", "s3://plant//x"):
            self.assertRaises(ValueError, storage.parse_root, bad)

    def test_inside(self) -> None:
        """Relative names go below the Directory (or the first URL root); URLs are checked."""
        self.assertEqual(storage.resolve(self.roots, "Directory", "site"), f"{ROOT}/site")
        directory = f"{ROOT}/site"
        self.assertEqual(
            storage.resolve(self.roots, "Base", "series.parquet", directory),
            f"{ROOT}/site/series.parquet",
        )
        self.assertEqual(storage.resolve(self.roots, "Directory", f"{ROOT}/a/"), f"{ROOT}/a")

    def test_outside(self) -> None:
        """'..', another bucket, a sibling prefix, or leaving the Directory are Forbidden."""
        directory = f"{ROOT}/site"
        for field, name, within in [
            ("Directory", "../other", None),
            ("Directory", "s3://other/data", None),
            ("Directory", "s3://plant/database", None),
            ("Base", "../elsewhere.parquet", directory),
            ("Base", f"{ROOT}/other/x.parquet", directory),
            ("Base", "a/./b", directory),
        ]:
            self.assertRaises(Forbidden, storage.resolve, self.roots, field, name, within)
        self.assertRaises(BadRequest, storage.resolve, self.roots, "Base", "", directory)


class JobPathsTests(SynchronousTestCase):
    """A Dask request's paths on object storage, refused before any storage is reached."""

    def test_noStorageRoot(self) -> None:
        """A URL Directory on a server without an object-storage root is Forbidden."""
        error = self.assertRaises(
            Forbidden, resolve_job, ("/srv/data",), f"{ROOT}/site", "series.parquet", "work.py"
        )
        self.assertIn("outside the data roots of this server (/srv/data)", error.message)

    def test_relativeBelowFirstRoot(self) -> None:
        """A relative Directory goes below the first root when it is a URL; '..' is Forbidden."""
        error = self.assertRaises(
            Forbidden, resolve_job, (ROOT, "/srv/data"), "../x", "series.parquet", "work.py"
        )
        self.assertIn("Directory '../x' must be a plain path", error.message)


class NamesTests(SynchronousTestCase):
    """What a job on object storage is told and given, by the URL's text alone."""

    def test_resultEntry(self) -> None:
        """A result on object storage is named by its URL; a local one relative to Directory."""
        self.assertEqual(
            files.result_entry(f"{ROOT}/site", "j1", "means", "parquet"),
            f"{ROOT}/site/results/j1/means.parquet",
        )
        self.assertEqual(
            files.result_entry("/srv/data/site", "j1", "means", "csv"), "results/j1/means.csv"
        )

    def test_prefixes(self) -> None:
        """Results are uploaded under results/.<job>.partial, published under results/<job>."""
        self.assertEqual(
            storage.partial_prefix(f"{ROOT}/site", "j1"), f"{ROOT}/site/results/.j1.partial"
        )
        self.assertEqual(storage.result_prefix(f"{ROOT}/site", "j1"), f"{ROOT}/site/results/j1")

    def test_workerEnvironment(self) -> None:
        """With a root on object storage the workers get the AWS_* settings (only); else none."""
        environ = {"AWS_ACCESS_KEY_ID": "k", "HOME": "/root", "MEASURING_TOKEN": "t"}
        self.assertEqual(
            storage.worker_environment(("/srv/data", ROOT), environ),
            {"AWS_ACCESS_KEY_ID": "k", STORAGE_MARK: "1"},
        )
        self.assertEqual(storage.worker_environment(("/srv/data",), environ), {})
