"""
Tests for ``measuring.server.pool.pool.WorkerPool``: jobs run in real job processes forked from a
real template (``python -m measuring.worker``) by the real reactor (passed in, as the server
passes it), one job at a time. Its blocking /proc reads run at once (``threads.Synchronous``).
Every pool has a mark and every job an id of its own, so that the pool ends no process but its
own (and a test's).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, TypeVar

import pandas as pd
from twisted.internet import reactor, task
from twisted.internet.interfaces import IReactorTime
from twisted.trial.unittest import FailTest, TestCase

from measuring.errors import Cancelled, Internal, JobFailed, MeasuringError, MemoryLimit, Timeout
from measuring.messages import SERVER_MARK, Message
from measuring.server.pool.pool import WorkerPool, worker_environment
from measuring.server.pool.process import RunningJob
from measuring.server.threads import Synchronous
from measuring.test.support import FORMULAS, end, gone, sample_frame, write_dataset, write_formulas

E = TypeVar("E", bound=MeasuringError)

#: How long a test waits at most for a worker process to do something.
PATIENCE = 30.0
MiB = 2**20


async def wait_until(
    condition: Callable[[], object], what: str, patience: float = PATIENCE
) -> None:
    """Let the reactor run until ``condition()`` holds; fail after ``patience`` seconds."""
    deadline = time.monotonic() + patience
    while not condition():
        if time.monotonic() > deadline:
            raise FailTest(f"{what} did not happen within {patience} s")
        await task.deferLater(reactor, 0.02, lambda: None)


async def job_error(running: RunningJob, kind: type[E]) -> E:
    """The ``kind`` of error a job fails with; the test fails if the job succeeds."""
    outcome = await running.result
    if not isinstance(outcome.error, kind):
        raise FailTest(f"the job did not fail with {kind.__name__}: {outcome}")
    return outcome.error


async def job_results(running: RunningJob) -> dict[str, Any]:
    """The answer of a job that ends done: its Results and Log; the test fails otherwise."""
    outcome = await running.result
    if outcome.error is not None or outcome.results is None:
        raise FailTest(f"the job failed: {outcome}")
    return {"Results": outcome.results, "Log": outcome.log}


def start_pool(
    case: TestCase,
    clock: IReactorTime = reactor,
    command: Sequence[str] | None = None,
    memory_limit: int | None = None,
    mark: str | None = None,
) -> WorkerPool:
    """A started pool running one job at a time, stopped (every process ended) after the test."""
    tmp = os.path.abspath(case.mktemp())
    workdir = os.path.abspath(case.mktemp())
    os.makedirs(tmp)
    os.makedirs(workdir)
    environment = worker_environment(os.environ, tmp, mark or workdir)
    pool = WorkerPool(reactor, clock, 1, workdir, environment, Synchronous(), memory_limit, command)
    pool.startService()
    case.addCleanup(pool.stopService)
    return pool


def job_message(
    case: TestCase, source: str, engine: str = "pyarrow", row_group_size: int | None = None
) -> Message:
    """A Job message of its own id running ``source`` on the sample dataset, in a new folder."""
    folder = os.path.abspath(case.mktemp())
    os.makedirs(folder)
    return {
        "Type": "Job",
        "Job": f"job-{uuid.uuid4().hex[:12]}",
        "Directory": folder,
        "Base": write_dataset(folder, row_group_size=row_group_size),
        "File": write_formulas(folder, source),
        "Functions": None,
        "Output": "parquet",
        "Engine": engine,
    }


def sleeper(case: TestCase, environment: dict[str, str]) -> subprocess.Popen[bytes]:
    """A process that sleeps with ``environment`` added to this one's, killed after the test."""
    process = subprocess.Popen(["sleep", "600"], env={**os.environ, **environment})
    case.addCleanup(process.wait)
    case.addCleanup(process.kill)
    return process


NOISY_FORMULAS = (
    FORMULAS
    + """

def noisy(df):
    print("noisy was called")
    return df.value.count()
"""
)


#: A formula that ignores SIGTERM and loops forever.
LOOPING_FORMULAS = """
import signal

def forever(df):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    open("started", "w").close()
    while True:
        pass
"""


async def start_looping(pool: WorkerPool, message: Message) -> RunningJob:
    """Run a job of ``LOOPING_FORMULAS`` and wait until its formula loops."""
    running = pool.run(message)
    started = os.path.join(message["Directory"], "started")
    await wait_until(lambda: os.path.exists(started), "the start of the formula")
    return running


#: A formula that leaves three processes sleeping: one forked in the worker's process group, one
#: program started in a session of its own, one forked that leaves the group (setsid); then
#: ``{then}``.
CHILDREN_FORMULAS = """
import os
import subprocess
import time

def _fork(leave_group):
    pid = os.fork()
    if pid == 0:
        if leave_group:
            os.setsid()
        time.sleep(600)
        os._exit(0)
    return pid

def children(df):
    started = subprocess.Popen(["sleep", "600"], start_new_session=True).pid
    pids = [_fork(False), started, _fork(True)]
    with open("children.tmp", "w") as f:
        f.write(" ".join(map(str, pids)))
    os.rename("children.tmp", "children")
    {then}
"""

#: A formula that takes ever more memory.
HOARDING_FORMULAS = """
import time

def hoard(df):
    kept = []
    while True:
        kept.append(bytearray(20 * 2**20))
        time.sleep(0.05)
"""


async def started_children(case: TestCase, message: Message) -> list[int]:
    """The pids of the processes a job's formula started and wrote down; killed after the test."""
    path = os.path.join(message["Directory"], "children")
    await wait_until(lambda: os.path.exists(path), "the start of the formula's processes")
    with open(path) as f:
        children = [int(pid) for pid in f.read().split()]
    for child in children:
        case.addCleanup(end, child)
    return children


async def all_ended(children: list[int]) -> None:
    """Wait for the end of the processes of ``CHILDREN_FORMULAS``; fail naming one that lives."""
    kinds = ["forked", "started anew", "forked, left the group"]
    for child, kind in zip(children, kinds, strict=True):
        await wait_until(partial(gone, child), f"the end of process {child} ({kind})", 5)


class WorkerPoolJobTests(TestCase):
    """A job run in a real worker process: its answer, its failures, its end."""

    timeout = 60

    async def test_jobAnswersResultsAndLog(self) -> None:
        """A job answers every formula's result, right, and what the formulas printed as Log."""
        pool = start_pool(self)
        message = job_message(self, NOISY_FORMULAS)
        job = message["Job"]
        answer = await job_results(pool.run(message))

        frame = sample_frame()
        results = answer["Results"]
        self.assertEqual(set(answer), {"Results", "Log"})
        self.assertIn("noisy was called", answer["Log"])
        self.assertEqual(results["count"], {"Kind": "Scalar", "Value": 10_000})
        self.assertEqual(results["peak"], {"Kind": "Scalar", "Value": frame.value.max()})
        self.assertEqual(results["noisy"], {"Kind": "Scalar", "Value": frame.value.count()})
        means = results["mean_by_sensor"]
        self.assertEqual(
            (means["Kind"], means["File"], means["Rows"], means["Columns"], means["Index"]),
            ("Series", f"results/{job}/mean_by_sensor.parquet", 3, ["value"], ["sensor"]),
        )
        written = pd.read_parquet(os.path.join(message["Directory"], means["File"]))
        pd.testing.assert_series_equal(
            written["value"], frame.groupby("sensor").value.mean(), check_exact=False
        )
        hourly = pd.read_parquet(os.path.join(message["Directory"], results["hourly"]["File"]))
        expected = frame.set_index("time").value.resample("1h").mean()
        pd.testing.assert_series_equal(
            hourly["value"], expected, check_exact=False, check_freq=False
        )

    async def test_formulaThatRaisesFailsTheJob(self) -> None:
        """A formula that raises fails the job with JobFailed naming it; Log has the traceback."""
        pool = start_pool(self)
        running = pool.run(job_message(self, "def broken(df):\n    return 1 / 0\n"))
        outcome = await running.result
        error = outcome.error
        assert isinstance(error, JobFailed), outcome
        self.assertEqual(error.code, "JobFailed")
        self.assertIn("'broken'", error.message)
        self.assertIn("ZeroDivisionError", error.message)
        self.assertIn("Traceback", outcome.log)

    async def test_workerThatExitsFailsTheJob(self) -> None:
        """A formula that ends its process with os._exit(3) fails the job, saying so."""
        pool = start_pool(self)
        source = "import os\n\ndef leaves(df):\n    os._exit(3)\n"
        error = await job_error(pool.run(job_message(self, source)), JobFailed)
        self.assertIn("exited with code 3", error.message)

    async def test_workerKilledBySignalFailsTheJob(self) -> None:
        """A formula that crashes its process (a segfault) fails the job naming SIGSEGV."""
        pool = start_pool(self)
        source = "import ctypes\n\ndef crash(df):\n    ctypes.string_at(0)\n"
        error = await job_error(pool.run(job_message(self, source)), JobFailed)
        self.assertIn("SIGSEGV", error.message)

    async def test_processesTheFormulaStartedEndWithTheJob(self) -> None:
        """Processes a formula leaves running, in the worker's group or not, end with its job."""
        pool = start_pool(self)
        message = job_message(self, CHILDREN_FORMULAS.format(then="return 7"))
        running = pool.run(message)
        children = await started_children(self, message)
        answer = await job_results(running)
        self.assertEqual(answer["Results"]["children"], {"Kind": "Scalar", "Value": 7})
        await all_ended(children)

    async def test_processThatLeavesTheGroupDoesNotHoldTheJob(self) -> None:
        """A killed job ends though processes left its group; they are swept with it."""
        pool = start_pool(self)
        message = job_message(self, CHILDREN_FORMULAS.format(then="while True:\n        pass"))
        running = pool.run(message)
        children = await started_children(self, message)
        running.kill(Cancelled("the job was cancelled"))
        await wait_until(lambda: running.result.called, "the job's end", patience=10)
        await job_error(running, Cancelled)
        await all_ended(children)

    async def test_killStopsTheJobWithTheReason(self) -> None:
        """Killing a job that loops deaf to SIGTERM fails it with the reason and ends its worker."""
        pool = start_pool(self)
        message = job_message(self, LOOPING_FORMULAS)
        running = await start_looping(pool, message)
        assert running.process is not None and running.process.pid is not None
        pid = running.process.pid
        reason = Timeout("the job ran longer than its limit of 5 s and was stopped")
        running.kill(reason)
        error = await job_error(running, Timeout)
        self.assertIs(error, reason)
        self.assertTrue(gone(pid), f"worker process {pid} still runs")

    def test_killWaitingJob(self) -> None:
        """Killing a job still waiting for the template fails it at once with the reason."""
        pool = start_pool(self)
        running = pool.run(job_message(self, FORMULAS))
        reason = Cancelled("the job was cancelled")
        running.kill(reason)
        self.assertIs(self.successResultOf(running.result).error, reason)
        processes = [(info.state, info.job) for info in pool.processes()]
        self.assertEqual(processes, [("template", None)])

    async def test_eachJobInAFreshProcess(self) -> None:
        """Each job runs in a process of its own, forked from the template; it ends with its job."""
        pool = start_pool(self)
        await wait_until(lambda: pool.template_state == "ready", "a ready template")
        [template] = pool.processes()
        pids = []
        for _ in range(2):
            message = job_message(self, FORMULAS)
            running = pool.run(message)
            answer = await job_results(running)
            self.assertEqual(answer["Results"]["count"]["Value"], 10_000)
            results = os.path.join(message["Directory"], "results", message["Job"])
            self.assertTrue(os.path.isdir(results))
            assert running.process is not None and running.process.pid is not None
            pids.append(running.process.pid)
        self.assertEqual(len(set(pids)), 2)
        for pid in pids:
            self.assertTrue(gone(pid), f"job process {pid} still runs")
        self.assertEqual([info.pid for info in pool.processes()], [template.pid])

    async def test_jobProcessStandsApart(self) -> None:
        """A job process leads its own process group and is the OOM killer's first pick."""
        pool = start_pool(self)
        message = job_message(self, LOOPING_FORMULAS)
        running = await start_looping(pool, message)
        assert running.process is not None and running.process.pid is not None
        pid = running.process.pid
        self.assertEqual(os.getpgid(pid), pid)
        self.assertEqual(os.getsid(pid), pid)
        with open(f"/proc/{pid}/oom_score_adj") as f:
            self.assertEqual(f.read().strip(), "1000")
        running.kill(Cancelled("the job was cancelled"))
        await job_error(running, Cancelled)

    async def test_progressReachesTheJob(self) -> None:
        """The worker's progress reaches on_progress, from (0, n) to (n, n), before the answer."""
        pool = start_pool(self)
        message = job_message(self, FORMULAS, engine="fastparquet", row_group_size=2500)
        running = pool.run(message)
        reports: list[tuple[int, int]] = []
        running.on_progress = lambda done, total: reports.append((done, total))
        answer = await job_results(running)
        self.assertEqual(answer["Results"]["count"]["Value"], 10_000)
        total = reports[-1][1]
        self.assertGreater(total, 1)
        self.assertEqual((reports[0], reports[-1]), ((0, total), (total, total)))
        self.assertEqual(reports, sorted(reports))

    async def test_jobOverItsMemoryLimitIsStopped(self) -> None:
        """A job using more memory than the limit is stopped: MemoryLimit, saying what it used."""
        pool = start_pool(self, memory_limit=300 * MiB)
        running = pool.run(job_message(self, HOARDING_FORMULAS))
        error = await job_error(running, MemoryLimit)
        self.assertEqual(error.code, "MemoryLimit")
        self.assertRegex(
            error.message,
            r"^the job's processes used [0-9.]+ [MG]iB of memory, more than its limit of 300 MiB",
        )
        self.assertGreater(running.peak_rss, 300 * MiB)
        assert running.process is not None and running.process.pid is not None
        self.assertTrue(gone(running.process.pid), f"job process {running.process.pid} still runs")

    async def test_stopEndsEveryWorker(self) -> None:
        """Stopping the pool ends the template and every job process, cancelling every job."""
        pool = start_pool(self)
        message = job_message(self, LOOPING_FORMULAS)
        running = await start_looping(pool, message)
        waiting = pool.run(job_message(self, FORMULAS))
        pids = [worker.pid for worker in pool.processes()]

        await pool.stopService()

        self.assertEqual([pid for pid in pids if not gone(pid)], [])
        self.assertEqual(pool.processes(), [])
        for job in (running, waiting):
            error = self.successResultOf(job.result).error
            assert isinstance(error, Cancelled)
            self.assertEqual(error.message, "the server is stopping")


class WorkerPoolStartTests(TestCase):
    """Starting the pool: what a previous server left running, a template that cannot start."""

    timeout = 60

    async def test_workerThatCannotStartFailsWaitingJobs(self) -> None:
        """After three failed starts of the template (again after 1 s, then 2 s) jobs fail."""
        clock = task.Clock()
        pool = start_pool(self, clock, [sys.executable, "-c", "import sys; sys.exit(3)"])
        running = pool.run(job_message(self, FORMULAS))
        for delay in (1.0, 2.0):
            await wait_until(lambda: not pool.processes(), "a failed start")
            [respawn] = clock.getDelayedCalls()
            self.assertEqual(respawn.getTime() - clock.seconds(), delay)
            self.assertFalse(running.result.called)
            clock.advance(delay)
        await wait_until(lambda: running.result.called, "the job's failure")
        error = await job_error(running, Internal)
        self.assertEqual(error.code, "Internal")
        self.assertIn("worker processes fail to start", error.message)
        later = await job_error(pool.run(job_message(self, FORMULAS)), Internal)
        self.assertEqual(later.message, error.message)

    async def test_processesAPreviousServerLeftAreEnded(self) -> None:
        """At start, what a previous server of the same mark left is killed; the template starts."""
        mark = os.path.abspath(self.mktemp())
        left = sleeper(self, {SERVER_MARK: mark})
        another = sleeper(self, {SERVER_MARK: mark + "-another"})
        pool = start_pool(self, mark=mark)
        [first] = pool.processes()
        await wait_until(lambda: left.poll() is not None, "the end of what was left running")
        self.assertEqual(left.returncode, -signal.SIGKILL)
        await wait_until(lambda: pool.template_state == "ready", "a ready template")
        self.assertEqual([worker.pid for worker in pool.processes()], [first.pid])
        self.assertIsNone(another.poll(), "another server's process was killed")
