"""
A forked job process enters a sandbox of its own: bubblewrap makes it, the job process joins it.

bubblewrap (``bwrap``, its command line from ``measuring.server.pool.sandbox``) builds the
namespaces and mounts of one job's sandbox around a process that only waits (``sleep``); its
first process (bwrap's own, PID 1 there) ends with bwrap. This job process joins that process's
namespaces (``setns``: the user namespaces bwrap made, if any, IPC, UTS, network, PID, mount) and
its root, and forks: the child is inside the sandbox, in its PID namespace, and runs the job; this
process stays outside as its parent, waits for it and ends as it ended. The child keeps to what
bwrap leaves what it runs: no new privileges, and no capability when the sandbox has user
namespaces of its own. When this process ends, bubblewrap ends (it dies with its parent) and with
it everything in the sandbox. Each job has a sandbox of its own, so no job sees another's files or
processes. Never imports twisted or ``measuring.server``.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
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
#: ioctl on a namespace: the user namespace that owns it, as a new file descriptor.
NS_GET_USERNS = 0xB701


class SandboxFailed(Exception):
    """bubblewrap could not make the sandbox, or it cannot be joined."""


def holder_argv() -> list[str]:
    """What runs in a job's sandbox as its first process: say ready, then wait to be ended."""
    return ["/bin/sh", "-c", "echo ready && exec sleep infinity"]


def _start(bwrap: Sequence[str]) -> tuple[subprocess.Popen[bytes], int]:
    """Start bubblewrap; returns it and the host pid of the sandbox's first process, once ready."""
    info_r, info_w = os.pipe()
    argv = [bwrap[0], "--info-fd", str(info_w), *bwrap[1:]]
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


def _join(pid: int) -> bool:
    """
    Join the namespaces and the root of process ``pid``; True when that took a user namespace.

    Without privileges, bwrap makes its namespaces in a user namespace of its own and may then
    nest another one (which ``pid`` is in): the user namespace that owns the others is joined
    first, the others next, the one ``pid`` is in last.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    root = os.open(f"/proc/{pid}/root", os.O_RDONLY | os.O_DIRECTORY)
    spaces = []
    for name in NAMESPACES[1:]:
        path = f"/proc/{pid}/ns/{name}"
        if os.stat(path).st_ino != os.stat(f"/proc/self/ns/{name}").st_ino:
            spaces.append((name, os.open(path, os.O_RDONLY)))
    users = []
    if os.stat(f"/proc/{pid}/ns/user").st_ino != os.stat("/proc/self/ns/user").st_ino:
        owner = fcntl.ioctl(spaces[-1][1], NS_GET_USERNS) if spaces else -1
        if owner >= 0:
            users.append(("user", owner))
        last = os.open(f"/proc/{pid}/ns/user", os.O_RDONLY)
        if owner < 0 or os.fstat(owner).st_ino != os.fstat(last).st_ino:
            spaces.append(("user", last))
        else:
            os.close(last)
    try:
        for name, fd in [*users, *spaces]:
            if libc.setns(fd, 0) != 0:
                error = ctypes.get_errno()
                raise SandboxFailed(f"joining the sandbox's {name} namespace: {os.strerror(error)}")
        os.fchdir(root)
        os.chroot(".")
    finally:
        for _, fd in [*users, *spaces]:
            os.close(fd)
        os.close(root)
    return bool(users) or any(name == "user" for name, _ in spaces)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


PR_CAPBSET_DROP = 24
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
LINUX_CAPABILITY_VERSION_3 = 0x20080522


def drop_capabilities() -> None:
    """
    Give up every capability, as bwrap does for what it runs without privileges: joining the
    sandbox's user namespace gave this process all of them there.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last = int(f.read())
    for capability in range(last + 1):
        libc.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0)
    libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    header = _CapHeader(LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    if libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset: giving up capabilities")


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
        own_users = _join(first)
    except (OSError, SandboxFailed) as e:
        os.write(2, f"measuring: the job's sandbox could not be made: {e}\n".encode())
        os._exit(71)
    child = os.fork()
    if child == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1)
        if own_users:
            drop_capabilities()
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
