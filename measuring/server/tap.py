"""
``twistd measuring``: the command-line options and the service they build. No logic lives here.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.application.service import IService
from twisted.internet import endpoints
from twisted.logger import Logger
from twisted.python import usage

from measuring.server import config


class Options(usage.Options):
    """``twistd -n measuring [options]``; every option is also a key of the ``--config`` file."""

    synopsis = "[options]"
    longdesc = (
        "Runs Dask formulas over Parquet data for clients that send JSON requests over TCP. "
        "Each option is also a key of the TOML file given with --config; flags win over the file."
    )
    optParameters = [
        ["config", None, None, "TOML file with any of the settings below."],
        [
            "state-dir",
            None,
            None,
            "Where the server keeps its own files [default: $STATE_DIRECTORY or ./.measuring].",
        ],
        ["workers", None, None, "Jobs running at once; more wait in order [default: 2]."],
        ["job-timeout", None, None, "Longest a job may run, in seconds [default: 3600]."],
        ["max-request-bytes", None, None, "Largest request accepted, e.g. 1MiB [default: 1MiB]."],
        [
            "job-memory",
            None,
            None,
            "Most memory a job's processes may use, e.g. 4GB, or auto (80% of RAM shared by "
            "--workers), or none [default: auto].",
        ],
        ["max-queued", None, None, "Jobs that may wait; more are refused (Busy) [default: 100]."],
        ["keep-jobs", None, None, "Days finished jobs and their logs are kept [default: 30]."],
        [
            "keep-results",
            None,
            None,
            "Days after which finished jobs' result folders are removed [default: never].",
        ],
        [
            "stop-grace",
            None,
            None,
            "Seconds running jobs may go on after SIGTERM before they are stopped and queued "
            "again [default: 30].",
        ],
        [
            "token-file",
            None,
            None,
            "File of secrets, one per line, mode 600: every request must carry one as Token.",
        ],
        [
            "idle-timeout",
            None,
            None,
            "Seconds a connection may go without a complete request [default: 300].",
        ],
        ["max-connections", None, None, "Connections open at once [default: 1000]."],
        [
            "max-result-bytes",
            None,
            None,
            "Most a job may write, in all and in one file, e.g. 10GiB [default: 10GiB].",
        ],
        [
            "max-job-processes",
            None,
            None,
            "Threads and processes a job may start beyond those its user runs already "
            "(RLIMIT_NPROC: user-wide; not for root, nor in the sandbox) [default: none].",
        ],
        [
            "sandbox",
            None,
            None,
            "none, or bwrap: workers see the data roots read-only, no network, their own PIDs "
            "[default: none].",
        ],
    ]
    optFlags = [
        [
            "insecure-no-token",
            None,
            "Listen beyond loopback without a token (anyone reaching the port runs code).",
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["port"] = []
        self["data-root"] = []
        self.config: config.Config | None = None
        self._invalid = False

    def parseOptions(self, options: list[str] | None = None) -> None:
        try:
            super().parseOptions(options)
        except usage.UsageError:
            self._invalid = True
            raise

    def getUsage(self, width: int | None = None) -> str:
        # twistd prints this above the error line; after an error one hint beats the whole help.
        if self._invalid:
            return "Run 'twistd measuring --help' for the options."
        return super().getUsage(width)

    def opt_port(self, description: str) -> None:
        """Endpoint to listen on (tcp:, ssl:, unix:, systemd:); repeatable [default: tcp:8765:interface=127.0.0.1]."""  # noqa: E501
        self["port"].append(description)

    def opt_data_root(self, path: str) -> None:
        """Folder jobs may read from and write results into; repeatable [default: the current directory]."""  # noqa: E501
        self["data-root"].append(path)

    def postOptions(self) -> None:
        from twisted.internet import reactor

        flags: dict[str, Any] = {
            name: self[name] for name in config.SETTINGS if self.get(name) not in (None, [], 0)
        }
        self.config = config.load(
            flags,
            self["config"],
            check_endpoint=lambda description: endpoints.serverFromString(reactor, description),
        )


def makeService(options: Options) -> IService:
    """The whole server: threads, job database, worker pool, jobs, info, listening endpoints."""
    from twisted.internet import reactor as installed

    reactor: Any = installed  # the installed reactor provides every interface used below

    from measuring.server.access import Tokens, keep_private, secret_files
    from measuring.server.dispatch import Dispatcher
    from measuring.server.info import InfoService
    from measuring.server.jobs.scheduler import JobManager, Limits
    from measuring.server.jobs.store import JobDatabase, JobStore
    from measuring.server.listening import ClosingService, ListeningService, describe
    from measuring.server.pool.pool import WorkerPool, worker_environment
    from measuring.server.pool.processes import adopt_orphans
    from measuring.server.pool.sandbox import Bubblewrap
    from measuring.server.protocol import RequestFactory
    from measuring.server.services import InOrder
    from measuring.server.stats import Stats
    from measuring.server.systemd import NotifyService
    from measuring.server.threads import ThreadRunner

    settings = options.config
    assert settings is not None
    if settings.insecure_no_token and not settings.tokens:
        Logger().warn(
            "measuring runs WITHOUT a token (--insecure-no-token): anyone who can reach "
            "{ports} can run code on this machine",
            ports=", ".join(settings.ports),
        )
    keep_private()
    adopt_orphans()
    stats = Stats()
    # Threads of the server's own: for what clients ask (Info, Result pages, cleanup) and, apart,
    # for the workers (the memory watch, the end of each job), which must not wait behind them.
    blocking = ThreadRunner(reactor, "measuring-blocking", size=2)
    watching = ThreadRunner(reactor, "measuring-workers", size=2)
    database = ThreadRunner(reactor, "measuring-database")
    store = JobStore(
        JobDatabase(os.path.join(settings.state_dir, "jobs.sqlite")), database, settings.state_dir
    )
    environment = worker_environment(
        os.environ, os.path.join(settings.state_dir, "tmp"), settings.state_dir
    )
    # What a sandboxed formula must not read even where it may read: the server's own files.
    hidden = tuple(
        os.path.realpath(path)
        for path in [
            settings.state_dir,
            *([settings.token_file] if settings.token_file else []),
            *([options["config"]] if options["config"] else []),
            *[secret for port in settings.ports for secret in secret_files(port)],
        ]
    )
    sandbox = Bubblewrap(settings.data_roots, hidden) if settings.sandbox == "bwrap" else None
    pool = WorkerPool(
        reactor,
        reactor,
        settings.workers,
        settings.state_dir,
        environment,
        watching,
        settings.job_memory,
        sandbox=sandbox,
        job_limits={
            "ResultBytes": settings.max_result_bytes,
            **({"Processes": settings.max_job_processes} if settings.max_job_processes else {}),
        },
        reap_orphans=True,
    )
    limits = Limits(
        workers=settings.workers,
        job_timeout=settings.job_timeout,
        max_queued=settings.max_queued,
        stop_grace=settings.stop_grace,
        keep_jobs=settings.keep_jobs,
        keep_results=settings.keep_results,
    )
    jobs = JobManager(pool, store, reactor, limits, blocking)
    info = InfoService(reactor, pool, jobs, stats, settings.data_roots, blocking)
    dispatcher = Dispatcher(
        info,
        jobs,
        stats,
        settings.data_roots,
        (settings.state_dir,),
        Tokens(settings.tokens),
        blocking,
    )
    factory = RequestFactory(
        dispatcher,
        settings.max_request_bytes,
        reactor,
        settings.idle_timeout,
        settings.max_connections,
    )
    listening = [(port, endpoints.serverFromString(reactor, port)) for port in settings.ports]

    listener = ListeningService(listening, factory)
    # Started in this order; stopped in reverse, each in turn: tell systemd, stop listening, let
    # running jobs end (or stop them), send the last answers and close connections, end the
    # workers, close the job database, and only then stop the threads it runs in.
    top = InOrder()
    for service in (
        blocking,
        watching,
        database,
        store,
        pool,
        ClosingService(factory, reactor),
        jobs,
        info,
        listener,
        NotifyService(reactor, lambda: [describe(port) for port in listener.ports]),
    ):
        service.setServiceParent(top)
    return top
