"""
The template process and the job processes it forks: a report, not a test.

    python benchmarks/fork.py [--forks 30] [--sandbox]

Starts the real template (``python -m measuring.worker``) the way the pool does, with its control
socket, and measures from outside: how long it takes to load; its threads and memory; then, for
``--forks`` job processes one after the other, the time from the Fork request to the job process's
Ready message (settled in: its own session, limits, marks; with ``--sandbox``, inside a bubblewrap
sandbox of its own), and the memory of an idle job process (resident, and held privately: not
shared with the template). CPU seconds come beside wall times: steadier on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, CHECKOUT)

from measuring import procfs  # noqa: E402
from measuring.messages import CONTROL_FD, encode  # noqa: E402
from measuring.server.pool.pool import worker_environment  # noqa: E402
from measuring.server.pool.sandbox import Bubblewrap  # noqa: E402

MiB = 2**20


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * procfs.PAGE


def _cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Template:
    """The real template process, driven from here with blocking calls."""

    def __init__(self, tmp: str) -> None:
        ours, theirs = socket.socketpair()
        environment = worker_environment(os.environ, tmp, tmp)
        start = time.perf_counter()
        self.pid = os.posix_spawn(
            sys.executable,
            [sys.executable, "-P", "-m", "measuring.worker", str(os.getpid())],
            environment,
            file_actions=[(os.POSIX_SPAWN_DUP2, theirs.fileno(), CONTROL_FD)],
        )
        theirs.close()
        self.control = ours
        self._lines = ours.makefile("rb")
        self.ready = json.loads(self._lines.readline())
        self.load_seconds = time.perf_counter() - start
        self.load_cpu = _cpu(self.pid)

    def fork(self, sandbox: list[str] | None, outbox: str | None) -> tuple[float, float, int, int]:
        """
        One job process to Ready: seconds, its CPU seconds (to Ready and out, as its parent
        counts them), its resident and its private memory.
        """
        pipes = [os.pipe() for _ in range(4)]
        child_fds = [pipes[0][1], pipes[1][1], pipes[2][0], pipes[3][1]]
        environment = {"TMPDIR": outbox, "HOME": outbox} if outbox else {}
        request = {"Type": "Fork", "Id": 1, "Fds": 4, "Sandbox": sandbox}
        request["Environment"] = environment
        start = time.perf_counter()
        socket.send_fds(self.control, [encode(request)], child_fds)
        for fd in child_fds:
            os.close(fd)
        forked = json.loads(self._lines.readline())
        with os.fdopen(pipes[3][0], "rb") as replies:
            ready = json.loads(replies.readline())
            seconds = time.perf_counter() - start
            pid = forked["Pid"]
            rss, private = _rss(pid), procfs.tree_memory(pid)
            os.close(pipes[2][1])  # no job: it exits
            exited = json.loads(self._lines.readline())
        for fd in (pipes[0][0], pipes[1][0]):
            os.close(fd)
        assert ready["Type"] == "Ready", ready
        return seconds, exited["Cpu"], rss, private

    def close(self) -> None:
        self._lines.close()
        self.control.close()
        os.waitpid(self.pid, 0)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--forks", type=int, default=30, help="job processes forked (30)")
    parser.add_argument("--sandbox", action="store_true", help="each in a bwrap sandbox")
    args = parser.parse_args()
    tmp = os.path.realpath(tempfile.mkdtemp(prefix="measuring-fork-"))
    template = Template(tmp)
    pid = template.pid
    print(f"## The template and its job processes{' (sandboxed)' if args.sandbox else ''}\n")
    print(
        f"template: ready in {template.load_seconds:.2f} s ({template.load_cpu:.2f} s CPU), "
        f"{template.ready['Threads']} thread, {_rss(pid) / MiB:.0f} MiB resident "
        f"({procfs.private_memory(pid) / MiB:.0f} MiB its own)"
    )
    cpu_before = _cpu(pid)
    times, cpu, rss, private = [], [], [], []
    for n in range(args.forks):
        outbox, sandbox = None, None
        if args.sandbox:
            outbox = os.path.join(tmp, f"worker-{n}")
            os.makedirs(outbox)
            sandbox = Bubblewrap((tmp,)).command([], outbox)
        seconds, used, resident, own = template.fork(sandbox, outbox)
        times.append(seconds)
        cpu.append(used)
        rss.append(resident)
        private.append(own)
    forking = (_cpu(pid) - cpu_before) / args.forks
    ordered = sorted(times)
    print(
        f"fork to Ready: p50 {statistics.median(times) * 1000:.1f} ms, "
        f"p95 {ordered[int(len(ordered) * 0.95) - 1] * 1000:.1f} ms, "
        f"max {max(times) * 1000:.1f} ms over {args.forks}; "
        f"CPU per fork: {forking * 1000:.1f} ms in the template, "
        f"{statistics.median(cpu) * 1000:.1f} ms in the job process"
    )
    print(
        f"idle job process: {statistics.median(rss) / MiB:.0f} MiB resident, "
        f"{statistics.median(private) / MiB:.1f} MiB its own (with what it started)"
    )
    print(f"template threads after the forks: {len(os.listdir(f'/proc/{pid}/task'))}")
    template.close()


if __name__ == "__main__":
    main()
