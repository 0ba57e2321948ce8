"""
Round trips of a real server, as a client sees them: a report, not a test.

    python benchmarks/roundtrip.py [--jobs 20] [--clients 4] [--per-client 10] [--workers 2]

Starts ``twistd -n measuring --workers 2`` on a free loopback port and measures, through
``measuring.client.Client``, with a trivial job (one scalar formula over 10,000 rows):

- an Info Status request, and Status while a CPU-bound job runs;
- one job on an idle server whose workers are warm (waiting for that before each job);
- ``--jobs`` jobs back to back on one connection, *without* waiting for warm workers: what a
  user looping over files, one job each, waits;
- ``--clients`` clients sending ``--per-client`` jobs each, all at once: jobs per second;
- the memory of what waits for jobs on an idle server: warm workers, or the template job
  processes are forked from (Info "All process").
"""

from __future__ import annotations

import argparse
import threading
import time

import harness
from harness import median, percentile

from measuring.client import Client
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
BASE, FILE = "time_series.parquet", "work.py"


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def _latencies(name: str, seconds: list[float]) -> list[str]:
    return [
        name,
        str(len(seconds)),
        _ms(median(seconds)),
        _ms(percentile(seconds, 0.95)),
        _ms(max(seconds)),
    ]


def _job(client: Client, folder: str, formula: str = "peak") -> float:
    start = time.perf_counter()
    job = client.run(folder, BASE, FILE, functions=[formula])
    seconds = time.perf_counter() - start
    assert job.results[formula].kind == "Scalar", job.results
    return seconds


def status_times(client: Client, count: int) -> list[float]:
    times = []
    for _ in range(count):
        start = time.perf_counter()
        client.status()
        times.append(time.perf_counter() - start)
    return times


def at_once(port: int, folder: str, clients: int, per_client: int) -> tuple[float, list[float]]:
    """``clients`` clients, each running ``per_client`` jobs one after the other, all at once:
    the wall time of them all, and each job's time."""
    times: list[float] = []
    ready = threading.Barrier(clients + 1)

    def one_client() -> None:
        with Client("127.0.0.1", port, timeout=300.0) as client:
            client.status()  # connected before the clock starts
            ready.wait()
            for _ in range(per_client):
                times.append(_job(client, folder))

    threads = [threading.Thread(target=one_client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    ready.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    return time.perf_counter() - start, times


def idle_processes(client: Client) -> str:
    """The server's processes waiting for jobs (warm workers, or the template) and their memory."""
    tree = client.info("All process")["Service"]["Tree"]
    idle = [entry for entry in tree if entry.get("Role") not in ("server", "job", "child")]
    return ", ".join(f"{entry['Role']} {harness.mib(entry['Rss'])}" for entry in idle) or "none"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=20, help="jobs back to back (20)")
    parser.add_argument("--idle", type=int, default=10, help="jobs on an idle server (10)")
    parser.add_argument("--clients", type=int, default=4, help="clients at once (4)")
    parser.add_argument("--per-client", type=int, default=10, help="jobs per client (10)")
    parser.add_argument("--workers", type=int, default=2, help="the server's --workers (2)")
    args = parser.parse_args()
    folder = harness.temporary_folder()
    write_dataset(folder, frame=sample_frame(rows=10_000))
    write_formulas(folder, FORMULAS)
    print(f"## Round trips, --workers {args.workers}, trivial job over 10,000 rows\n")
    harness.print_machine()
    rows = []
    with (
        harness.server(folder, "--workers", str(args.workers)) as local,
        Client("127.0.0.1", local.port, timeout=300.0) as client,
    ):
        rows.append(_latencies("Info Status", status_times(client, 200)))
        idle = []
        for _ in range(args.idle):
            harness.settle(local)
            idle.append(_job(client, folder))
        rows.append(_latencies("one job on an idle server", idle))
        harness.settle(local)
        memory = idle_processes(client)
        rows.append(
            _latencies(
                f"{args.jobs} jobs back to back, one connection",
                [_job(client, folder) for _ in range(args.jobs)],
            )
        )
        harness.settle(local)
        wall, times = at_once(local.port, folder, args.clients, args.per_client)
        rows.append(_latencies(f"{args.clients} clients x {args.per_client} jobs at once", times))
        harness.settle(local)
        busy = Client("127.0.0.1", local.port, timeout=300.0)
        spinning = threading.Thread(target=_job, args=(busy, folder, "spin"))
        spinning.start()
        time.sleep(1.0)  # the job is running: its worker was warm
        rows.append(_latencies("Info Status during a CPU-bound job", status_times(client, 50)))
        spinning.join()
        busy.close()
    print()
    print(harness.markdown(["what", "n", "p50", "p95", "max"], rows))
    jobs = args.clients * args.per_client
    print(
        f"\n{args.clients} clients x {args.per_client} jobs: {jobs / wall:.1f} jobs/s "
        f"({jobs} jobs in {wall:.2f} s)"
    )
    print(f"resident memory of the idle server's processes beside the reactor: {memory}")
    harness.print_load()


if __name__ == "__main__":
    main()
