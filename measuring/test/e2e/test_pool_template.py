"""
Tests for the template process behind ``measuring.server.pool.pool.WorkerPool``: it has one
thread, both Parquet engines read right in the job processes it forks, each job process has its
own random state, and no job is lost when the template is killed, while jobs run or wait. Real
processes and the real reactor, as in ``test_pool_workers``.
"""

from __future__ import annotations

import os
import signal

import pandas as pd
from twisted.trial.unittest import TestCase

from measuring.test.e2e.test_pool_workers import job_message, job_results, start_pool, wait_until
from measuring.test.support import FORMULAS, gone, sample_frame

#: A formula that notes each run of it; the first run waits (for the template to be killed).
RERUN_FORMULAS = """
import os
import time

def runs(df):
    with open("runs", "a") as f:
        f.write("run\\n")
    with open("runs") as f:
        count = len(f.readlines())
    if count == 1:
        open("started", "w").close()
        while True:
            time.sleep(0.05)
    return count
"""

#: What a job process sees of its own: numpy's global random numbers and its thread count.
RANDOM_FORMULAS = """
import numpy as np

def draw(df):
    return float(np.random.random())
"""


class TemplateTests(TestCase):
    """The template: one thread, and job processes forked from it that compute right."""

    timeout = 90

    async def test_oneThread(self) -> None:
        """The template process has exactly one thread, also after forking job processes."""
        pool = start_pool(self)
        await wait_until(lambda: pool.template_state == "ready", "a ready template")
        [template] = pool.processes()
        self.assertEqual(os.listdir(f"/proc/{template.pid}/task"), [str(template.pid)])
        answer = await job_results(pool.run(job_message(self, FORMULAS)))
        self.assertEqual(answer["Results"]["count"]["Value"], 10_000)
        self.assertEqual(len(os.listdir(f"/proc/{template.pid}/task")), 1)

    async def test_bothEnginesReadRightInForkedProcesses(self) -> None:
        """pyarrow and fastparquet, in job processes forked give pandas' means."""
        pool = start_pool(self)
        expected = sample_frame().groupby("sensor").value.mean()
        for engine in ("pyarrow", "fastparquet", "pyarrow", "fastparquet"):
            message = job_message(self, FORMULAS, engine=engine, row_group_size=2500)
            answer = await job_results(pool.run(message))
            means = answer["Results"]["mean_by_sensor"]
            written = pd.read_parquet(os.path.join(message["Directory"], means["File"]))
            pd.testing.assert_series_equal(written["value"], expected, check_exact=False)
            self.assertEqual(answer["Results"]["count"]["Value"], 10_000)

    async def test_ownRandomNumbers(self) -> None:
        """numpy's global random numbers differ from one job process to the next."""
        pool = start_pool(self)
        draws = set()
        for _ in range(3):
            answer = await job_results(pool.run(job_message(self, RANDOM_FORMULAS)))
            draws.add(answer["Results"]["draw"]["Value"])
        self.assertEqual(len(draws), 3)


class TemplateKilledTests(TestCase):
    """Killing the template loses no job: the running ones run again, the waiting ones wait."""

    timeout = 120

    async def test_killedWhileAJobRuns(self) -> None:
        """A job running when the template is killed runs again in the next template, and ends."""
        pool = start_pool(self)
        message = job_message(self, RERUN_FORMULAS)
        running = pool.run(message)
        started = os.path.join(message["Directory"], "started")
        await wait_until(lambda: os.path.exists(started), "the first run of the job")
        [template] = [info for info in pool.processes() if info.state == "template"]
        assert running.process is not None and running.process.pid is not None
        first = running.process.pid
        os.kill(template.pid, signal.SIGKILL)
        answer = await job_results(running)
        self.assertEqual(answer["Results"]["runs"], {"Kind": "Scalar", "Value": 2})
        self.assertTrue(gone(first), f"the first job process {first} still runs")
        [again] = [info for info in pool.processes() if info.state == "template"]
        self.assertNotEqual(again.pid, template.pid)

    async def test_killedWhileJobsWait(self) -> None:
        """Jobs sent while the template is down wait for the next one, and run."""
        pool = start_pool(self)
        await wait_until(lambda: pool.template_state == "ready", "a ready template")
        [template] = pool.processes()
        os.kill(template.pid, signal.SIGKILL)
        await wait_until(lambda: pool.template_state != "ready", "the template's end")
        jobs = [pool.run(job_message(self, FORMULAS)) for _ in range(2)]
        for job in jobs:
            answer = await job_results(job)
            self.assertEqual(answer["Results"]["count"]["Value"], 10_000)
        self.assertEqual(pool.template_state, "ready")
