"""
Data roots on object storage (``measuring.storage``) against a real S3-compatible server: moto's
server mode (``moto_server``), started by the tests on a loopback port, with the standard AWS
settings in the environment (``AWS_ENDPOINT_URL`` and test credentials). Never a mock of s3fs.

The storage layer only: results published under a temporary prefix, then in place, complete or not
at all, and read back with pandas (``unit/test_storage`` checks which URLs a request may name).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any

import pandas as pd
from twisted.trial.unittest import SynchronousTestCase

from measuring import storage
from measuring.test.support import closed_port
from measuring.test.support.cluster import die_with_parent, shared, wait_for

ROOT = "s3://plant/data"


class MotoServer:
    """``moto_server`` on a free loopback port; the AWS settings that reach it."""

    def __init__(self) -> None:
        self.port = closed_port()
        self.environment = {
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.port}",
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        beside = os.path.join(os.path.dirname(sys.executable), "moto_server")
        self.process = subprocess.Popen(
            [beside, "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=die_with_parent,
        )
        os.environ.update(self.environment)
        wait_for(self._answers, "moto's server to answer", 30)
        storage.filesystem(ROOT).mkdir("plant")

    def _answers(self) -> bool:
        import urllib.request

        try:
            urllib.request.urlopen(self.environment["AWS_ENDPOINT_URL"], timeout=1).close()
        except OSError:
            return False
        return True

    def end(self) -> None:
        self.process.terminate()
        self.process.wait(10)
        for name in self.environment:
            os.environ.pop(name, None)


class PublishTests(SynchronousTestCase):
    """Results uploaded under a temporary prefix, then published; read back with pandas."""

    def setUp(self) -> None:
        self.moto = shared.get("moto", MotoServer, MotoServer.end)
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
