"""
Tests for ``measuring.server.web.metrics`` and the counters it reads (``measuring.server.stats``):
what a scrape says, parsed back with prometheus_client's own parsers, in both formats.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics
from twisted.trial.unittest import SynchronousTestCase

from measuring import __version__
from measuring.server.stats import Histogram, Stats
from measuring.server.web.metrics import ServerCollector, registry
from measuring.test.support.web import metric_samples


class Worker(NamedTuple):
    state: str


class Jobs:
    def __init__(self) -> None:
        self.now = {"Running": 1, "Queued": 3}

    def counts(self) -> dict[str, int]:
        return self.now


class Workers:
    def processes(self) -> list[Any]:
        return [Worker("busy"), Worker("busy"), Worker("template")]


class MetricsTests(SynchronousTestCase):
    """Counters moving with what happens; gauges from the parts' state; both formats parse."""

    def setUp(self) -> None:
        self.stats = Stats()
        self.registry = registry(ServerCollector(self.stats, Jobs(), Workers(), lambda: 7))

    def scrape(self, openmetrics_format: bool = False) -> dict[tuple[Any, ...], float]:
        from prometheus_client import generate_latest
        from prometheus_client.openmetrics.exposition import generate_latest as generate_om

        if openmetrics_format:
            return metric_samples(generate_om(self.registry).decode(), openmetrics)
        return metric_samples(generate_latest(self.registry).decode())

    def test_counters(self) -> None:
        """Answers by Header and Code, and jobs by state, count what happened."""
        self.stats.answered({"Header": "Info", "Status": "OK"})
        self.stats.answered({"Header": "Job", "Status": "Error", "Error": {"Code": "NotFound"}})
        self.stats.answered({"Header": "Job", "Status": "Error", "Error": {"Code": "NotFound"}})
        self.stats.answered({"Header": "a-made-up-header", "Status": "Error",
                             "Error": {"Code": "BadRequest"}})  # fmt: skip
        self.stats.job_queued()
        self.stats.job_started(2.0)
        self.stats.job_ended("failed", 0.4)
        got = self.scrape()
        self.assertEqual(got[("measuring_requests_total", (("code", "OK"), ("header", "Info")))], 1)
        self.assertEqual(
            got[("measuring_requests_total", (("code", "NotFound"), ("header", "Job")))], 2
        )
        # A Header a client made up is no label value: they would be without end.
        self.assertEqual(
            got[("measuring_requests_total", (("code", "BadRequest"), ("header", "Other")))], 1
        )
        for state, n in (("queued", 1), ("running", 1), ("failed", 1), ("done", 0)):
            self.assertEqual(got[("measuring_jobs_total", (("state", state),))], n, state)
        self.assertEqual(got[("measuring_job_duration_seconds_count", ())], 1)
        self.assertEqual(got[("measuring_job_duration_seconds_bucket", (("le", "0.5"),))], 1)
        self.assertEqual(got[("measuring_job_duration_seconds_bucket", (("le", "0.25"),))], 0)
        self.assertEqual(got[("measuring_job_queue_wait_seconds_sum", ())], 2.0)

    def test_gauges(self) -> None:
        """Jobs, workers and connections now, and the version."""
        got = self.scrape()
        self.assertEqual(got[("measuring_jobs_current", (("state", "queued"),))], 3)
        self.assertEqual(got[("measuring_jobs_current", (("state", "running"),))], 1)
        self.assertEqual(got[("measuring_workers", (("state", "busy"),))], 2)
        self.assertEqual(got[("measuring_workers", (("state", "template"),))], 1)
        self.assertEqual(got[("measuring_connections", ())], 7)
        self.assertEqual(got[("measuring_build_info", (("version", __version__),))], 1)
        self.assertIn(("process_resident_memory_bytes", ()), got)

    def test_openMetrics(self) -> None:
        """The OpenMetrics format parses too: no two families share a name."""
        self.stats.job_ended("done", 1.0)
        got = self.scrape(openmetrics_format=True)
        self.assertEqual(got[("measuring_jobs_total", (("state", "done"),))], 1)
        self.assertEqual(got[("measuring_jobs_current", (("state", "queued"),))], 3)

    def test_histogram(self) -> None:
        """Buckets are cumulative, each counting observations up to its bound, +Inf all."""
        histogram = Histogram((1.0, 10.0))
        for value in (0.5, 1.0, 5.0, 50.0):
            histogram.observe(value)
        self.assertEqual(histogram.cumulative(), [(1.0, 2), (10.0, 3), (float("inf"), 4)])
        self.assertEqual((histogram.count, histogram.sum), (4, 56.5))
