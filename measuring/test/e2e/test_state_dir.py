"""
End to end, the server's own files: what a server that died left in ``<state>/tmp`` is removed at
the next start.

Each test starts the real ``twistd -n measuring`` (``support.ServerTestCase``).
"""

from __future__ import annotations

import os

from measuring.test.support import ServerTestCase


class StartSweepTests(ServerTestCase):
    """The start removes what earlier servers left in the workers' temporary folder."""

    def test_leftoverFoldersRemoved(self) -> None:
        """Job folders, warm-up folders and outboxes left in <state>/tmp are gone after a start."""
        tmp = os.path.join(self.folder, ".measuring", "tmp")
        left = ["job-20260101-000000-abcdef", "measuring-warm-k2j4h1", "worker-0123abcd"]
        for name in left:
            os.makedirs(os.path.join(tmp, name))
            with open(os.path.join(tmp, name, "warm.parquet"), "wb") as f:
                f.write(b"left by a server that was killed")
        kept = os.path.join(tmp, "not-ours")
        os.makedirs(kept)
        server = self.start()
        server.wait_until_ready()
        self.wait_for(
            lambda: not any(os.path.exists(os.path.join(tmp, name)) for name in left),
            lambda: f"the leftovers to go (still there: {sorted(os.listdir(tmp))})",
        )
        self.assertTrue(os.path.isdir(kept), "a folder the server did not make was removed")
