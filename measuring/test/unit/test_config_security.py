"""
Tests for the security settings of ``measuring.server.config`` and ``measuring.server.tap.Options``:
the token file, refusing to listen beyond loopback without one, and the bounds on connections and
jobs.
"""

from __future__ import annotations

import os
import shutil
import stat

from twisted.python.usage import UsageError

from measuring.server.config import Config
from measuring.test.support import write_token_file
from measuring.test.unit.test_config import LoadTestCase, OptionsTestCase
from measuring.wire import DEFAULT_ENDPOINT as DEFAULT_PORT

TOKEN = "a-long-enough-secret-0123456789"
#: What the test's token file holds: a comment, then ``TOKEN``.
TOKEN_LINES = ("# rotate yearly", TOKEN)
EXPOSED_WORDS = ["can be reached from other machines", "--token-file", "--insecure-no-token"]


class TokenFileTests(LoadTestCase):
    """``token-file``: read when the server starts, refused when others can read it."""

    def test_tokensRead(self) -> None:
        """The file's tokens are in the settings, with the file's real path."""
        write_token_file(self.cwd, *TOKEN_LINES)
        os.symlink("tokens", os.path.join(self.cwd, "link"))
        cases: list[tuple[dict[str, object], str | None]] = [
            ({"token-file": "tokens"}, None),
            ({}, 'token-file = "link"\n'),
        ]
        for flags, toml in cases:
            settings = self.load(flags, toml)
            self.assertEqual(settings.tokens, (TOKEN,))
            self.assertEqual(settings.token_file, os.path.join(self.cwd, "tokens"))

    def test_noTokenFile(self) -> None:
        """Without a token file there is no token and no token file."""
        settings = self.load()
        self.assertEqual((settings.tokens, settings.token_file), ((), None))

    def test_tokensNotInRepr(self) -> None:
        """The settings' repr (as a log or traceback would show it) leaves the tokens out."""
        write_token_file(self.cwd, *TOKEN_LINES)
        self.assertNotIn(TOKEN, repr(self.load({"token-file": "tokens"})))

    def test_readableByGroupRefused(self) -> None:
        """A group-readable token file stops the start, naming the setting, file and mode."""
        write_token_file(self.cwd, *TOKEN_LINES, mode=0o640)
        self.assertBad(
            ["--token-file 'tokens'", "other users can read", "mode 640", "chmod 600"],
            flags={"token-file": "tokens"},
        )
        self.assertBad(
            [f"{self.config_file}: token-file 'tokens'", "mode 640"],
            toml='token-file = "tokens"\n',
        )

    def test_badTokenFile(self) -> None:
        """A missing, empty or short-token file stops the start, saying what is wrong."""
        with open(os.path.join(self.cwd, "empty"), "w"):
            pass
        os.chmod(os.path.join(self.cwd, "empty"), 0o600)
        with open(os.path.join(self.cwd, "short"), "w") as f:
            f.write("hunter2\n")
        os.chmod(os.path.join(self.cwd, "short"), 0o600)
        for name, words in [
            ("missing", ["--token-file 'missing'", "cannot read it", "No such file"]),
            ("empty", ["--token-file 'empty'", "holds no token"]),
            ("short", ["--token-file 'short'", "shorter than 16 characters"]),
        ]:
            self.assertBad(words, flags={"token-file": name})
        self.assertBad(["--token-file must be a non-empty string"], flags={"token-file": ""})


class StateDirTests(LoadTestCase):
    """The state directory holds the job records and logs: the server's user's alone."""

    def mode(self, path: str) -> int:
        return stat.S_IMODE(os.stat(path).st_mode)

    def test_createdPrivate(self) -> None:
        """A new state dir is mode 0700, whatever the umask (its tmp is made at the start)."""
        self.addCleanup(os.umask, os.umask(0))
        state_dir = self.load({"state-dir": "var/state"}).state_dir
        self.assertEqual(self.mode(state_dir), 0o700, state_dir)

    def test_existingMadePrivate(self) -> None:
        """A state dir of this user's that others could read becomes 0700."""
        state_dir = os.path.join(self.cwd, "state")
        os.makedirs(state_dir)
        os.chmod(state_dir, 0o755)
        self.assertEqual(self.load({"state-dir": "state"}).state_dir, state_dir)
        self.assertEqual(self.mode(state_dir), 0o700)


class ExposedPortTests(LoadTestCase):
    """A port other machines can reach needs a token file, or ``insecure-no-token``."""

    def test_exposedWithoutTokenRefused(self) -> None:
        """Without a token, a port beyond loopback stops the start, naming it and the ways out."""
        for port in [
            "tcp:8765",
            "tcp:8765:interface=0.0.0.0",
            "tcp:8765:interface=192.168.1.20",
            "tcp6:8765",
        ]:
            self.assertBad([f"--port {port!r}", *EXPOSED_WORDS], flags={"port": [port]})

    def test_namesTheExposedPort(self) -> None:
        """Among several ports the message names the exposed one, and where it was set."""
        self.assertBad(
            ["--port 'tcp:9000'", *EXPOSED_WORDS], flags={"port": [DEFAULT_PORT, "tcp:9000"]}
        )
        self.assertBad(
            [f"{self.config_file}: port 'tcp:9000'", *EXPOSED_WORDS],
            toml=f'port = ["{DEFAULT_PORT}", "tcp:9000"]\n',
        )

    def test_loopbackNeedsNoToken(self) -> None:
        """Loopback and unix sockets need no token."""
        ports = ("tcp:8765:interface=127.0.0.1", "tcp6:8765:interface=\\:\\:1", "unix:/run/m")
        settings = self.load({"port": list(ports)})
        self.assertEqual((settings.ports, settings.tokens), (ports, ()))

    def test_insecureNoToken(self) -> None:
        """With insecure-no-token, from a flag or the file, an exposed port starts tokenless."""
        cases: list[tuple[dict[str, object], str | None]] = [
            ({"port": ["tcp:8765"], "insecure-no-token": 1}, None),
            ({"port": ["tcp:8765"]}, "insecure-no-token = true\n"),
        ]
        for flags, toml in cases:
            settings = self.load(flags, toml)
            self.assertEqual(
                (settings.ports, settings.insecure_no_token, settings.tokens),
                (("tcp:8765",), True, ()),
            )

    def test_withToken(self) -> None:
        """With a token file an exposed port is fine."""
        write_token_file(self.cwd, *TOKEN_LINES)
        settings = self.load({"port": ["tcp:8765"], "token-file": "tokens"})
        self.assertEqual((settings.tokens, settings.insecure_no_token), ((TOKEN,), False))

    def test_badInsecureNoToken(self) -> None:
        """insecure-no-token in the file must be true or false."""
        for value in ['"yes"', "2", '"true"']:
            self.assertBad(
                [f"{self.config_file}: insecure-no-token must be true or false"],
                toml=f"insecure-no-token = {value}\n",
            )


class BoundsTests(LoadTestCase):
    """The bounds on connections and jobs, and the sandbox."""

    def test_defaults(self) -> None:
        """Defaults: 300 s idle, 1000 connections, 10 GiB of results, no process cap, no sandbox."""
        settings = self.load()
        self.assertEqual(
            (
                settings.idle_timeout,
                settings.max_connections,
                settings.max_result_bytes,
                settings.max_job_processes,
                settings.sandbox,
            ),
            (300.0, 1000, 10 * 2**30, None, "none"),
        )

    def test_values(self) -> None:
        """Each bound is read from flags and from the file; sizes take units."""
        from_flags = self.load(
            {
                "idle-timeout": "2.5",
                "max-connections": "3",
                "max-result-bytes": "1MiB",
                "max-job-processes": "1",
                "sandbox": "none",
            }
        )
        from_file = self.load(
            toml=(
                "idle-timeout = 2.5\nmax-connections = 3\nmax-result-bytes = 1048576\n"
                'max-job-processes = 1\nsandbox = "none"\n'
            )
        )
        for settings in (from_flags, from_file):
            self.assertEqual(
                (
                    settings.idle_timeout,
                    settings.max_connections,
                    settings.max_result_bytes,
                    settings.max_job_processes,
                    settings.sandbox,
                ),
                (2.5, 3, 2**20, 1, "none"),
            )

    def test_badValues(self) -> None:
        """A bad bound stops the start with one line naming the setting and the rule."""
        cases: list[tuple[dict[str, object], list[str]]] = [
            ({"idle-timeout": "0"}, ["--idle-timeout must be a number of seconds greater than 0"]),
            ({"idle-timeout": "-5"}, ["--idle-timeout must be a number of seconds", "'-5'"]),
            ({"idle-timeout": "inf"}, ["--idle-timeout", "'inf'"]),
            ({"idle-timeout": "soon"}, ["--idle-timeout", "'soon'"]),
            ({"max-connections": "0"}, ["--max-connections must be a whole number of at least 1"]),
            ({"max-connections": "1.5"}, ["--max-connections must be a whole number", "'1.5'"]),
            ({"max-result-bytes": "1000"}, ["--max-result-bytes must be at least 1MiB"]),
            ({"max-result-bytes": "lots"}, ["--max-result-bytes must be a size", "'lots'"]),
            (
                {"max-job-processes": "0"},
                ["--max-job-processes must be a whole number of at least"],
            ),
            ({"sandbox": "docker"}, ["--sandbox must be one of none, bwrap", "'docker'"]),
            ({"sandbox": "Bwrap"}, ["--sandbox must be one of none, bwrap", "'Bwrap'"]),
            ({"sandbox": ""}, ["--sandbox must be one of none, bwrap"]),
        ]
        for flags, words in cases:
            self.assertBad(words, flags=flags)
        for toml, words in [
            ("idle-timeout = true\n", ["idle-timeout must be a number of seconds"]),
            ("max-connections = 2.0\n", ["max-connections must be a whole number"]),
            ("max-result-bytes = true\n", ["max-result-bytes must be a size"]),
            ("sandbox = true\n", ["sandbox must be one of none, bwrap"]),
            ('sandbox = ["bwrap"]\n', ["sandbox must be one of none, bwrap"]),
        ]:
            self.assertBad([f"{self.config_file}: {words[0]}"], toml=toml)

    def test_sandboxBwrap(self) -> None:
        """``sandbox = "bwrap"`` is accepted where bubblewrap is installed."""
        if shutil.which("bwrap") is None:
            raise self.skipTest("bubblewrap (bwrap) is not installed")
        self.assertEqual(self.load({"sandbox": "bwrap"}).sandbox, "bwrap")

    def test_sandboxBwrapMissing(self) -> None:
        """Without bubblewrap on PATH, ``--sandbox bwrap`` stops the start saying how to get it."""
        empty = os.path.abspath(self.mktemp())
        os.mkdir(empty)
        old = os.environ.get("PATH")
        os.environ["PATH"] = empty
        self.addCleanup(
            lambda: os.environ.pop("PATH") if old is None else os.environ.update(PATH=old)
        )
        self.assertBad(
            ["--sandbox bwrap needs bubblewrap", "apt install bubblewrap"],
            flags={"sandbox": "bwrap"},
        )


class SecurityOptionsTests(OptionsTestCase):
    """The security flags as ``twistd measuring`` reads them."""

    def toml(self, text: str) -> str:
        """A config file holding ``text``; returns its path."""
        path = os.path.join(self.folder, "measuring.toml")
        with open(path, "w") as f:
            f.write(f'state-dir = "{self.state}"\n{text}')
        return path

    def test_insecureNoTokenFlag(self) -> None:
        """--insecure-no-token lets an exposed --port start without a token."""
        settings = self.parse("--state-dir", self.state, "--port", "tcp:0", "--insecure-no-token")
        assert settings.config is not None
        self.assertEqual(
            (settings.config.ports, settings.config.insecure_no_token), (("tcp:0",), True)
        )

    def test_exposedWithoutFlagRefused(self) -> None:
        """Without it, the same --port stops the start."""
        error = self.assertRaises(
            UsageError, self.parse, "--state-dir", self.state, "--port", "tcp:0"
        )
        for word in ["--port 'tcp:0'", *EXPOSED_WORDS]:
            self.assertIn(word, str(error))

    def test_insecureNoTokenInFile(self) -> None:
        """``insecure-no-token = true`` in the file holds: the flag's default does not undo it."""
        path = self.toml('port = "tcp:0"\ninsecure-no-token = true\n')
        config = self.parse("--config", path).config
        assert config is not None
        self.assertTrue(config.insecure_no_token)

    def test_flags(self) -> None:
        """Each security flag reaches the settings."""
        token_file = write_token_file(self.folder, *TOKEN_LINES)
        config = self.parse(
            *("--state-dir", self.state, "--port", "tcp:0", "--token-file", token_file),
            *("--idle-timeout", "30", "--max-connections", "4", "--max-result-bytes", "2MiB"),
            *("--max-job-processes", "8", "--sandbox", "none"),
        ).config
        assert config is not None
        self.assertEqual(
            config,
            Config(
                ports=("tcp:0",),
                data_roots=(self.roots[0],),
                state_dir=self.state,
                workers=2,
                job_timeout=3600.0,
                max_request_bytes=2**20,
                job_memory=config.job_memory,
                tokens=(TOKEN,),
                token_file=token_file,
                idle_timeout=30.0,
                max_connections=4,
                max_result_bytes=2 * 2**20,
                max_job_processes=8,
                sandbox="none",
            ),
        )
