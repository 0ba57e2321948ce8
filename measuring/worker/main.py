"""
The job process: a child forked from the template that settles in, says Ready, runs one job, exits.

``run_forked`` takes over the pipes the server passed through the template (stdout, stderr, the
job's pipe, the reply pipe) as file descriptors 1, 2, ``JOB_FD`` and ``REPLY_FD``, closes every
other, then stands apart as a worker process always has: a session and process group of its own,
the parent-death signal, a subreaper for what its formulas start, the OOM killer's first pick,
the job's limits and marks. Everything the formulas print goes to stdout and stderr, which the
server keeps as the job's log. With a sandbox it first enters one of its own (``enter``). Never
imports twisted or ``measuring.server``.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import secrets
import signal
import sys
import tempfile
from collections.abc import Sequence

from measuring import procfs
from measuring.errors import Internal
from measuring.messages import JOB_FD, REPLY_FD, WORKER_MARK, Message, encode
from measuring.worker.job import run_job

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
OOM_SCORE = 1000


def take_fds(fds: Sequence[int]) -> None:
    """Make ``fds`` (stdout, stderr, job, reply) this process's 1, 2, 3 and 4; close all others."""
    targets = (1, 2, JOB_FD, REPLY_FD)
    # Out of the way first, so that no dup2 below overwrites one still to be placed.
    moved = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 16) for fd in fds]
    for target, fd in zip(targets, moved, strict=True):
        os.dup2(fd, target, inheritable=target < 3)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.closerange(REPLY_FD + 1, os.sysconf("SC_OPEN_MAX"))


class Prepared:
    """What a job process needs from C libraries, looked up once in the template."""

    libc: ctypes.CDLL | None = None


def prepare() -> None:
    """In the template, before it forks: look up what every job process calls (``Prepared``)."""
    Prepared.libc = ctypes.CDLL(None, use_errno=True)


def settle_in(parent: int) -> None:
    """
    Lead a new session and process group; end when ``parent`` (the template, which ends with the
    server) ends; keep every process the formulas start below this one (as a subreaper); and be
    the process the kernel's out-of-memory killer picks first.
    """
    if os.getpgid(0) != os.getpid():
        os.setsid()
    if sys.platform.startswith("linux"):
        libc = Prepared.libc or ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1)
        with contextlib.suppress(OSError), open("/proc/self/oom_score_adj", "w") as f:
            f.write(str(OOM_SCORE))
    if parent and os.getppid() != parent:
        os._exit(1)


def join_cgroup(path: str | None) -> None:
    """
    Join the job's cgroup (the server made it: ``measuring.server.pool.cgroups``) before anything
    else, so that every process the job starts is in it and ends with it.
    """
    if not path:
        return
    try:
        with open(os.path.join(path, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
    except OSError as e:
        os.write(2, f"measuring: the job's cgroup {path} cannot be joined: {e.strerror}\n".encode())


def single_threaded_no_more() -> None:
    """
    Undo what kept the template single-threaded and shared with every other child: jemalloc's
    setting leaves the environment, and numpy's global random generator gets a seed of its own (a
    fork copies it; Python's ``random`` reseeds itself).

    OpenBLAS stays at one thread, as in Dask's own workers (``distributed.nanny.pre-spawn-environ``
    sets ``OPENBLAS_NUM_THREADS=1``): the job's Dask threads are its parallelism, and OpenBLAS
    threads started here spin on the cores those threads need (measured: a trivial job 50 ms
    slower on 2 cores, docs/performance.md).
    """
    from measuring.worker.template import WHILE_LOADING

    for name in WHILE_LOADING:
        os.environ.pop(name, None)
    numpy_random = sys.modules.get("numpy.random")
    if numpy_random is not None:
        numpy_random.seed()


def run_forked(fds: Sequence[int], request: Message) -> None:
    """Become the job process of ``request`` (a Fork request); never returns."""
    template = os.getppid()
    take_fds(fds)
    join_cgroup(request.get("Cgroup"))
    settle_in(template)
    # Every process below this one inherits the mark (a process it runs reads it in its
    # environment; this one's own /proc environ is the template's).
    os.environ[WORKER_MARK] = secrets.token_hex(16)
    os.environ.update(request.get("Environment") or {})
    tempfile.tempdir = None
    pid = os.getpid()
    sandbox = request.get("Sandbox")
    if sandbox:
        # Joining a mount namespace takes a process of one thread: before Dask starts its own.
        from measuring.worker import enter

        enter.sandbox(sandbox)
    single_threaded_no_more()
    run_one(pid)


def run_one(pid: int) -> None:
    """Say Ready (as process ``pid``), run the job that arrives on ``JOB_FD``, report, exit."""
    os.set_inheritable(JOB_FD, False)
    os.set_inheritable(REPLY_FD, False)
    replies = os.fdopen(REPLY_FD, "wb", buffering=0)
    replies.write(encode({"Type": "Ready", "Pid": pid}))
    with os.fdopen(JOB_FD, "rb") as jobs:
        line = jobs.readline()
    if not line:
        os._exit(0)

    def progress(done: int, total: int) -> None:
        replies.write(encode({"Type": "Progress", "Done": done, "Total": total}))

    answer = run_job(json.loads(line), progress)
    end_descendants()
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    try:
        reply = encode(answer)
    except ValueError as e:
        reply = encode(
            {"Type": "Error", "Error": Internal(f"the answer could not be sent: {e}").to_json()}
        )
    replies.write(reply)
    os._exit(0)


def end_descendants() -> None:
    """End every process the formulas started and left running (they are all below this one)."""
    ended = procfs.kill_tree(os.getpid())
    for pid in ended:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, 0)
    # What was below them came to this subreaper when they died: reap it too.
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
