"""
The server's service tree, built from its settled settings: threads, the job database, the
worker pool, the jobs, Info, the listening endpoints, systemd's notifications.

``build`` only composes; the reactor is passed in. The order of the services is the order they
start in, and the reverse of the order they stop in (``services.InOrder``).
"""

from __future__ import annotations

import os
from functools import partial
from typing import Any

from twisted.application.service import IService, Service
from twisted.internet import endpoints
from twisted.logger import Logger

from measuring import storage
from measuring.cluster import ClusterSettings, probe
from measuring.server import cluster
from measuring.server.access import Tokens, beyond_loopback, keep_private
from measuring.server.config import Config
from measuring.server.dispatch import Dispatcher
from measuring.server.factory import RequestFactory
from measuring.server.info import InfoService
from measuring.server.jobs.journal import Journal
from measuring.server.jobs.queries import JobQueries
from measuring.server.jobs.records import Limits
from measuring.server.jobs.retention import Retention
from measuring.server.jobs.scheduler import Scheduler
from measuring.server.jobs.store import JobDatabase, JobStore
from measuring.server.listening import ClosingService, ListeningService, describe, url
from measuring.server.pool.cgroups import Containment
from measuring.server.pool.pool import WorkerPool, worker_environment
from measuring.server.pool.processes import adopt_orphans
from measuring.server.pool.sandbox import Bubblewrap, server_secrets
from measuring.server.services import InOrder, ProcessSetup, UserSetup
from measuring.server.stats import Stats
from measuring.server.systemd import NotifyService
from measuring.server.threads import ThreadRunner
from measuring.server.throttle import Throttle


def limits(settings: Config) -> Limits:
    """The limits the scheduler holds jobs to."""
    return Limits(
        workers=settings.workers,
        job_timeout=settings.job_timeout,
        max_queued=settings.max_queued,
        stop_grace=settings.stop_grace,
        keep_jobs=settings.keep_jobs,
        keep_results=settings.keep_results,
    )


def _pool(
    settings: Config,
    reactor: Any,
    watching: ThreadRunner,
    config_file: str | None,
    found: ClusterSettings | None,
    containment: Containment,
) -> WorkerPool:
    sandbox = None
    if settings.sandbox == "bwrap":
        listening = (*settings.ports, *([settings.http] if settings.http else []))
        secrets = server_secrets(settings.state_dir, settings.token_file, config_file, listening)
        sandbox = Bubblewrap(settings.data_roots, secrets)
    return WorkerPool(
        reactor,
        reactor,
        settings.workers,
        settings.state_dir,
        {
            **worker_environment(os.environ, workers_tmp(settings), settings.state_dir),
            **cluster.worker_environment(found),
            **storage.worker_environment(settings.data_roots, os.environ),
        },
        watching,
        settings.job_memory,
        sandbox=sandbox,
        job_limits={
            "ResultBytes": settings.max_result_bytes,
            "Threads": settings.job_threads,
            **({"Memory": settings.job_memory} if settings.job_memory else {}),
            **({"Processes": settings.max_job_processes} if settings.max_job_processes else {}),
        },
        reap_orphans=True,
        containment=containment,
    )


def workers_tmp(settings: Config) -> str:
    """The workers' temporary folder (their TMPDIR), in the state directory."""
    return os.path.join(settings.state_dir, "tmp")


def cluster_settings(settings: Config) -> ClusterSettings | None:
    """Where the cluster computing the jobs is, or None when they compute here."""
    if settings.scheduler is None:
        return None
    return ClusterSettings(
        address=settings.scheduler,
        ca=settings.scheduler_ca,
        cert=settings.scheduler_cert,
        key=settings.scheduler_key,
        timeout=settings.scheduler_timeout,
    )


def _cluster(
    found: ClusterSettings | None, reactor: Any
) -> tuple[list[Service], cluster.ClusterView | None]:
    """The services that look at the cluster for Info (its thread first), or none."""
    if found is None:
        return [], None
    looking = ThreadRunner(reactor, "measuring-cluster")
    view = cluster.ClusterView(reactor, looking, found.address, partial(probe, found))
    return [looking, view], view


def _http(
    settings: Config,
    reactor: Any,
    dispatcher: Dispatcher,
    stats: Stats,
    jobs: Scheduler,
    pool: WorkerPool,
    factory: RequestFactory,
) -> ListeningService:
    """The HTTP side (``--http``): the dashboard, the JSON API and /metrics."""
    from measuring.server.web.metrics import MetricsPage, ServerCollector, registry
    from measuring.server.web.site import site

    assert settings.http is not None
    collector = ServerCollector(stats, jobs, pool, lambda: len(factory.connections))
    web = site(
        dispatcher,
        MetricsPage(registry(collector)),
        settings.tokens,
        loopback_only=not beyond_loopback(settings.http),
        reactor=reactor,
    )
    endpoint = endpoints.serverFromString(reactor, settings.http)
    return ListeningService([(settings.http, endpoint)], web, "measuring HTTP listening on")


def build(settings: Config, reactor: Any, config_file: str | None = None) -> IService:
    """The whole server on ``reactor`` (which provides every reactor interface used below)."""
    tmp = workers_tmp(settings)
    if settings.insecure_no_token and not settings.tokens:
        Logger().warn(
            "measuring runs WITHOUT a token (--insecure-no-token): anyone who can reach "
            "{ports} can run code on this machine",
            ports=", ".join(settings.ports),
        )
    stats = Stats()
    # Threads of the server's own: for what clients ask (Info, Result pages, cleanup) and, apart,
    # for the workers (the memory watch, the end of each job), which must not wait behind them.
    blocking = ThreadRunner(reactor, "measuring-blocking", size=2)
    watching = ThreadRunner(reactor, "measuring-workers", size=2)
    database = ThreadRunner(reactor, "measuring-database")
    store = JobStore(
        JobDatabase(os.path.join(settings.state_dir, "jobs.sqlite")), database, settings.state_dir
    )
    found = cluster_settings(settings)
    # The jobs' cgroups and the guard that ends their processes when the server ends.
    containment = Containment(reactor, settings.state_dir, mark=settings.state_dir)
    pool = _pool(settings, reactor, watching, config_file, found, containment)
    held = limits(settings)
    journal = Journal(store, reactor, settings.state_dir)
    runs = cluster.ClusterPool(pool, found) if found is not None else pool
    jobs = Scheduler(runs, store, reactor, held, blocking, stats, journal)
    queries = JobQueries(jobs, store, reactor, blocking, held)
    http: ListeningService | None = None

    def dashboard() -> str | None:
        return url(http.ports[0], settings.http) if http and http.ports and settings.http else None

    looking, view = _cluster(found, reactor)
    info = InfoService(
        reactor, pool, queries, stats, settings.data_roots, blocking, dashboard, view,
        helpers=lambda: {containment.guard_pid: "guard"} if containment.guard_pid else {},
    )  # fmt: skip
    # What clients can make the server log (refusals, closes) is held to a rate.
    throttle = Throttle(reactor)
    dispatcher = Dispatcher(
        info, jobs, queries, stats, settings.data_roots, (settings.state_dir,),
        Tokens(settings.tokens), blocking, throttle=throttle,
    )  # fmt: skip
    factory = RequestFactory(
        dispatcher, settings.max_request_bytes, reactor, settings.idle_timeout,
        settings.max_connections,
        max_client_connections=settings.max_client_connections,
        first_request_timeout=settings.first_request_timeout,
        trust_tokens=bool(settings.tokens),
        throttle=throttle,
    )  # fmt: skip
    listener = ListeningService(
        [(port, endpoints.serverFromString(reactor, port)) for port in settings.ports], factory
    )
    if settings.http is not None:
        http = _http(settings, reactor, dispatcher, stats, jobs, pool, factory)
    # Started in this order; stopped in reverse, each in turn: tell systemd, stop listening, let
    # running jobs end (or stop them), send the last answers and close connections, end the
    # workers, close the job database, and only then stop the threads it runs in.
    top = InOrder()
    for service in (
        ProcessSetup(keep_private, adopt_orphans),
        # The workers' temporary folder, made by the user the server runs as (after --uid).
        UserSetup(lambda: os.makedirs(tmp, mode=0o700, exist_ok=True)),
        blocking,
        watching,
        database,
        store,
        containment,
        pool,
        ClosingService(factory, reactor),
        jobs,
        Retention(store, reactor, held, blocking),
        *looking,
        info,
        listener,
        *([http] if http is not None else []),
        NotifyService(reactor, lambda: [describe(port) for port in listener.ports]),
    ):
        service.setServiceParent(top)
    return top
