"""
Finding and ending processes with psutil, for the server side.

Every function here may block (it reads /proc): call it through a thread runner, never on the
reactor thread. Worker processes carry environment variables that mark what they belong to (see
``messages``): ``SERVER_MARK``, the server, and ``WORKER_MARK``, the worker process itself; every
process a formula starts inherits both.
"""

from __future__ import annotations

import os
import signal

import psutil

from measuring.messages import SERVER_MARK, WORKER_MARK

__all__ = ["SERVER_MARK", "WORKER_MARK", "kill_marked", "marked", "tree_rss"]


def tree_rss(pid: int) -> int:
    """Resident memory of ``pid`` and every process below it, in bytes (0 when it is gone)."""
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for process in processes:
        try:
            total += process.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total


def marked(name: str, value: str) -> list[psutil.Process]:
    """The processes of this user whose environment has ``name=value`` (never this one)."""
    found = []
    for process in psutil.process_iter():
        if process.pid == os.getpid():
            continue
        try:
            if process.environ().get(name) == value:
                found.append(process)
        except (psutil.Error, OSError):
            continue
    return found


def kill_marked(name: str, value: str) -> list[int]:
    """SIGKILL every process whose environment has ``name=value``; returns their pids."""
    killed = []
    for process in marked(name, value):
        try:
            process.send_signal(signal.SIGKILL)
            killed.append(process.pid)
        except psutil.Error:
            continue
    return killed
