"""
The formula files several test modules write: their sources, as text, and nothing else.

``FORMULAS`` is the plain ``work.py`` over the sample data; ``LIFECYCLE_FORMULAS`` can be held,
loop, hoard memory or leave processes behind; ``CLIENT_FORMULAS`` are the files the client and
``measuring-client`` are run on; ``HOSTILE_FORMULAS`` crash their worker or outlive their job;
``CLUSTER_FORMULAS`` say which dask.distributed worker computed them, and can be held there.
"""

from __future__ import annotations

FORMULAS = '''
def mean_by_sensor(df):
    """The mean value of each sensor."""
    return df.groupby("sensor").value.mean()


def peak(df):
    return df.value.max()


def hourly(df):
    return df.set_index("time", sorted=True).value.resample("1h").mean()


def count(df):
    return len(df)


def _helper(df):
    return 0
'''

#: What ``FORMULAS`` defines, in order (``_helper`` is private).
FORMULA_NAMES = ["mean_by_sensor", "peak", "hourly", "count"]

LIFECYCLE_FORMULAS = '''
import os
import subprocess
import time


def _job():
    return os.environ["MEASURING_JOB"]


def _note(event):
    """Write the time of ``event`` (start, end) into times/<job>.<event>."""
    os.makedirs("times", exist_ok=True)
    path = os.path.join("times", f"{_job()}.{event}")
    with open(path + ".new", "w") as f:
        f.write(repr(time.time()))
    os.replace(path + ".new", path)


def mean_by_sensor(df):
    print(f"mean_by_sensor ran in job {_job()}")
    return df.groupby("sensor").value.mean()


def minutely(df):
    return df.set_index("time", sorted=True).value.resample("1min").mean()


def total(df):
    return df.value.sum()


def held(df):
    """Runs while the file "hold" exists, until "release-<job>" appears (a minute at most)."""
    _note("start")
    deadline = time.monotonic() + 60
    while (
        os.path.exists("hold")
        and not os.path.exists(f"release-{_job()}")
        and time.monotonic() < deadline
    ):
        time.sleep(0.02)
    _note("end")
    return len(df)


def spin(df):
    while True:
        time.sleep(0.01)


def hog(df):
    """Takes 8 MiB more every 20 ms (up to 4 GiB), and never returns."""
    chunks = []
    while True:
        if len(chunks) < 512:
            chunks.append(b"x" * (8 * 2**20))
        time.sleep(0.02)


def escape(df):
    """Starts two "sleep 300" that leave the job's process group; returns their pids."""
    sleeper = subprocess.Popen(["sleep", "300"], start_new_session=True)
    child = os.fork()
    if child == 0:
        try:
            os.setsid()
            os.execvp("sleep", ["sleep", "300"])
        finally:
            os._exit(127)
    return f"{sleeper.pid} {child}"
'''

_CLIENT_WORK = '''
def mean_by_sensor(df):
    """The mean value of each sensor."""
    return df.groupby("sensor").value.mean()


def stats(df):
    return df.groupby("sensor").value.agg(["count", "mean", "min", "max"])


def readings(df):
    return df[["sensor", "value"]]


def hourly(df):
    return df.set_index("time", sorted=True).value.resample("1h").mean()


def peak(df):
    return df.value.max()


def count(df):
    return len(df)
'''

_CLIENT_BAD = """
import time


def fail(df):
    print("about to divide")
    return len(df) / 0


def spin(df):
    print("spinning", flush=True)
    while True:
        time.sleep(0.01)
"""

_CLIENT_EMPTY = """
def none_high(df):
    return df[df.value > 1000]


def none_high_by_sensor(df):
    return df[df.value > 1000].groupby("sensor").value.mean()
"""

_CLIENT_SLOW = """
import time


def slow(df):
    def nap(part):
        time.sleep(1.5)
        return part

    return df.map_partitions(nap).value.count()
"""

CLIENT_FORMULAS = {
    "work.py": _CLIENT_WORK,
    "bad.py": _CLIENT_BAD,
    "empty.py": _CLIENT_EMPTY,
    "slow.py": _CLIENT_SLOW,
}

HOSTILE_FORMULAS = '''
import ctypes
import os
import subprocess
import time


def loop(df):
    while True:
        pass


def leave(df):
    os._exit(7)


def segfault(df):
    return ctypes.string_at(0)


def outlive(df):
    """Starts a process in a new session and forks one that makes its own; returns their pids."""
    sleeper = subprocess.Popen(["sleep", "600"], start_new_session=True)
    child = os.fork()
    if child == 0:
        os.setsid()
        time.sleep(600)
        os._exit(0)
    return f"{sleeper.pid} {child}"
'''

CLUSTER_FORMULAS = '''
import os
import time

import distributed
import pandas as pd

#: Held while this file exists. An absolute path: the cluster's workers run elsewhere.
HOLD = os.path.abspath("hold")


def workers(df):
    """The address of the cluster worker that computed each partition."""

    def where(part):
        time.sleep(0.1)
        return pd.Series([distributed.get_worker().address], name="address")

    # Small datasets are read as one partition: split it, so that every worker gets some.
    return df.repartition(npartitions=8).map_partitions(where, meta=("address", "object"))


def mean_by_sensor(df):
    return df.groupby("sensor").value.mean()


def peak(df):
    return df.value.max()


def count(df):
    return len(df)


def _double(part):
    return part.value * 2


def doubled(df):
    """A module-level function of this file in the tasks: it must travel by value too."""
    return df.map_partitions(_double, meta=("value", "f8")).sum()


def held(df):
    """Waits on the cluster's workers while HOLD exists (30 s at most)."""

    def wait(part):
        end = time.monotonic() + 30
        while os.path.exists(HOLD) and time.monotonic() < end:
            time.sleep(0.05)
        return part

    return df.map_partitions(wait, meta=df._meta).value.sum()


def broken(df):
    def divide(part):
        return pd.Series([len(part) // 0])

    return df.map_partitions(divide, meta=(None, "int64")).sum()
'''
