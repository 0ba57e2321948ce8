"""
The guard: a process of its own that ends every job's processes once the server has ended.

``python -P -m measuring.server.pool.guard MARK FOLDER`` (started by ``cgroups.Containment``)
reads its stdin, whose other end only the server holds, until it ends: when the server ends, by
a stop or by SIGKILL, the kernel closes it. Then every cgroup in ``FOLDER`` (the jobs' cgroups,
``-`` for none) is killed and removed, and every process whose environment carries the server's
``MARK`` is killed; the folder goes too. Standard library only; it never imports twisted or
the rest of the server, so that it starts in a moment and holds little.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import sys
import time

from measuring.messages import SERVER_MARK

#: The start of the name of a job's cgroup.
PREFIX = "job-"
#: How long a killed cgroup may take to empty before it is left behind.
EMPTY_WITHIN = 5.0


def kill_group(folder: str, within: float = EMPTY_WITHIN) -> bool:
    """Kill every process in the cgroup ``folder`` and remove it; True once it is gone."""
    with (
        contextlib.suppress(FileNotFoundError),
        open(os.path.join(folder, "cgroup.kill"), "w") as f,
    ):
        f.write("1")
    deadline = time.monotonic() + within
    while True:
        try:
            os.rmdir(folder)
            return True
        except FileNotFoundError:
            return True
        except OSError as e:
            if e.errno != errno.EBUSY or time.monotonic() > deadline:
                return False
        time.sleep(0.01)


def marked(name: str, value: str) -> list[int]:
    """The processes (not this one) whose environment holds ``name=value``, read from /proc."""
    wanted = f"{name}={value}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        with contextlib.suppress(OSError), open(f"/proc/{entry}/environ", "rb") as f:
            if wanted in f.read().split(b"\0"):
                found.append(int(entry))
    return found


def end_everything(mark: str, folder: str | None) -> None:
    """Kill every job cgroup in ``folder`` and every process carrying ``mark``."""
    if folder is not None and os.path.isdir(folder):
        for name in os.listdir(folder):
            if name.startswith(PREFIX):
                kill_group(os.path.join(folder, name))
        with contextlib.suppress(OSError):  # the next server makes it again
            os.rmdir(folder)
    for pid in marked(SERVER_MARK, mark):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def main(argv: list[str]) -> None:
    """Wait for the server's end, then end what its jobs left."""
    mark, folder = argv[1], None if argv[2] == "-" else argv[2]
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C meant for the server
    while True:
        try:
            if not os.read(0, 4096):
                break
        except InterruptedError:
            continue
        except OSError:
            break
    end_everything(mark, folder)


if __name__ == "__main__":
    main(sys.argv)
