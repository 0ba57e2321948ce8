"""
Tests for ``measuring.server.config`` and ``measuring.server.tap.Options``: defaults, the TOML file,
flags, and the one line a user reads when a setting is bad.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import psutil
from twisted.internet import endpoints
from twisted.internet.testing import MemoryReactor
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase

from measuring.server import config, tap
from measuring.server.config import Config
from measuring.server.settings import SETTINGS, parse_size
from measuring.wire import DEFAULT_ENDPOINT as DEFAULT_PORT

MiB = 1024 * 1024
GiB = 1024 * MiB


def auto_memory(workers: int) -> int:
    """What ``job-memory = "auto"`` gives each job: an equal share of 80 % of this machine's RAM."""
    return int(0.8 * psutil.virtual_memory().total / workers)


def check_endpoint(description: str) -> object:
    """Parse an endpoint description as the server does, without listening."""
    return endpoints.serverFromString(MemoryReactor(), description)


class LoadTestCase(SynchronousTestCase):
    """A current folder with a ``data`` folder, and ``load`` to settle settings in it."""

    def setUp(self) -> None:
        self.cwd = os.path.realpath(self.mktemp())
        os.makedirs(os.path.join(self.cwd, "data"))
        self.config_file = os.path.join(self.cwd, "measuring.toml")

    def load(
        self,
        flags: dict[str, object] | None = None,
        toml: str | None = None,
        environ: dict[str, str] | None = None,
    ) -> Config:
        """Settle the settings from ``flags`` and, when given, a config file holding ``toml``."""
        if toml is not None:
            with open(self.config_file, "w") as f:
                f.write(toml)
        return config.load(
            flags or {},
            self.config_file if toml is not None else None,
            check_endpoint,
            environ={} if environ is None else environ,
            cwd=self.cwd,
        )

    def assertBad(self, words: list[str], **where: Any) -> None:
        """Loading fails with one line holding ``words``."""
        message = str(self.assertRaises(UsageError, self.load, **where))
        self.assertNotIn("\n", message)
        for word in words:
            self.assertIn(word, message)


class LoadTests(LoadTestCase):
    """``config.load``: where each setting comes from, and what a bad one says."""

    def test_defaults(self) -> None:
        """Without file or flags: localhost:8765, the current folder, ./.measuring, 2 workers."""
        self.assertEqual(
            self.load(),
            Config(
                ports=(DEFAULT_PORT,),
                data_roots=(self.cwd,),
                state_dir=os.path.join(self.cwd, ".measuring"),
                workers=2,
                job_timeout=3600.0,
                max_request_bytes=MiB,
                job_memory=auto_memory(2),
                max_queued=100,
                keep_jobs=30.0,
                keep_results=None,
                stop_grace=30.0,
            ),
        )

    def test_fileValues(self) -> None:
        """Every setting can come from the TOML file; relative paths are from the current folder."""
        settings = self.load(
            toml=(
                'port = ["tcp:9000:interface=127.0.0.1", "unix:/run/measuring.sock"]\n'
                'data-root = ["data", "data/.", "."]\n'
                'state-dir = "var/state"\n'
                "workers = 4\n"
                "job-timeout = 90\n"
                'max-request-bytes = "512KiB"\n'
                'job-memory = "2GiB"\n'
                "max-queued = 10\n"
                "keep-jobs = 7\n"
                "keep-results = 0.5\n"
                "stop-grace = 0\n"
            )
        )
        self.assertEqual(
            settings,
            Config(
                ports=("tcp:9000:interface=127.0.0.1", "unix:/run/measuring.sock"),
                data_roots=(os.path.join(self.cwd, "data"), self.cwd),
                state_dir=os.path.join(self.cwd, "var", "state"),
                workers=4,
                job_timeout=90.0,
                max_request_bytes=512 * 1024,
                job_memory=2 * GiB,
                max_queued=10,
                keep_jobs=7.0,
                keep_results=0.5,
                stop_grace=0.0,
            ),
        )

    def test_oneValueForRepeatable(self) -> None:
        """A single string in the file is one port or one data root."""
        settings = self.load(toml='port = "unix:/run/m.sock"\ndata-root = "data"\n')
        self.assertEqual(settings.ports, ("unix:/run/m.sock",))
        self.assertEqual(settings.data_roots, (os.path.join(self.cwd, "data"),))

    def test_flagsWin(self) -> None:
        """A flag replaces the file's value; settings without a flag keep the file's."""
        settings = self.load(
            flags={"workers": "6", "port": ["unix:/run/b.sock"]},
            toml='workers = 3\nport = ["unix:/run/a.sock"]\njob-timeout = 12.5\n',
        )
        self.assertEqual(
            (settings.workers, settings.ports, settings.job_timeout),
            (6, ("unix:/run/b.sock",), 12.5),
        )

    def test_jobMemory(self) -> None:
        """job-memory "auto" shares 80 % of RAM among the workers (as settled); "none": no limit."""
        self.assertEqual(self.load({"workers": "4"}).job_memory, auto_memory(4))
        self.assertEqual(
            self.load(toml='workers = 3\njob-memory = "auto"\n').job_memory, auto_memory(3)
        )
        self.assertEqual(self.load({"workers": "2"}, "workers = 8\n").job_memory, auto_memory(2))
        self.assertEqual(self.load({"job-memory": "none"}).job_memory, None)
        self.assertEqual(self.load(toml='job-memory = "None"\n').job_memory, None)
        self.assertEqual(self.load(toml="job-memory = 67108864\n").job_memory, 64 * MiB)
        self.assertEqual(self.load({"job-memory": "1.5GB"}).job_memory, 1_500_000_000)

    def test_symlinkedDataRoot(self) -> None:
        """A data root is kept as its real path."""
        os.symlink(os.path.join(self.cwd, "data"), os.path.join(self.cwd, "link"))
        self.assertEqual(
            self.load({"data-root": ["link"]}).data_roots, (os.path.join(self.cwd, "data"),)
        )

    def test_objectStorageRoot(self) -> None:
        """An s3:// data root is kept as a plain URL, beside local ones, from flags or the file."""
        loaded = self.load({"data-root": ["data", "s3://plant/site/"]})
        self.assertEqual(loaded.data_roots, (os.path.join(self.cwd, "data"), "s3://plant/site"))
        loaded = self.load(toml='data-root = ["s3://plant/site"]\n')
        self.assertEqual(loaded.data_roots, ("s3://plant/site",))

    def test_badObjectStorageRoot(self) -> None:
        """Another scheme or a URL with '..' stops the start, saying what a root must be."""
        self.assertBad(
            ["--data-root 'gs://plant/x' must be a folder, or an object-storage URL such as s3://"],
            flags={"data-root": ["gs://plant/x"]},
        )
        self.assertBad(
            ["--data-root 's3://plant/../x'", "without empty, '.' or '..' parts"],
            flags={"data-root": ["s3://plant/../x"]},
        )

    def test_objectStorageNeedsItsPackages(self) -> None:
        """Without s3fs, an s3:// data root stops the start naming what to install."""
        saved = sys.modules.get("s3fs")
        sys.modules["s3fs"] = None  # type: ignore[assignment]  # what import finds not there
        try:
            self.assertBad(
                [
                    "--data-root 's3://plant/x' is on object storage",
                    "pip install 'measuring[cluster]'",
                ],
                flags={"data-root": ["s3://plant/x"]},
            )
        finally:
            if saved is None:
                del sys.modules["s3fs"]
            else:
                sys.modules["s3fs"] = saved

    def test_sandboxRefusesObjectStorage(self) -> None:
        """--sandbox bwrap with a data root on object storage stops the start, saying why."""
        self.assertBad(
            ["--sandbox bwrap cannot be used with a data root on object storage (s3://plant/x)"],
            flags={"data-root": ["data", "s3://plant/x"], "sandbox": "bwrap"},
        )

    def test_stateDirectory(self) -> None:
        """STATE_DIRECTORY (its first entry) is the default state dir; a flag or the file wins."""
        state = os.path.join(self.cwd, "systemd")
        environ = {"STATE_DIRECTORY": f"{state}:{self.cwd}/second"}
        self.assertEqual(self.load(environ=environ).state_dir, state)
        self.assertEqual(
            self.load({"state-dir": "mine"}, environ=environ).state_dir, f"{self.cwd}/mine"
        )
        self.assertEqual(
            self.load(toml='state-dir = "file"', environ=environ).state_dir, f"{self.cwd}/file"
        )

    def test_stateDirCreated(self) -> None:
        """The state dir is created, parents included (what goes in it, at the start)."""
        state_dir = self.load({"state-dir": "a/b/state"}).state_dir
        self.assertEqual(state_dir, os.path.join(self.cwd, "a", "b", "state"))
        self.assertTrue(os.path.isdir(state_dir))

    def test_badFlags(self) -> None:
        """A bad flag stops the start with one line naming the flag, the value and the rule."""
        with open(os.path.join(self.cwd, "afile"), "w"):
            pass
        cases: list[tuple[dict[str, object], list[str]]] = [
            ({"workers": "-1"}, ["--workers must be a whole number of at least 1", "'-1'"]),
            ({"workers": "two"}, ["--workers must be a whole number", "'two'"]),
            ({"job-timeout": "0"}, ["--job-timeout must be a number of seconds greater than 0"]),
            ({"job-timeout": "inf"}, ["--job-timeout", "'inf'"]),
            ({"job-timeout": "nan"}, ["--job-timeout", "'nan'"]),
            ({"max-request-bytes": "lots"}, ["--max-request-bytes must be a size", "'lots'"]),
            ({"max-request-bytes": "1000"}, ["--max-request-bytes must be at least 1024 bytes"]),
            ({"port": ["bogus:1"]}, ["--port 'bogus:1' is not a usable endpoint", "bogus"]),
            ({"port": ["tcp:8765", "tcp:http"]}, ["--port 'tcp:http' is not a usable endpoint"]),
            ({"data-root": ["nowhere"]}, ["--data-root 'nowhere' is not an existing folder"]),
            ({"data-root": ["afile"]}, ["--data-root 'afile' is not an existing folder"]),
            ({"state-dir": "afile/state"}, ["--state-dir", "cannot create 'afile/state'"]),
            ({"job-memory": "lots"}, ["--job-memory must be a size such as 4GB, or auto, or none"]),
            ({"job-memory": "32MiB"}, ["--job-memory must be at least 64MiB", "'32MiB'"]),
            ({"max-queued": "0"}, ["--max-queued must be a whole number of at least 1", "'0'"]),
            ({"keep-jobs": "0"}, ["--keep-jobs must be a number of days greater than 0", "'0'"]),
            ({"keep-results": "-1"}, ["--keep-results must be a number of days greater than 0"]),
            ({"keep-results": "never"}, ["--keep-results must be a number of days", "'never'"]),
            ({"stop-grace": "-1"}, ["--stop-grace must be a number of seconds of at least 0"]),
            ({"stop-grace": "inf"}, ["--stop-grace", "'inf'"]),
        ]
        for flags, words in cases:
            self.assertBad(words, flags=flags)

    def test_badFile(self) -> None:
        """A bad config file stops the start with one line naming the file and the setting."""
        path = self.config_file
        cases: list[tuple[str, list[str]]] = [
            ("workers = -1\n", [f"{path}: workers must be a whole number of at least 1", "not -1"]),
            ("workers = 2.5\n", [f"{path}: workers must be a whole number"]),
            ("job-timeout = true\n", [f"{path}: job-timeout must be a number of seconds"]),
            ('max-request-bytes = "1 parsec"\n', [f"{path}: max-request-bytes must be a size"]),
            ("port = []\n", [f"{path}: port must be at least one value"]),
            ('state-dir = ""\n', [f"{path}: state-dir must be a non-empty string"]),
            ("wokers = 3\n", [f"{path}: unknown setting 'wokers'", "known:", "workers"]),
            ("workers = \n", [f"{path}: not valid TOML"]),
            ("[server]\nworkers = 3\n", [f"{path}: unknown setting 'server'"]),
            ("job-memory = 1000\n", [f"{path}: job-memory must be at least 64MiB", "1000"]),
            ("job-memory = true\n", [f"{path}: job-memory must be a size", "True"]),
            ("max-queued = 0\n", [f"{path}: max-queued must be a whole number of at least 1"]),
            ("keep-jobs = 0\n", [f"{path}: keep-jobs must be a number of days greater than 0"]),
            ('keep-results = "soon"\n', [f"{path}: keep-results must be a number of days"]),
            ("stop-grace = -0.5\n", [f"{path}: stop-grace must be a number of seconds"]),
        ]
        for toml, words in cases:
            self.assertBad(words, toml=toml)

    def test_missingFile(self) -> None:
        """A config file that cannot be read is named with --config and the reason."""
        message = str(
            self.assertRaises(
                UsageError, config.load, {}, "nope.toml", check_endpoint, {}, self.cwd
            )
        )
        self.assertEqual(message, "--config: cannot read nope.toml: No such file or directory")

    def test_whereBadValueCameFrom(self) -> None:
        """A bad path or endpoint names where it came from: the config file or STATE_DIRECTORY."""
        with open(os.path.join(self.cwd, "afile"), "w"):
            pass
        for toml, words in [
            ('port = "bogus:1"\n', [self.config_file, "port", "'bogus:1'"]),
            ('data-root = ["nowhere"]\n', [self.config_file, "data-root", "'nowhere'"]),
            ('state-dir = "afile/state"\n', [self.config_file, "state-dir", "'afile/state'"]),
        ]:
            self.assertBad(words, toml=toml)
        environ = {"STATE_DIRECTORY": os.path.join(self.cwd, "afile", "state")}
        self.assertBad(["STATE_DIRECTORY", "afile"], environ=environ)


class ParseSizeTests(SynchronousTestCase):
    """``parse_size`` follows Dask: kB, MB, GB are powers of 1000; KiB, MiB, GiB of 1024."""

    def test_sizes(self) -> None:
        """Numbers, decimal and binary units, any case, with or without a space."""
        for value, size in [
            (4096, 4096),
            ("4096", 4096),
            ("10B", 10),
            ("512kB", 512_000),
            ("512 KiB", 512 * 1024),
            ("1MiB", MiB),
            ("1.5MiB", 3 * MiB // 2),
            ("1mb", 1_000_000),
            ("4GB", 4_000_000_000),
            ("2GiB", 2 * 1024**3),
            ("2k", 2000),
            ("1TiB", 1024**4),
            ("1e3", 1000),
        ]:
            self.assertEqual(parse_size(value), size, value)

    def test_notSizes(self) -> None:
        """Anything else is a ValueError saying what a size looks like."""
        for value in ["lots", "", "-1", "1 XB", "MiB", 1.5, True, None]:
            error = self.assertRaises(ValueError, parse_size, value)
            self.assertIn("a size", str(error))


class OptionsTestCase(SynchronousTestCase):
    """Two data roots and a state folder, and ``parse`` to read flags as twistd does."""

    def setUp(self) -> None:
        self.folder = os.path.realpath(self.mktemp())
        self.roots = [os.path.join(self.folder, name) for name in ("one", "two")]
        for root in self.roots:
            os.makedirs(root)
        self.state = os.path.join(self.folder, "state")

    def parse(self, *arguments: str) -> tap.Options:
        options = tap.Options()
        options.parseOptions(["--data-root", self.roots[0], *arguments])
        return options


class OptionsTests(OptionsTestCase):
    """``twistd measuring`` flags, as ``tap.Options`` parses them."""

    def test_flags(self) -> None:
        """Every flag reaches the settings; --port and --data-root repeat."""
        options = self.parse(
            *("--data-root", self.roots[1], "--state-dir", self.state),
            *("--port", "tcp:0:interface=127.0.0.1", "--port", "unix:/run/m.sock"),
            *("--workers", "3", "--job-timeout", "1.5", "--max-request-bytes", "64kB"),
            *("--job-memory", "1GiB", "--max-queued", "5", "--keep-jobs", "2"),
            *("--keep-results", "14", "--stop-grace", "0.5"),
        )
        self.assertEqual(
            options.config,
            Config(
                ports=("tcp:0:interface=127.0.0.1", "unix:/run/m.sock"),
                data_roots=tuple(self.roots),
                state_dir=self.state,
                workers=3,
                job_timeout=1.5,
                max_request_bytes=64_000,
                job_memory=GiB,
                max_queued=5,
                keep_jobs=2.0,
                keep_results=14.0,
                stop_grace=0.5,
            ),
        )
        self.assertTrue(os.path.isdir(self.state))

    def test_configFile(self) -> None:
        """--config reads the file, and flags win over it."""
        path = os.path.join(self.folder, "measuring.toml")
        with open(path, "w") as f:
            f.write(f'workers = 5\njob-timeout = 7\nstate-dir = "{self.state}"\n')
        settings = self.parse("--config", path, "--workers", "1").config
        assert settings is not None
        self.assertEqual(
            (settings.workers, settings.job_timeout, settings.state_dir, settings.ports),
            (1, 7.0, self.state, (DEFAULT_PORT,)),
        )

    def test_stateDirectory(self) -> None:
        """Under systemd, STATE_DIRECTORY is the state dir."""
        old = os.environ.get("STATE_DIRECTORY")
        os.environ["STATE_DIRECTORY"] = self.state
        self.addCleanup(
            lambda: (
                os.environ.pop("STATE_DIRECTORY", None)
                if old is None
                else os.environ.__setitem__("STATE_DIRECTORY", old)
            )
        )
        settings = self.parse().config
        assert settings is not None
        self.assertEqual(settings.state_dir, self.state)

    def test_badOption(self) -> None:
        """A bad or unknown flag is a UsageError; the usage shrinks to a hint to run --help."""
        for arguments, words in [
            (["--workers", "0"], "--workers must be a whole number of at least 1"),
            (["--port", "tcp:-"], "--port 'tcp:-' is not a usable endpoint"),
            (["--wrokers", "2"], "wrokers"),
        ]:
            options = tap.Options()
            error = self.assertRaises(
                UsageError, options.parseOptions, ["--state-dir", self.state, *arguments]
            )
            self.assertIn(words, str(error))
            self.assertEqual(options.getUsage(), "Run 'twistd measuring --help' for the options.")

    def test_help(self) -> None:
        """Before any error, the usage lists every setting."""
        usage = tap.Options().getUsage()
        for setting in SETTINGS:
            self.assertIn(f"--{setting.name}", usage)
        self.assertIn("--config", usage)
