"""
Tests for what ``measuring.server.pool.pool.WorkerPool`` does with messages a formula forges on its
worker's reply pipe (file descriptor 4, which formulas can write to as well as the worker): the job
fails (not stuck running, not "done" with results the server cannot use), and the pool runs the next
job. Real job processes forked from a real template and the real reactor, as in
``test_pool_workers``.
"""

from __future__ import annotations

import os

from twisted.trial.unittest import TestCase

from measuring.errors import JobFailed
from measuring.messages import REPLY_FD
from measuring.server.pool.pool import WorkerPool
from measuring.test.e2e.test_pool_workers import (
    job_error,
    job_message,
    job_results,
    start_pool,
    wait_until,
)
from measuring.test.support import FORMULAS, gone

#: A formula that writes a Done message of the wrong shape where its worker answers, then exits.
FORGING_FORMULAS = f"""
import json
import os

def forge(df):
    forged = {{"Type": "Done", "Results": {{"x": 5}}}}
    os.write({REPLY_FD}, json.dumps(forged).encode() + b"\\n")
    os._exit(0)
"""

#: A formula that writes the same forged line, then goes on and returns as a formula does.
FORGING_THEN_RETURNING = f"""
import json
import os

def forge(df):
    os.write({REPLY_FD}, b'{{"Type": "Done", "Results": {{"x": 5}}}}\\n')
    return len(df)
"""


class ForgedMessageTests(TestCase):
    """A formula writing a badly shaped message on the reply pipe fails its own job only."""

    timeout = 60

    async def forged(self, pool: WorkerPool, source: str) -> JobFailed:
        """The error of a job of ``source``, whose worker must have ended with it."""
        running = pool.run(job_message(self, source))
        await wait_until(lambda: running.result.called, "the end of the forging job")
        error = await job_error(running, JobFailed)
        assert running.process is not None and running.process.pid is not None
        self.assertTrue(gone(running.process.pid), "the forging job process still runs")
        return error

    async def test_forgedDoneFailsTheJob(self) -> None:
        """A forged Done with a bad result fails the job, JobFailed; the next job runs fine."""
        pool = start_pool(self)
        for source in (FORGING_FORMULAS, FORGING_THEN_RETURNING):
            error = await self.forged(pool, source)
            self.assertEqual(
                error.message,
                "the job's process sent what the server cannot use: "
                "a result 'x' that is not a formula's result",
            )

        message = job_message(self, FORMULAS)
        answer = await job_results(pool.run(message))
        self.assertEqual(answer["Results"]["count"], {"Kind": "Scalar", "Value": 10_000})
        results = os.path.join(message["Directory"], "results", message["Job"])
        self.assertEqual(sorted(os.listdir(results)), ["hourly.parquet", "mean_by_sensor.parquet"])
