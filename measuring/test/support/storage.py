"""
A real S3-compatible server on loopback for the object-storage tests: moto's server mode
(``moto_server``), started by the tests on a free port, with the standard AWS settings that reach
it put in this process's environment (and so in the servers the tests start). One for the whole
test run (``shared``). Never a mock of s3fs. Plain blocking subprocesses: no reactor here.
"""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request

from measuring import storage
from measuring.test.support.cluster import die_with_parent, shared, wait_for
from measuring.test.support.system import closed_port

BUCKET = "plant"
ROOT = f"s3://{BUCKET}/data"


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
        storage.filesystem(ROOT).mkdir(BUCKET)

    def _answers(self) -> bool:
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


def moto() -> MotoServer:
    """The test run's moto server, started on first use."""
    return shared.get("moto", MotoServer, MotoServer.end)
