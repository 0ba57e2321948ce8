"""
``/metrics``: the server's counters and gauges in Prometheus' text format (or OpenMetrics, when
the scraper asks for it), through ``prometheus_client``.

Each scrape reads what the server keeps in memory anyway: ``Stats`` (answers, jobs by state,
time histograms), the scheduler's queue and running jobs, the pool's workers, the open
connections. It renders on the reactor thread (the scheduler's and the pool's state belong to
it) and costs microseconds: no job database query, no process scan. (prometheus_client's own
Twisted resource renders in a thread of the reactor's pool, which would read that state from
another thread, so it is not used.)
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

from prometheus_client import GCCollector, ProcessCollector
from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from twisted.web.resource import Resource
from twisted.web.server import Request

from measuring import __version__
from measuring.server.stats import Histogram, Stats
from measuring.wire import STATES, WAITING

#: The states a worker process is in, as the pool says.
WORKER_STATES = ("template", "busy")


class JobCounts(Protocol):
    """What the scheduler says of its jobs (``Scheduler.counts``)."""

    def counts(self) -> dict[str, int]: ...


class Workers(Protocol):
    """What the pool says of its processes (``WorkerPool.processes``)."""

    def processes(self) -> Iterable[Any]: ...


def _buckets(histogram: Histogram) -> list[tuple[str, float]]:
    return [(floatToGoString(bound), count) for bound, count in histogram.cumulative()]


class ServerCollector(Collector):
    """The server's metrics, read at each scrape from what it holds in memory."""

    def __init__(
        self,
        stats: Stats,
        jobs: JobCounts,
        workers: Workers,
        connections: Callable[[], int],
    ) -> None:
        self._stats = stats
        self._jobs = jobs
        self._workers = workers
        self._connections = connections

    def describe(self) -> list[Metric]:
        # No description ahead: the registry need not collect at registration.
        return []

    def collect(self) -> Iterator[Metric]:
        stats = self._stats
        build = GaugeMetricFamily(
            "measuring_build_info", "The version of measuring serving.", labels=["version"]
        )
        build.add_metric([__version__], 1)
        yield build

        requests = CounterMetricFamily(
            "measuring_requests",
            "Answers given since the start, by the request's Header and the answer's Code "
            "(OK when it is no error); HTTP API requests count as the protocol requests they are.",
            labels=["header", "code"],
        )
        for (header, code), n in sorted(stats.answers.items()):
            requests.add_metric([header, code], n)
        yield requests

        entered = CounterMetricFamily(
            "measuring_jobs",
            "Jobs that entered each state since the start (queued: accepted or queued again).",
            labels=["state"],
        )
        for state in STATES:
            entered.add_metric([state], stats.jobs.get(state, 0))
        yield entered

        counts = self._jobs.counts()
        # Not "measuring_jobs": in OpenMetrics that is the family of measuring_jobs_total.
        now = GaugeMetricFamily(
            "measuring_jobs_current", "Jobs waiting in the queue and running now.",
            labels=["state"],
        )  # fmt: skip
        for state in WAITING:
            now.add_metric([state], counts[state.capitalize()])
        yield now

        for name, histogram, what in (
            ("measuring_job_duration_seconds", stats.ran,
             "How long jobs ran, from leaving the queue to their end, for jobs that started."),
            ("measuring_job_queue_wait_seconds", stats.waited,
             "How long jobs waited in the queue before they started."),
        ):  # fmt: skip
            family = HistogramMetricFamily(name, what)
            family.add_metric([], _buckets(histogram), histogram.sum)
            yield family

        states = Counter(worker.state for worker in self._workers.processes())
        workers = GaugeMetricFamily(
            "measuring_workers",
            "Worker processes by state: template (the process job processes are forked from), "
            "busy (a job process running its job).",
            labels=["state"],
        )
        for state in WORKER_STATES:
            workers.add_metric([state], states.get(state, 0))
        yield workers

        yield GaugeMetricFamily(
            "measuring_connections",
            "Client connections open now on the protocol's ports.",
            value=self._connections(),
        )


def registry(collector: ServerCollector) -> CollectorRegistry:
    """A registry of the server's own (not prometheus_client's global one)."""
    held = CollectorRegistry(auto_describe=False)
    held.register(collector)
    # The process' CPU, memory and open files from /proc/self, and the interpreter's GC: cheap.
    ProcessCollector(registry=held)
    GCCollector(registry=held)
    return held


class MetricsPage(Resource):
    """``/metrics``, rendered on the reactor thread in the format the scraper accepts."""

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self._registry = registry

    def render_GET(self, request: Request) -> bytes:
        accept = (request.getHeader(b"accept") or b"").decode("latin-1")
        encoder, content_type = choose_encoder(accept)
        request.setHeader(b"content-type", content_type.encode())
        request.setHeader(b"cache-control", b"no-store")
        return encoder(self._registry)
