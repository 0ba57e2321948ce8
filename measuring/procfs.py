"""
A process tree read from Linux's /proc, without reading every process on the host.

``children`` reads ``/proc/PID/task/*/children`` (the kernel's own list of a process's children),
so walking a job's tree costs a few small reads per process in it, whatever else runs on the
machine. Shared by the server (its memory watch, ending a job's tree, reaping orphans) and the
job processes (ending what their formulas left). Standard library only; every function may block
briefly (it reads /proc), and a process that ends meanwhile is simply not there.
"""

from __future__ import annotations

import contextlib
import os
import signal

PAGE = os.sysconf("SC_PAGE_SIZE")
#: The fields of ``/proc/PID/smaps_rollup`` that count memory no other process shares.
PRIVATE_FIELDS = ("Private_Clean:", "Private_Dirty:", "Swap:")


def children(pid: int) -> list[int]:
    """The children of process ``pid`` (all its threads' children), or [] when it has ended."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found.extend(int(child) for child in f.read().split())
        except OSError:
            continue
    return found


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (not ``pid`` itself), parents before their children."""
    found: list[int] = []
    below = children(pid)
    while below:
        found.extend(below)
        below = [grandchild for child in below for grandchild in children(child)]
    return found


def private_memory(pid: int) -> int:
    """
    The memory process ``pid`` holds that no other process shares, in bytes (resident or
    swapped; 0 when it has ended): what ending it would give back. A job process forked from the
    template shares the template's pages until it writes to them; those are not counted.
    """
    total = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith(PRIVATE_FIELDS):
                    total += int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return 0
    return total


def tree_memory(pid: int) -> int:
    """The private memory of ``pid`` and of every process below it, in bytes."""
    return sum(private_memory(process) for process in [pid, *descendants(pid)])


def is_zombie(pid: int) -> bool:
    """True when ``pid`` has ended and waits for its parent to reap it (or is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return True


def kill_tree(pid: int, including: bool = False) -> list[int]:
    """
    SIGKILL every process below ``pid`` (and ``pid`` itself with ``including``); returns their
    pids. Each is stopped as soon as it is found, so that none forks past the walk.
    """
    found = [pid] if including else []
    below = children(pid)
    while below:
        for process in below:
            with contextlib.suppress(OSError):
                os.kill(process, signal.SIGSTOP)
        found.extend(below)
        below = [grandchild for child in below for grandchild in children(child)]
    for process in found:
        with contextlib.suppress(OSError):
            os.kill(process, signal.SIGKILL)
    return found
