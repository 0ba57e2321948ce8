"""
The memory watch: twice a second, the private memory of every running job's process tree, and
the job stopped that uses more than its limit.

Private memory is what a job's processes hold that no other process shares (``procfs``): a job
process shares the template's pages until it writes to them, and those are the template's.
Sampling reads /proc in ``blocking``'s thread; judging happens on the reactor thread.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from measuring import procfs
from measuring.errors import MemoryLimit
from measuring.server.pool.process import RunningJob
from measuring.server.threads import Runner

EVERY = 0.5


def size(n: float) -> str:
    """A number of bytes as people read it: ``1.50 GiB``, ``300 MiB``."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


class MemoryWatch:
    """Watches the jobs ``running()`` names against ``limit`` bytes."""

    _log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        blocking: Runner,
        limit: int,
        running: Callable[[], list[RunningJob]],
    ) -> None:
        self._blocking = blocking
        self.limit = limit
        self._running = running
        self._loop = task.LoopingCall(self.check)
        self._loop.clock = clock

    def start(self) -> None:
        self._loop.start(EVERY, now=False)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    def check(self) -> defer.Deferred[None] | None:
        """Sample every running job once; stop those past the limit."""
        jobs = [
            (job, job.process.pid)
            for job in self._running()
            if job.process is not None and job.process.pid is not None
        ]
        if not jobs:
            return None

        def judge(sizes: list[int]) -> None:
            for (job, _), used in zip(jobs, sizes, strict=True):
                job.peak_rss = max(job.peak_rss, used)
                if used > self.limit:
                    job.kill(
                        MemoryLimit(
                            f"the job's processes used {size(used)} of memory, more than its "
                            f"limit of {size(self.limit)} (--job-memory); it was stopped"
                        )
                    )

        sampled = self._blocking.run(lambda: [procfs.tree_memory(pid) for _, pid in jobs])
        judged = sampled.addCallback(judge)
        judged.addErrback(lambda f: self._log.failure("checking the jobs' memory", f))
        return judged
