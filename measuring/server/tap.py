"""
``twistd measuring``: the command-line options and the service they build. No logic lives here.

The options come from the declared settings (``settings.SETTINGS``); ``makeService`` hands the
settled ``Config`` and the installed reactor to ``app.build``.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import IService
from twisted.internet import endpoints
from twisted.python import usage

from measuring.server import config, logs
from measuring.server.settings import SETTINGS, Setting


def _repeatable(setting: Setting) -> Any:
    def opt(self: Options, value: str) -> None:
        self[setting.name].append(value)

    opt.__doc__ = setting.usage()
    return opt


class Options(usage.Options):
    """``twistd -n measuring [options]``; every option is also a key of the ``--config`` file."""

    synopsis = "[options]"
    longdesc = (
        "Runs Dask formulas over Parquet data for clients that send JSON requests over TCP. "
        "Each option is also a key of the TOML file given with --config; flags win over the file."
    )
    optParameters = [
        ["config", None, None, "TOML file with any of the settings below."],
        *(
            [setting.name, None, None, setting.usage()]
            for setting in SETTINGS
            if not (setting.switch or setting.repeatable)
        ),
    ]
    optFlags = [[setting.name, None, setting.usage()] for setting in SETTINGS if setting.switch]

    def __init__(self) -> None:
        super().__init__()
        for setting in SETTINGS:
            if setting.repeatable:
                self[setting.name] = []
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

    def postOptions(self) -> None:
        from twisted.internet import reactor

        flags = {
            setting.name: self[setting.name]
            for setting in SETTINGS
            if self.get(setting.name) not in (None, [], 0)
        }
        self.config = config.load(
            flags,
            self["config"],
            check_endpoint=lambda description: endpoints.serverFromString(reactor, description),
        )
        if self.parent is not None:  # twistd's own options: where and how it logs
            observer = logs.choose(self.config.log_format, self.parent)
            if observer is not None:
                self.parent["logger"] = observer


for _setting in SETTINGS:
    if _setting.repeatable:
        setattr(Options, f"opt_{_setting.attribute}", _repeatable(_setting))


def makeService(options: Options) -> IService:
    """The whole server (``app.build``), on the installed reactor."""
    from twisted.internet import reactor

    from measuring.server import app

    assert options.config is not None
    return app.build(options.config, reactor, config_file=options["config"])
