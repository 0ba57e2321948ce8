"""
The worker process itself: settle in below the server, warm up, say Ready, run one job, exit.

``python -m measuring.worker PARENT_PID`` runs ``main``. The job arrives on fd 3 and the
answers leave on fd 4 (``measuring.messages``); everything the formulas print goes to stdout and
stderr, which the server keeps as the job's log. Never imports twisted or ``measuring.server``.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import sys

from measuring.errors import Internal
from measuring.messages import JOB_FD, REPLY_FD, encode
from measuring.worker.job import run_job, warm_up

PR_SET_PDEATHSIG = 1


PR_SET_CHILD_SUBREAPER = 36


def _settle_in(parent: int) -> None:
    """
    Lead a new process group; end when the server ends; keep every process the formulas start
    below this one (as a subreaper); and be the process the kernel's out-of-memory killer picks
    before the server.
    """
    if os.getpgid(0) != os.getpid():
        os.setsid()
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1)
        with contextlib.suppress(OSError), open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
    if parent and os.getppid() != parent:
        os._exit(1)


def end_descendants() -> None:
    """End every process the formulas started and left running (they are all below this one)."""
    import psutil

    children = psutil.Process().children(recursive=True)
    for child in children:
        with contextlib.suppress(psutil.Error):
            child.kill()
    psutil.wait_procs(children, timeout=2)


def main(argv: list[str]) -> None:
    """The worker process: warm up, say Ready, run one job, report, exit."""
    _settle_in(int(argv[1]))
    os.set_inheritable(JOB_FD, False)
    os.set_inheritable(REPLY_FD, False)
    replies = os.fdopen(REPLY_FD, "wb", buffering=0)
    warm_up()
    replies.write(encode({"Type": "Ready"}))
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
