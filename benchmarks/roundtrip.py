"""
Round-trip figures of a real server: not a test, a report.

    python benchmarks/roundtrip.py [--jobs 50]

Starts ``twistd -n measuring`` on a free loopback port with warm workers, then measures from the
client's side: an Info Status request, a trivial Dask job (one scalar formula on a small Parquet
file) run back to back, and Status while a CPU-bound job runs. Prints median and 95th percentile.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from measuring.local import LocalServer
from measuring.test.support import sample_frame, write_dataset, write_formulas

FORMULAS = """
import time


def peak(df):
    return df.value.max()


def spin(df):
    end = time.monotonic() + 3
    while time.monotonic() < end:
        pass
    return 0
"""


def _report(name: str, seconds: list[float]) -> None:
    ordered = sorted(seconds)
    p95 = ordered[max(0, int(len(ordered) * 0.95) - 1)]
    print(
        f"{name:<34} n={len(seconds):<4} median {statistics.median(seconds) * 1000:7.1f} ms"
        f"   p95 {p95 * 1000:7.1f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=50)
    args = parser.parse_args()
    folder = os.path.realpath(tempfile.mkdtemp(prefix="measuring-bench-"))
    write_dataset(folder, frame=sample_frame(rows=10_000))
    write_formulas(folder, FORMULAS)
    server = LocalServer(folder, "--data-root", folder, "--workers", "2")
    try:
        server.wait_until_ready()
        job = {
            "Header": "Dask",
            "Request": {
                "Directory": folder,
                "Base": "time_series.parquet",
                "File": "work.py",
                "Functions": ["peak"],
            },
        }
        status = {"Header": "Info", "Request": "Status"}
        with server.connect() as connection:
            times = []
            for _ in range(200):
                start = time.perf_counter()
                connection.ask(status)
                times.append(time.perf_counter() - start)
            _report("Info Status", times)
            times = []
            for _ in range(args.jobs):
                server.wait_until_ready()
                start = time.perf_counter()
                answer = connection.ask(job)
                times.append(time.perf_counter() - start)
                assert answer["Status"] == "OK", answer
            _report("trivial Dask job (warm worker)", times)
            server.wait_until_ready()
            connection.send({**job, "Request": {**job["Request"], "Functions": ["spin"]}})
            with server.connect() as other:
                times = []
                for _ in range(100):
                    start = time.perf_counter()
                    other.ask(status)
                    times.append(time.perf_counter() - start)
            _report("Info Status during a CPU-bound job", times)
            connection.receive()
    finally:
        server.stop()


if __name__ == "__main__":
    main()
