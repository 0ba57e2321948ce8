"""
Tests for ``measuring.pool``: the parent side of the warm worker processes.

``OutputLog``, ``describe_exit`` and ``worker_environment`` are plain unit tests. ``WorkerPool`` is
tested with real ``python -m measuring.worker`` processes run by the real reactor (passed in, as
the server passes it), one worker at a time, since a worker takes a second or two to warm up.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

import pandas as pd
import psutil
from twisted.internet import reactor, task
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from twisted.trial.unittest import FailTest, SynchronousTestCase, TestCase

from measuring.errors import Cancelled, Internal, JobFailed, MeasuringError, Timeout
from measuring.messages import Message
from measuring.pool import OutputLog, RunningJob, WorkerPool, describe_exit, worker_environment
from measuring.test.support import FORMULAS, sample_frame, write_dataset, write_formulas

E = TypeVar("E", bound=MeasuringError)

#: How long a test waits at most for a worker process to do something.
PATIENCE = 30.0


async def wait_until(
    condition: Callable[[], object], what: str, patience: float = PATIENCE
) -> None:
    """Let the reactor run until ``condition()`` holds; fail after ``patience`` seconds."""
    deadline = time.monotonic() + patience
    while not condition():
        if time.monotonic() > deadline:
            raise FailTest(f"{what} did not happen within {patience} s")
        await task.deferLater(reactor, 0.02, lambda: None)


def gone(pid: int) -> bool:
    """True when process ``pid`` has ended (a zombie waiting for its parent counts as ended)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def end(pid: int) -> None:
    """Kill process ``pid`` unless it has ended."""
    if not gone(pid):
        os.kill(pid, signal.SIGKILL)


async def job_error(running: RunningJob, kind: type[E]) -> E:
    """The ``kind`` of error a job fails with; the test fails if the job succeeds."""
    try:
        answer = await running.result
    except kind as error:
        return error
    raise FailTest(f"the job succeeded: {answer}")


def start_pool(
    case: TestCase, clock: IReactorTime = reactor, command: Sequence[str] | None = None
) -> WorkerPool:
    """A started pool of one worker process, stopped (every process ended) after the test."""
    tmp = os.path.abspath(case.mktemp())
    workdir = os.path.abspath(case.mktemp())
    os.makedirs(tmp)
    os.makedirs(workdir)
    pool = WorkerPool(reactor, clock, 1, workdir, worker_environment(os.environ, tmp), command)
    pool.startService()
    case.addCleanup(pool.stopService)
    return pool


def job_message(case: TestCase, source: str, job: str = "job-1") -> Message:
    """A Job message running the formulas ``source`` on the sample dataset, in a new folder."""
    folder = os.path.abspath(case.mktemp())
    os.makedirs(folder)
    return {
        "Type": "Job",
        "Job": job,
        "Directory": folder,
        "Base": write_dataset(folder),
        "File": write_formulas(folder, source),
        "Functions": None,
        "Output": "parquet",
        "Engine": "pyarrow",
    }


def busy_pid(pool: WorkerPool, job: str) -> int | None:
    """The pid of the worker process running ``job``, if one does."""
    return next((worker.pid for worker in pool.processes() if worker.job == job), None)


NOISY_FORMULAS = (
    FORMULAS
    + """

def noisy(df):
    print("noisy was called")
    return df.value.count()
"""
)


LOOPING_FORMULAS = """
def forever(df):
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


#: A formula that forks a process which sleeps; it returns once the process wrote its pid.
FORKING_FORMULAS = """
import os
import time

def forks(df):
    if os.fork() == 0:
        {leave_group}
        with open("child.tmp", "w") as f:
            f.write(str(os.getpid()))
        os.rename("child.tmp", "child")
        time.sleep(600)
        os._exit(0)
    while not os.path.exists("child"):
        time.sleep(0.01)
    return 7
"""


async def forked_child(case: TestCase, message: Message) -> int:
    """The pid of the process a job of ``FORKING_FORMULAS`` forked, killed after the test."""
    path = os.path.join(message["Directory"], "child")
    await wait_until(lambda: os.path.exists(path), "the start of the forked process")
    with open(path) as f:
        child = int(f.read())
    case.addCleanup(end, child)
    return child


class OutputLogTests(SynchronousTestCase):
    """What a job printed, kept to a limit: its beginning and its end."""

    def test_shortOutputIsKeptWhole(self) -> None:
        """Output within the limit comes back exactly as printed, across several writes."""
        log = OutputLog(limit=100)
        log.append(b"first line\n")
        log.append("second line \N{DEGREE SIGN}C\n".encode())
        self.assertEqual(log.text(), "first line\nsecond line \N{DEGREE SIGN}C\n")

    def test_longOutputKeepsHeadAndTail(self) -> None:
        """Output over the limit keeps its first and last halves and says how much was cut."""
        log = OutputLog(limit=10)
        log.append(b"0123456789")
        log.append(b"ABCDEFGHIJ")
        self.assertEqual(log.text(), "01234\n[... 10 bytes cut ...]\nFGHIJ")

    def test_nothingPrinted(self) -> None:
        """A job that printed nothing has an empty log."""
        self.assertEqual(OutputLog().text(), "")


class DescribeExitTests(SynchronousTestCase):
    """How the end of a worker process is told to a user."""

    def test_exitCode(self) -> None:
        """A process that exited says its exit code."""
        self.assertEqual(
            describe_exit(Failure(ProcessTerminated(exitCode=3))), "exited with code 3"
        )
        self.assertEqual(describe_exit(Failure(ProcessDone(0))), "exited with code 0")

    def test_signal(self) -> None:
        """A process killed by a signal says the signal's number and name."""
        self.assertEqual(
            describe_exit(Failure(ProcessTerminated(signal=11))),
            "was killed by signal 11 (SIGSEGV)",
        )

    def test_unknownSignal(self) -> None:
        """A signal number without a name is still told, as unknown."""
        self.assertEqual(
            describe_exit(Failure(ProcessTerminated(signal=99))),
            "was killed by signal 99 (unknown)",
        )


class WorkerEnvironmentTests(SynchronousTestCase):
    """The environment a worker process gets."""

    def test_onlyWhatPythonNeeds(self) -> None:
        """The server's own variables (secrets) are not passed on; TMPDIR is the worker's folder."""
        env = worker_environment({"PATH": "/bin", "MEASURING_TOKEN": "secret", "TZ": "UTC"}, "/w")
        self.assertNotIn("MEASURING_TOKEN", env)
        self.assertNotIn("secret", env.values())
        self.assertEqual((env["PATH"], env["TMPDIR"], env["TZ"]), ("/bin", "/w", "UTC"))


class WorkerPoolJobTests(TestCase):
    """A job run in a real worker process: its answer, its failures, its end."""

    timeout = 60

    async def test_jobAnswersResultsAndLog(self) -> None:
        """A job answers every formula's result, right, and what the formulas printed as Log."""
        pool = start_pool(self)
        message = job_message(self, NOISY_FORMULAS)
        answer = await pool.run(message).result

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
            ("Series", "results/job-1/mean_by_sensor.parquet", 3, ["value"], ["sensor"]),
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
        error = await job_error(running, JobFailed)
        self.assertEqual(error.code, "JobFailed")
        self.assertIn("'broken'", error.message)
        self.assertIn("ZeroDivisionError", error.message)
        self.assertIn("Traceback", error.extra["Log"])

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
        """A process a formula forks and leaves sleeping is killed when the job ends."""
        pool = start_pool(self)
        message = job_message(self, FORKING_FORMULAS.format(leave_group="pass"))
        running = pool.run(message)
        child = await forked_child(self, message)
        await wait_until(lambda: running.result.called, "the job's answer")
        answer = await running.result
        self.assertEqual(answer["Results"]["forks"], {"Kind": "Scalar", "Value": 7})
        await wait_until(lambda: gone(child), f"the end of the forked process {child}")

    async def test_processThatLeavesTheGroupDoesNotHoldTheJob(self) -> None:
        """A forked process that leaves the worker's process group does not keep its job open."""
        pool = start_pool(self)
        message = job_message(self, FORKING_FORMULAS.format(leave_group="os.setsid()"))
        running = pool.run(message)
        await forked_child(self, message)
        await wait_until(lambda: running.result.called, "the job's answer", patience=10)
        answer = await running.result
        self.assertEqual(answer["Results"]["forks"], {"Kind": "Scalar", "Value": 7})

    async def test_killStopsTheJobWithTheReason(self) -> None:
        """Killing a job that loops forever fails it with the reason and ends its process."""
        pool = start_pool(self)
        message = job_message(self, LOOPING_FORMULAS)
        running = await start_looping(pool, message)
        pid = busy_pid(pool, "job-1")
        assert pid is not None
        reason = Timeout("the job ran longer than its limit of 5 s and was stopped")
        running.kill(reason)
        error = await job_error(running, Timeout)
        self.assertIs(error, reason)
        self.assertTrue(gone(pid), f"worker process {pid} still runs")

    def test_killWaitingJob(self) -> None:
        """Killing a job still waiting for a worker fails it at once with the reason."""
        pool = start_pool(self)
        running = pool.run(job_message(self, FORMULAS))
        reason = Cancelled("the job was cancelled")
        running.kill(reason)
        self.assertIs(self.failureResultOf(running.result, Cancelled).value, reason)
        self.assertEqual(pool.processes()[0].job, None)

    async def test_replacementRunsTheNextJob(self) -> None:
        """After a job its worker process ends, and a new one runs the next job."""
        pool = start_pool(self)
        await wait_until(lambda: pool.ready_count == 1, "a ready worker")
        [first] = pool.processes()
        message = job_message(self, FORMULAS)
        answer = await pool.run(message).result
        self.assertEqual(answer["Results"]["count"]["Value"], 10_000)
        self.assertTrue(gone(first.pid), f"worker process {first.pid} still runs")

        second = await pool.run({**message, "Job": "job-2"}).result
        self.assertEqual(second["Results"]["count"]["Value"], 10_000)
        self.assertTrue(os.path.isdir(os.path.join(message["Directory"], "results", "job-2")))

    async def test_stopEndsEveryWorker(self) -> None:
        """Stopping the pool ends every worker process and cancels its running and waiting jobs."""
        pool = start_pool(self)
        message = job_message(self, LOOPING_FORMULAS)
        running = await start_looping(pool, message)
        waiting = pool.run({**message, "Job": "job-2"})
        pids = [worker.pid for worker in pool.processes()]

        await pool.stopService()

        self.assertEqual([pid for pid in pids if not gone(pid)], [])
        self.assertEqual(pool.processes(), [])
        for job in (running, waiting):
            error = self.failureResultOf(job.result, Cancelled).value
            self.assertEqual(error.message, "the server is stopping")


class WorkerPoolStartTests(TestCase):
    """Worker processes that cannot start."""

    timeout = 60

    async def test_workerThatCannotStartFailsWaitingJobs(self) -> None:
        """After three failed starts (retried after 1 s, then 2 s) waiting jobs fail: Internal."""
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
