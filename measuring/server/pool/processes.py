"""
Finding and ending processes with psutil, for the server side.

Every function here may block (it reads /proc): call it through a thread runner, never on the
reactor thread. Worker processes carry environment variables that mark what they belong to (see
``messages``): ``SERVER_MARK``, the server, and ``WORKER_MARK``, the worker process itself; every
process a formula starts inherits both.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal

import psutil

from measuring.messages import SERVER_MARK, WORKER_MARK

__all__ = [
    "SERVER_MARK",
    "WORKER_MARK",
    "adopt_orphans",
    "end_orphans",
    "kill_marked",
    "kill_tree",
    "marked",
    "tree_rss",
]


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


def kill_tree(pid: int) -> list[int]:
    """SIGKILL every process below ``pid`` (not ``pid`` itself); returns their pids."""
    try:
        below = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []
    for process in below:
        try:
            process.send_signal(signal.SIGKILL)
        except psutil.Error:
            continue
    return [process.pid for process in below]


PR_SET_CHILD_SUBREAPER = 36


def prctl(option: int, value: int) -> None:
    """Linux's ``prctl(option, value)``; OSError when the kernel refuses."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, value, 0, 0, 0) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"prctl({option}, {value}): {os.strerror(error)}")


def adopt_orphans() -> None:
    """
    Make this process a subreaper: a process left behind when its parent (a worker) dies comes
    to this one instead of to init, where ``end_orphans`` finds it.
    """
    if os.uname().sysname == "Linux":
        prctl(PR_SET_CHILD_SUBREAPER, 1)


def end_orphans(known: set[int], worker_command: str) -> list[int]:
    """
    End and reap this process's children that are neither ``known`` (its worker processes) nor
    workers being started (their command line holds ``worker_command``, or is still this
    process's own, between fork and exec): what dead workers left, adopted by this subreaper.
    """
    me = psutil.Process()
    own = me.cmdline()
    ended = []
    for child in me.children():
        try:
            if child.pid in known:
                continue
            if child.status() != psutil.STATUS_ZOMBIE:
                command = child.cmdline()
                if command == own or worker_command in " ".join(command):
                    continue
                child.send_signal(signal.SIGKILL)
        except psutil.Error:
            continue
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(child.pid, 0)
        ended.append(child.pid)
    return ended
