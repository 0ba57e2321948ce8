"""
What the benchmarks share: a real server to measure, peak memory of process trees, tables.

Not a test and not part of the ``measuring`` package: the scripts beside it import it by name
(``python benchmarks/large.py`` puts this folder first on ``sys.path``). It puts the checkout
that holds it on ``sys.path`` too, so the benchmarks measure this checkout's server.
"""

from __future__ import annotations

import atexit
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, CHECKOUT)

import psutil  # noqa: E402

from measuring.local import LocalServer  # noqa: E402

MiB = 2**20


def parse_count(text: str) -> int:
    """``20M``, ``1.2M``, ``500k`` or ``1000`` as a whole number."""
    text = text.strip().lower().replace("_", "")
    scale = {"k": 10**3, "m": 10**6, "g": 10**9}.get(text[-1:], 1)
    number = text[:-1] if scale != 1 else text
    return int(float(number) * scale)


def count_label(rows: int) -> str:
    """``20M``, ``1.2M``, ``200k``: a row count as the tables name it."""
    for scale, suffix in ((10**6, "M"), (10**3, "k")):
        if rows >= scale:
            return f"{rows / scale:g}{suffix}"
    return str(rows)


def mib(size: float | None) -> str:
    return "—" if not size else f"{size / MiB:,.0f} MiB"


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def percentile(values: Sequence[float], fraction: float) -> float:
    """The value below which ``fraction`` of ``values`` lie (nearest rank)."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(fraction * len(ordered)) - 1))]


def markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A markdown table, its columns padded so it reads in a terminal too."""
    table = [list(header), *[list(row) for row in rows]]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = [
        "| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) + " |"
        for row in table
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def machine() -> dict[str, str]:
    """What the figures were taken on."""
    import dask
    import pandas
    import pyarrow

    versions = {
        "python": platform.python_version(),
        "dask": dask.__version__,
        "pandas": pandas.__version__,
        "pyarrow": pyarrow.__version__,
    }
    for name in ("polars", "duckdb"):
        with suppress(ImportError):
            versions[name] = __import__(name).__version__
    return {
        "cores": str(os.cpu_count()),
        "memory": f"{psutil.virtual_memory().total / 2**30:.1f} GiB",
        "system": f"{platform.system()} {platform.release()} {platform.machine()}",
        "versions": ", ".join(f"{k} {v}" for k, v in versions.items()),
        "load": "load average " + " ".join(f"{x:.1f}" for x in os.getloadavg()),
    }


def print_machine() -> None:
    for key, value in machine().items():
        print(f"- {key}: {value}")


def print_load() -> None:
    """The load average now, to print after a table (the machine may be shared)."""
    print(f"\nThe machine's {machine()['load']} at the end.")


# -- peak memory


def tree_usage(process: psutil.Process) -> tuple[int, float] | None:
    """
    Resident memory (bytes) and CPU time (seconds, its reaped children's included) of
    ``process`` and every process below it; None once it has gone.
    """
    try:
        processes = [process, *process.children(recursive=True)]
        times = process.cpu_times()
    except psutil.Error:
        return None
    rss, cpu = 0, times.children_user + times.children_system
    for each in processes:
        try:
            rss += each.memory_info().rss
            times = each.cpu_times()
        except psutil.Error:
            continue
        cpu += times.user + times.system
    return rss, cpu


class PeakSampler:
    """
    Samples the resident memory and CPU time of process trees in a thread, every ``interval``
    seconds.

    ``roots()`` gives the processes whose trees are watched (each tree summed on its own);
    ``peak`` is the largest sum seen for any one of them, ``cpu`` the CPU seconds that tree used
    between its first and its last sample.
    """

    def __init__(self, roots: Callable[[], list[psutil.Process]], interval: float = 0.02) -> None:
        self._roots = roots
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.peaks: dict[int, int] = {}
        self._cpu: dict[int, tuple[float, float]] = {}

    @property
    def peak(self) -> int:
        return max(self.peaks.values(), default=0)

    @property
    def cpu(self) -> float:
        if not self.peaks:
            return 0.0
        first, last = self._cpu[max(self.peaks, key=self.peaks.__getitem__)]
        return last - first

    def _run(self) -> None:
        while True:
            for root in self._roots():
                usage = tree_usage(root)
                if usage is not None:
                    self.peaks[root.pid] = max(usage[0], self.peaks.get(root.pid, 0))
                    first = self._cpu[root.pid][0] if root.pid in self._cpu else usage[1]
                    self._cpu[root.pid] = (first, usage[1])
            if self._stop.wait(self._interval):
                return

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()


def job_processes(local: LocalServer) -> Callable[[], list[psutil.Process]]:
    """
    The processes running jobs on ``local``, as its Info "Dask process" names them: asked at each
    sample until a job has started, then the same ones (a job keeps its process). Not the
    server's other processes: an idle warm worker, or the template the job was forked from.
    """
    found: list[psutil.Process] = []

    def roots() -> list[psutil.Process]:
        if not found:
            answer = local.ask({"Header": "Info", "Request": "Dask process"})
            for entry in answer.get("Response", {}).get("Processes", []):
                with suppress(psutil.Error):
                    found.append(psutil.Process(entry["Pid"]))
        return found

    return roots


@dataclass
class Run:
    """One measured run: seconds of work, peak memory, CPU seconds, what the run reported."""

    seconds: float | None
    peak: int
    cpu: float | None = None
    wall: float | None = None
    report: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


def run_python(arguments: list[str], timeout: float = 3600.0) -> Run:
    """
    Run ``python ARGUMENTS`` in a fresh process, sampling its tree's memory.

    The process prints one JSON line last: ``seconds`` of work (imports excluded), ``cpu``
    seconds the work took, and anything else it reports; ``maxrss`` (its own peak, in bytes)
    raises the sampled peak if higher.
    """
    start = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, *arguments], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    watched = psutil.Process(process.pid)
    with PeakSampler(lambda: [watched]) as sampler:
        out, err = process.communicate(timeout=timeout)
    wall = time.perf_counter() - start
    lines = out.strip().splitlines()
    if process.returncode != 0 or not lines:
        last = (err.strip().splitlines() or [f"exited with code {process.returncode}"])[-1]
        return Run(None, sampler.peak, wall=wall, error=last[:120])
    report = json.loads(lines[-1])
    if report.get("error"):
        return Run(None, sampler.peak, wall=wall, error=report["error"])
    peak = max(sampler.peak, int(report.get("maxrss", 0)))
    return Run(report["seconds"], peak, report.get("cpu"), wall, report)


def summarize(runs: list[Run]) -> Run:
    """The median time and CPU and the highest peak of repeated runs (the first error, if any)."""
    failed = [run for run in runs if run.error]
    if failed:
        return failed[0]

    def middle(values: list[float | None]) -> float | None:
        known = [value for value in values if value is not None]
        return median(known) if known else None

    return Run(
        middle([run.seconds for run in runs]),
        max(run.peak for run in runs),
        middle([run.cpu for run in runs]),
        middle([run.wall for run in runs]),
        runs[-1].report,
    )


def temporary_folder() -> str:
    """A new folder for one run's data, removed when the script exits."""
    folder = os.path.realpath(tempfile.mkdtemp(prefix="measuring-bench-"))
    atexit.register(shutil.rmtree, folder, True)
    return folder


# -- the server


@contextmanager
def server(folder: str, *arguments: str) -> Iterator[LocalServer]:
    """A real ``twistd -n measuring`` serving ``folder``, warmed up; stopped afterwards."""
    local = LocalServer(folder, "--data-root", folder, *arguments, patience=120.0)
    try:
        local.wait_until_ready()
        yield local
    finally:
        local.stop()


def settle(local: LocalServer) -> None:
    """Wait until the server's workers are warm and idle, so they do not compete with a run."""
    local.wait_until_ready()
    time.sleep(0.2)
