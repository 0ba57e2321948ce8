"""
Finding and ending processes, for the server side: what a previous server left, this one's
orphans, and the subreaper that makes them this one's.

Every function here may block (it reads /proc): call it through a thread runner, never on the
reactor thread. ``kill_marked`` reads every process on the host, once, when the server starts;
everything done per job reads only the job's own process tree (``measuring.procfs``). The
template and every job process carry ``SERVER_MARK`` in their environment (see ``messages``).
"""

from __future__ import annotations

import ctypes
import os
import signal
import time

import psutil

from measuring import procfs
from measuring.messages import SERVER_MARK

__all__ = ["SERVER_MARK", "adopt_orphans", "end_orphans", "kill_marked", "marked", "prctl"]


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


PR_SET_CHILD_SUBREAPER = 36


def prctl(option: int, value: int) -> None:
    """Linux's ``prctl(option, value)``; OSError when the kernel refuses."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, value, 0, 0, 0) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"prctl({option}, {value}): {os.strerror(error)}")


def adopt_orphans() -> None:
    """
    Make this process a subreaper: a process left behind when its parent (a job process) dies
    comes to this one instead of to init, where ``end_orphans`` finds it.
    """
    if os.uname().sysname == "Linux":
        prctl(PR_SET_CHILD_SUBREAPER, 1)


def end_orphans(known: set[int], suspects: set[int] | None) -> tuple[list[int], set[int]]:
    """
    End and reap this process's children that are not ``known`` (the template, and the processes
    the reactor spawned and reaps itself): what dead job processes left, adopted by this
    subreaper. One that has ended is reaped at once; one still running is ended if it was a
    suspect already (found unknown the last time: one seen for the first time may be a process
    the reactor is spawning and has not yet noted), or with ``suspects`` None. Returns the pids
    ended and the suspects for next time. Reads this process's own children only, and never
    waits on one child: the first process of a sandbox's PID namespace ends only once every
    process in it is reaped, and one of those may be a child of this process too.
    """
    ended, unknown, killed = [], set(), set()
    for child in procfs.children(os.getpid()):
        if child in known:
            continue
        if procfs.is_zombie(child):
            if _reap(child):
                ended.append(child)
        elif suspects is None or child in suspects:
            procfs.kill_tree(child, including=True)
            killed.add(child)
        else:
            unknown.add(child)
    deadline = time.monotonic() + REAPING
    while killed and time.monotonic() < deadline:
        for child in procfs.children(os.getpid()):
            ours = child not in known and child not in unknown
            if ours and procfs.is_zombie(child) and _reap(child):
                killed.discard(child)
                ended.append(child)
        time.sleep(0.01)
    return ended, unknown | killed


#: How long ``end_orphans`` reaps what it killed before it leaves the rest for next time.
REAPING = 2.0


def _reap(pid: int) -> bool:
    """Reap child ``pid`` if it has ended; True when it was reaped."""
    try:
        return os.waitpid(pid, os.WNOHANG)[0] == pid
    except ChildProcessError:
        return False
