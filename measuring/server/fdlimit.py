"""
File descriptors: enough for ``--max-connections`` and everything else the server keeps open.

Each connection takes a descriptor; so do the job database and its lock, the listening sockets,
the pipes to every worker process (a busy and a warm one per ``--workers``), and the files read
for Result pages. ``fit`` raises this process's soft ``RLIMIT_NOFILE`` toward its hard limit as
far as that needs; when even the hard limit cannot hold it, a ``--max-connections`` the user gave
is refused (``ValueError`` saying what to do) and the default one is lowered, saying so. Plain
Python; ``ProcessFileLimit`` is the one part with a side effect.
"""

from __future__ import annotations

import resource
from typing import Protocol

#: Descriptors kept apart from connections: the server's own files and sockets, the reactor's,
#: the database's (file, WAL, shared memory, lock), Result pages being read, /proc reads, and
#: refused connections between their Busy line and their close.
RESERVE = 128
#: Descriptors per worker process: its pipes, and more while one is started.
PER_WORKER = 8


class FileLimit(Protocol):
    """This process's ``RLIMIT_NOFILE``: read it, change it."""

    def get(self) -> tuple[int, int]: ...

    def set(self, soft: int, hard: int) -> None: ...


class ProcessFileLimit:
    """The real ``RLIMIT_NOFILE`` of this process."""

    def get(self) -> tuple[int, int]:
        return resource.getrlimit(resource.RLIMIT_NOFILE)

    def set(self, soft: int, hard: int) -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def reserve(workers: int) -> int:
    """Descriptors the server needs besides its connections, with ``workers``."""
    return RESERVE + PER_WORKER * 2 * workers


def fit(connections: int, workers: int, given: bool, limit: FileLimit) -> tuple[int, str | None]:
    """
    Make room for ``connections`` (``--max-connections``, ``given`` by the user or not) and the
    reserve; returns the connections the server may take, and a line to log when that is fewer.
    Raises ValueError, saying what to change, when a ``given`` value cannot be held.
    """
    soft, hard = limit.get()
    unlimited = hard == resource.RLIM_INFINITY
    needed = connections + reserve(workers)
    if soft != resource.RLIM_INFINITY and soft < needed:
        limit.set(needed if unlimited else min(needed, hard), hard)
    if unlimited or hard >= needed:
        return connections, None
    most = hard - reserve(workers)
    why = (
        f"{connections} connections need {needed} file descriptors ({reserve(workers)} kept for "
        f"{workers} workers' processes, the job database and the server's own files), and this "
        f"process may open {hard} at most (its hard RLIMIT_NOFILE)"
    )
    if given or most < 1:
        fix = f"or set --max-connections {most} or fewer" if most >= 1 else "or fewer --workers"
        raise ValueError(
            f"{why}: raise the limit (LimitNOFILE= in the systemd unit, ulimit -n) {fix}"
        )
    return most, f"--max-connections lowered from {connections} to {most}: {why}"
