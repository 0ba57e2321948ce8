"""
The template process: loads and warms up what a job needs once, then forks one job process per
request of the server. It never runs a formula and never starts a thread.

``python -P -m measuring.worker SERVER_PID`` (started and watched by the server's pool) reads its
requests on the control socket, file descriptor ``CONTROL_FD`` (see ``measuring.messages``): each
``Fork`` request brings the pipes of one job process, passed as file descriptors. The template
forks, and the child becomes the job process (``measuring.worker.main.run_forked``). Its exit is
reaped here and reported to the server. A fork copies the threads of none but the caller: were
there threads here (OpenBLAS's, jemalloc's, Arrow's pools), a child could inherit a lock one of
them held and hang; hence one thread, proved by ``Threads`` in the Ready message. Never imports
twisted or ``measuring.server``.
"""

from __future__ import annotations

import array
import contextlib
import gc
import json
import os
import select
import signal
import socket
import sys
from typing import Any

from measuring.messages import CONTROL_FD, Message, encode

#: What keeps the libraries a job uses from starting threads only while they load here: a job
#: process drops these (``main.single_threaded_no_more``) before it runs anything.
WHILE_LOADING = {"JE_ARROW_MALLOC_CONF": "background_thread:false"}
#: What stays for the template and every job process: OpenBLAS at one thread, as in Dask's own
#: workers (the job's Dask threads are its parallelism).
ALWAYS = {"OPENBLAS_NUM_THREADS": "1"}
#: The most file descriptors one read of the control socket takes (each request brings four).
MOST_FDS = 64


def threads() -> int:
    """How many threads this process has (the kernel's count)."""
    return len(os.listdir("/proc/self/task"))


class Requests:
    """Splits the control socket's bytes into requests and pairs each with its descriptors."""

    def __init__(self) -> None:
        self._buffer = b""
        self._fds: list[int] = []

    def feed(self, data: bytes, fds: list[int]) -> list[tuple[Message, list[int]]]:
        """The complete requests so far, each with the ``Fds`` descriptors that came with it."""
        self._buffer += data
        self._fds.extend(fds)
        complete = []
        while b"\n" in self._buffer:
            line, self._buffer = self._buffer.split(b"\n", 1)
            request = json.loads(line)
            count = int(request.get("Fds", 0))
            if count > len(self._fds):
                raise ValueError(f"a request names {count} descriptors, {len(self._fds)} came")
            taken, self._fds = self._fds[:count], self._fds[count:]
            complete.append((request, taken))
        return complete


def receive(control: socket.socket) -> tuple[bytes, list[int]]:
    """One read from the control socket: bytes and the descriptors that came with them."""
    data, ancillary, _, _ = control.recvmsg(65536, socket.CMSG_SPACE(MOST_FDS * 4))
    fds: list[int] = []
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            numbers = array.array("i")
            numbers.frombytes(payload[: len(payload) - len(payload) % numbers.itemsize])
            fds.extend(numbers)
    return data, fds


class Template:
    """The template's loop: fork on request, report each fork and each exit."""

    def __init__(self, control: socket.socket) -> None:
        self._control = control
        self._requests = Requests()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)

    def send(self, message: Message) -> None:
        self._control.sendall(encode(message))

    def serve(self) -> None:
        """Answer requests until the server closes the control socket (or ends)."""
        signal.set_wakeup_fd(self._wake_w)
        signal.signal(signal.SIGCHLD, lambda number, frame: None)
        poller = select.poll()
        poller.register(self._control.fileno(), select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while True:
            for fd, _ in poller.poll():
                if fd == self._wake_r:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_r, 4096)
                elif not self._read():
                    return
            self._reap()

    def _read(self) -> bool:
        data, fds = receive(self._control)
        if not data:
            return False
        for request, passed in self._requests.feed(data, fds):
            try:
                if request.get("Type") == "Fork":
                    self._fork(request, passed)
            finally:
                for fd in passed:
                    os.close(fd)
        return True

    def _fork(self, request: Message, fds: list[int]) -> None:
        pid = os.fork()
        if pid == 0:
            self._become_job(request, fds)
        self.send({"Type": "Forked", "Id": request.get("Id"), "Pid": pid})

    def _become_job(self, request: Message, fds: list[int]) -> None:
        """In the child: leave the template behind, then be the job process; never returns."""
        try:
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            from measuring.worker.main import run_forked

            run_forked(fds, request)
        except BaseException:
            import traceback

            traceback.print_exc()
        os._exit(70)

    def _reap(self) -> None:
        while True:
            try:
                pid, status, usage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            cpu = round(usage.ru_utime + usage.ru_stime, 4)
            self.send({"Type": "Exited", "Pid": pid, "Status": status, "Cpu": cpu})


PR_SET_PDEATHSIG = 1
#: The template goes before the server when memory runs out, but after the jobs (1000).
OOM_SCORE = 500


def settle_in(server: int, oom_score: int) -> None:
    """Lead a session of its own, end when the server ends, and say how expendable it is."""
    import ctypes

    if os.getpgid(0) != os.getpid():
        os.setsid()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    with contextlib.suppress(OSError), open("/proc/self/oom_score_adj", "w") as f:
        f.write(str(oom_score))
    if server and os.getppid() != server:
        os._exit(1)


def main(argv: list[str]) -> None:
    """The template: load single-threaded, warm up, say Ready, fork on request until the end."""
    settle_in(int(argv[1]), OOM_SCORE)
    os.environ.update({**ALWAYS, **WHILE_LOADING})
    control = socket.socket(fileno=CONTROL_FD)
    os.set_inheritable(CONTROL_FD, False)
    from measuring.worker.job import warm_up
    from measuring.worker.main import prepare

    warm_up()
    prepare()
    # What is loaded now stays out of the collector's way, so that a child's collections do not
    # write to (and so copy) every page it shares with the template.
    gc.collect()
    gc.freeze()
    template = Template(control)
    ready: dict[str, Any] = {"Type": "Ready", "Pid": os.getpid(), "Threads": threads()}
    template.send(ready)
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        template.serve()
    sys.exit(0)
