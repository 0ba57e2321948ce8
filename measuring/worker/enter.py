"""
A forked job process enters a sandbox of its own: bubblewrap makes it, the job process joins it.

bubblewrap (``bwrap``, its command line from ``measuring.server.pool.sandbox``) builds the
namespaces and mounts of one job's sandbox around a process that only waits (``sleep``), the
sandbox's first process. This job process joins that process's namespaces (``setns``: user when
it has one of its own, IPC, UTS, network, PID and mount, then its root), and forks: the child is
inside the sandbox, in its PID namespace, and runs the job; this process stays outside as its
parent, waits for it and ends as it ended. When this process ends, bubblewrap ends (it dies with
its parent) and with it everything in the sandbox. Each job has a sandbox of its own, so no job
sees another's files or processes. Never imports twisted or ``measuring.server``.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import resource
import signal
import subprocess
from collections.abc import Sequence

from measuring.messages import JOB_FD, REPLY_FD

PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38
PR_SET_CHILD_SUBREAPER = 36
#: The namespaces joined, in an order the kernel accepts (user first, mount last).
NAMESPACES = ("user", "ipc", "uts", "net", "pid", "mnt")
READY = b"ready\n"


class SandboxFailed(Exception):
    """bubblewrap could not make the sandbox, or it cannot be joined."""


def holder_argv() -> list[str]:
    """What runs in a job's sandbox as its first process: say ready, then wait to be ended."""
    return ["/bin/sh", "-c", "echo ready && exec sleep infinity"]


def _start(bwrap: Sequence[str]) -> tuple[subprocess.Popen[bytes], int]:
    """Start bubblewrap; returns it and the host pid of the sandbox's first process, once ready."""
    info_r, info_w = os.pipe()
    argv = [bwrap[0], "--info-fd", str(info_w), "--as-pid-1", *bwrap[1:]]
    holder = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, pass_fds=[info_w]
    )
    os.close(info_w)
    assert holder.stdout is not None
    ready = holder.stdout.readline()
    with os.fdopen(info_r, "rb") as f:
        info = f.read()
    if ready != READY:
        holder.kill()
        holder.wait()
        raise SandboxFailed(f"bwrap ended (code {holder.returncode}) before its sandbox was made")
    try:
        return holder, int(json.loads(info)["child-pid"])
    except (ValueError, KeyError, TypeError) as e:
        holder.kill()
        raise SandboxFailed(f"bwrap said {info[:200]!r}, not where its sandbox is") from e


def _join(pid: int) -> None:
    """Join the namespaces and the root of process ``pid``."""
    libc = ctypes.CDLL(None, use_errno=True)
    root = os.open(f"/proc/{pid}/root", os.O_RDONLY | os.O_DIRECTORY)
    spaces = []
    for name in NAMESPACES:
        path = f"/proc/{pid}/ns/{name}"
        if os.stat(path).st_ino != os.stat(f"/proc/self/ns/{name}").st_ino:
            spaces.append((name, os.open(path, os.O_RDONLY)))
    try:
        for name, fd in spaces:
            if libc.setns(fd, 0) != 0:
                error = ctypes.get_errno()
                raise SandboxFailed(f"joining the sandbox's {name} namespace: {os.strerror(error)}")
        os.fchdir(root)
        os.chroot(".")
    finally:
        for _, fd in spaces:
            os.close(fd)
        os.close(root)


def _end_as(status: int) -> None:
    """End this process as the one ``status`` tells of ended: the same code, or the same signal."""
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        with contextlib.suppress(OSError, ValueError):
            signal.signal(number, signal.SIG_DFL)
            os.kill(os.getpid(), number)
        os._exit(128 + number)
    os._exit(os.waitstatus_to_exitcode(status))


def sandbox(bwrap: Sequence[str]) -> None:
    """
    Make this job's sandbox with ``bwrap`` (a bwrap command line without its command) and go in:
    returns in the child inside it; in this process, waits for that child and ends as it did.
    """
    try:
        holder, first = _start([*bwrap, *holder_argv()])
        _join(first)
    except (OSError, SandboxFailed) as e:
        os.write(2, f"measuring: the job's sandbox could not be made: {e}\n".encode())
        os._exit(71)
    child = os.fork()
    if child == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1)
        if holder.stdout is not None:
            holder.stdout.close()
        return
    for fd in (0, JOB_FD, REPLY_FD):
        with contextlib.suppress(OSError):
            os.close(fd)
    while True:
        try:
            _, status = os.waitpid(child, 0)
            break
        except InterruptedError:
            continue
    holder.kill()
    with contextlib.suppress(ChildProcessError):
        holder.wait()
    _end_as(status)
