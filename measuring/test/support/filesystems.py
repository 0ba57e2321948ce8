"""
Real small file systems for the tests that fill one: a tmpfs mounted for the test (as root), and
a file that takes every byte left on it. Plain Python; no reactor here.
"""

from __future__ import annotations

import errno
import os
import subprocess

from twisted.trial.unittest import SkipTest, SynchronousTestCase


def mount_tmpfs(case: SynchronousTestCase, path: str, size: str) -> str:
    """
    A tmpfs of ``size`` (``8m``) mounted at ``path`` (made), unmounted after the test; skips the
    test, saying why, where this process cannot mount one (not root, no mount namespace rights).
    """
    if os.geteuid() != 0:
        raise SkipTest("mounting a small tmpfs needs root; run the tests as root to fill a disk")
    os.makedirs(path, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", path],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        raise SkipTest(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    # Cleanups run last first: this one after those added later (servers stopping on it).
    case.addCleanup(subprocess.run, ["umount", "-l", path], capture_output=True)
    return path


def fill(folder: str) -> str:
    """Take every byte left on ``folder``'s file system with one file; returns its path."""
    path = os.path.join(folder, "filler")
    chunks = [2**20, 2**16, 2**12, 512, 1]
    with open(path, "wb", buffering=0) as f:
        for chunk in chunks:
            block = b"\0" * chunk
            while True:
                try:
                    f.write(block)
                except OSError as e:
                    if e.errno != errno.ENOSPC:
                        raise
                    break
    return path
