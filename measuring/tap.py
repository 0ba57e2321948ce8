"""
``twistd measuring``: the command-line options and the service they build. No logic lives here.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.application.service import IService, MultiService
from twisted.internet import endpoints
from twisted.python import usage

from measuring import config


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
            name: self[name] for name in config.SETTINGS if self.get(name) not in (None, [])
        }
        self.config = config.load(
            flags,
            self["config"],
            check_endpoint=lambda description: endpoints.serverFromString(reactor, description),
        )


def makeService(options: Options) -> IService:
    """The whole server: worker pool, jobs, info, and the listening endpoints."""
    from twisted.internet import reactor as installed

    reactor: Any = installed  # the installed reactor provides every interface used below

    from measuring.dispatch import Dispatcher
    from measuring.info import InfoService
    from measuring.jobs import JobManager
    from measuring.pool import WorkerPool, worker_environment
    from measuring.protocol import ListeningService, RequestFactory
    from measuring.stats import Stats
    from measuring.threads import ThreadRunner

    settings = options.config
    assert settings is not None
    top = MultiService()
    stats = Stats()
    blocking = ThreadRunner(reactor, "measuring-blocking")
    blocking.setServiceParent(top)
    pool = WorkerPool(
        reactor,
        reactor,
        settings.workers,
        settings.state_dir,
        worker_environment(os.environ, os.path.join(settings.state_dir, "tmp")),
    )
    pool.setServiceParent(top)
    jobs = JobManager(pool, reactor, settings.workers, settings.job_timeout, stats, blocking)
    jobs.setServiceParent(top)
    info = InfoService(reactor, pool, jobs, stats, settings.data_roots, blocking)
    info.setServiceParent(top)
    factory = RequestFactory(
        Dispatcher(info, jobs, stats, settings.data_roots), settings.max_request_bytes
    )
    listening = [(port, endpoints.serverFromString(reactor, port)) for port in settings.ports]
    ListeningService(listening, factory).setServiceParent(top)
    return top
