"""
Data roots on object storage (``measuring.storage``) against a real S3-compatible server: moto's
server mode (``moto_server``), started by the tests on a loopback port, with the standard AWS
settings in the environment (``AWS_ENDPOINT_URL`` and test credentials). Never a mock of s3fs.

The storage layer only: results published under a temporary prefix, then in place, complete or not
at all, and read back with pandas; what an unfinished job left, and old results, removed
(``unit/test_storage`` checks which URLs a request may name, ``test_storage_jobs`` the server).
"""

from __future__ import annotations

import os
import time
from typing import Any

import pandas as pd
from twisted.trial.unittest import SynchronousTestCase

from measuring import files, storage
from measuring.server.jobs import retention
from measuring.test.support.storage import ROOT, moto


class PublishTests(SynchronousTestCase):
    """Results uploaded under a temporary prefix, then published; read back with pandas."""

    def setUp(self) -> None:
        self.moto = moto()
        self.local = os.path.realpath(self.mktemp())
        os.makedirs(os.path.join(self.local, "big"))
        self.frame = pd.DataFrame({"sensor": ["a", "b"], "value": [1.5, 2.5]})
        self.frame.to_parquet(os.path.join(self.local, "means.parquet"))
        for n in range(2):
            self.frame.to_parquet(os.path.join(self.local, "big", f"part.{n:05d}.parquet"))
        self.directory = f"{ROOT}/site-{time.monotonic_ns()}"

    def test_published(self) -> None:
        """Every file appears under results/<job>/, pandas reads it, no partial prefix is left."""
        published = storage.publish(self.local, self.directory, "job1")
        self.assertEqual(
            sorted(published),
            [f"{self.directory}/results/job1/{name}" for name in
             ("big/part.00000.parquet", "big/part.00001.parquet", "means.parquet")],
        )  # fmt: skip
        pd.testing.assert_frame_equal(
            pd.read_parquet(f"{self.directory}/results/job1/means.parquet"), self.frame
        )
        self.assertEqual(len(pd.read_parquet(f"{self.directory}/results/job1/big")), 4)
        fs = storage.filesystem(self.directory)
        fs.invalidate_cache()
        self.assertFalse(fs.exists(storage.partial_prefix(self.directory, "job1")))

    def test_runAgainReplaces(self) -> None:
        """A job run again replaces what its earlier run published."""
        storage.publish(self.local, self.directory, "job1")
        os.remove(os.path.join(self.local, "means.parquet"))
        storage.publish(self.local, self.directory, "job1")
        fs = storage.filesystem(self.directory)
        fs.invalidate_cache()
        self.assertFalse(fs.exists(f"{self.directory}/results/job1/means.parquet"))

    def test_failedUploadLeavesNothing(self) -> None:
        """An upload that fails midway leaves neither the partial prefix nor the results."""
        unreadable = os.path.join(self.local, "zz-broken.parquet")
        os.symlink(os.path.join(self.local, "missing"), unreadable)
        self.assertRaises(OSError, storage.publish, self.local, self.directory, "job2")
        fs = storage.filesystem(self.directory)
        fs.invalidate_cache()
        found: list[Any] = fs.find(self.directory)
        self.assertEqual(found, [])

    def test_unfinishedRemoved(self) -> None:
        """What an interrupted job uploaded is removed, as for a folder (``remove_partial``)."""
        fs = storage.filesystem(self.directory)
        fs.pipe_file(f"{storage.partial_prefix(self.directory, 'job3')}/means.parquet", b"PAR1")
        files.remove_partial(self.directory, "job3")
        fs.invalidate_cache()
        self.assertEqual(fs.find(self.directory), [])

    def test_killedWhilePublishingRemoved(self) -> None:
        """
        A job killed while it copied its results into place (no ``except`` runs) leaves some of
        them under results/<job>/: the server's removal of what it left takes those too.
        """
        fs = storage.filesystem(self.directory)
        for prefix in (storage.partial_prefix, storage.result_prefix):
            fs.pipe_file(f"{prefix(self.directory, 'job5')}/big/part.00000.parquet", b"PAR1")
        storage.publish(self.local, self.directory, "job6")  # another job's results stay
        files.remove_partial(self.directory, "job5")
        fs.invalidate_cache()
        kept = fs.find(f"{self.directory}/results/job6")
        self.assertEqual((fs.find(self.directory), len(kept)), (kept, 3))

    def test_retention(self) -> None:
        """--keep-results removes a job's published results on object storage."""
        storage.publish(self.local, self.directory, "job4")
        retention.remove_results(self.directory, "job4")
        fs = storage.filesystem(self.directory)
        fs.invalidate_cache()
        self.assertEqual(fs.find(self.directory), [])
