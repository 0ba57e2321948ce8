"""
Threads per job (``--job-threads``) with ``--workers`` jobs sharing the machine: a report, not a
test.

    python benchmarks/threads.py [--threads 1,2,3] [--rows 20M] [--workers 2] [--repeat 3]
                                 [--data FOLDER]

Runs the 20M-row groupby of ``large.py`` (its data, made in ``--data`` when missing) through a
real server for each ``--job-threads`` value: one job alone, then ``--workers`` jobs at once, each
from a client of its own. Prints the median seconds of ``--repeat`` runs of each: what the
setting's default (``auto``: the machine's cores) should be is the fastest row when jobs share
the cores.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time

import harness
from large import FORMULA_FILE, FORMULAS, dataset

from measuring.client import Client

FORMULA = "mean_by_sensor"


def _job(port: int, folder: str, base: str) -> None:
    Client("127.0.0.1", port, timeout=3600.0).run(folder, base, FORMULA_FILE, functions=[FORMULA])


def at_once(port: int, folder: str, base: str, jobs: int) -> float:
    """Seconds until ``jobs`` jobs sent at once, each by a client of its own, have all ended."""
    clients = [threading.Thread(target=_job, args=(port, folder, base)) for _ in range(jobs)]
    start = time.perf_counter()
    for client in clients:
        client.start()
    for client in clients:
        client.join()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", default="1,2,3", help="--job-threads values (1,2,3)")
    parser.add_argument("--rows", type=harness.parse_count, default=20_000_000)
    parser.add_argument("--workers", type=int, default=2, help="jobs at once (2)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each; the median")
    parser.add_argument("--data", help="folder for the data, kept between runs (a temp folder)")
    args = parser.parse_args()
    folder = os.path.realpath(args.data or os.path.join(tempfile.gettempdir(), "measuring-bench"))
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, FORMULA_FILE), "w") as f:
        f.write(FORMULAS)
    base = dataset(folder, args.rows, 1_000_000)
    size = harness.count_label(args.rows)
    print(f"## Threads per job: {size}-row groupby, --workers {args.workers}\n")
    harness.print_machine()
    print()
    rows = []
    for threads in args.threads.split(","):
        options = ("--workers", str(args.workers), "--job-threads", threads)
        with harness.server(folder, *options) as local:
            _job(local.port, folder, base)  # the file in the page cache, the template warm
            alone = [at_once(local.port, folder, base, 1) for _ in range(args.repeat)]
            shared = [at_once(local.port, folder, base, args.workers) for _ in range(args.repeat)]
        rows.append([threads, f"{harness.median(alone):.2f} s", f"{harness.median(shared):.2f} s"])
    header = ["--job-threads", "one job alone", f"{args.workers} jobs at once"]
    print(harness.markdown(header, rows))
    print()
    harness.print_load()


if __name__ == "__main__":
    main()
