"""
Tests for ``measuring.server.access``: reading the token file, checking a request's token, telling
whether a ``--port`` can be reached from other machines, and making the server undumpable.

Sockets systemd would pass are real sockets of this process, reached through ``index`` (their
descriptor minus 3), so no descriptor of the test process is replaced. The one case that needs
descriptors 3 and 4 (and Twisted reading systemd's variables) runs in a child process.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap

from twisted.trial.unittest import SynchronousTestCase

from measuring.server.access import MIN_TOKEN, Tokens, beyond_loopback, load_tokens
from measuring.test.support import environment

FIRST = "first-secret-0123456789"
SECOND = "second-secret-abcdefghij"


class LoadTokensTests(SynchronousTestCase):
    """``load_tokens`` reads one secret per line from a file only its owner can read."""

    def write(self, text: str | bytes, mode: int = 0o600) -> str:
        """A token file holding ``text``, with permissions ``mode``; returns its path."""
        path = os.path.abspath(self.mktemp())
        with open(path, "wb") as f:
            f.write(text.encode() if isinstance(text, str) else text)
        os.chmod(path, mode)
        return path

    def assertRefused(self, path: str, *words: str) -> None:
        """Loading ``path`` raises ValueError whose message has ``words``."""
        message = str(self.assertRaises(ValueError, load_tokens, path))
        for word in words:
            self.assertIn(word, message)

    def test_onePerLine(self) -> None:
        """Each line is a token, stripped of surrounding spaces, in the file's order."""
        path = self.write(f"{FIRST}\n  {SECOND}  \r\n")
        self.assertEqual(load_tokens(path), (FIRST, SECOND))

    def test_blankAndCommentLinesSkipped(self) -> None:
        """Blank lines and lines starting with # are not tokens."""
        path = self.write(f"# made 2026-11-28, rotate in May\n\n   \n{FIRST}\n#{SECOND}\n")
        self.assertEqual(load_tokens(path), (FIRST,))

    def test_indentedCommentSkipped(self) -> None:
        """A comment line indented with spaces is a comment too, never a valid token."""
        path = self.write(f"{FIRST}\n    # the old one, removed in May\n")
        self.assertEqual(load_tokens(path), (FIRST,))

    def test_readableByOthersRefused(self) -> None:
        """A file the group or others may read, write or run is refused, naming its mode."""
        for mode in (0o640, 0o604, 0o620, 0o602, 0o644, 0o610):
            path = self.write(FIRST + "\n", mode)
            self.assertRefused(path, "other users can read or change it", f"mode {mode:o}")
            self.assertRefused(path, "chmod 600")

    def test_ownerOnlyModesAccepted(self) -> None:
        """Modes 600 and 400 are accepted."""
        for mode in (0o600, 0o400):
            self.assertEqual(load_tokens(self.write(FIRST, mode)), (FIRST,))

    def test_noTokenRefused(self) -> None:
        """An empty file, or one of blank and comment lines only, is refused."""
        for text in ["", "\n\n", "# no token yet\n   \n"]:
            self.assertRefused(self.write(text), "holds no token", "one per line")

    def test_shortTokenRefused(self) -> None:
        """A token shorter than 16 characters is refused, even beside good ones."""
        self.assertEqual(MIN_TOKEN, 16)
        self.assertEqual(load_tokens(self.write("x" * 16)), ("x" * 16,))
        for text in ["x" * 15, f"{FIRST}\nshort\n", "  hunter2  "]:
            self.assertRefused(self.write(text), "shorter than 16 characters")

    def test_unreadableRefused(self) -> None:
        """A missing file, a folder, or a file that is not UTF-8 is refused saying why."""
        missing = os.path.abspath(self.mktemp())
        self.assertRefused(missing, "cannot read it", "No such file")
        folder = os.path.abspath(self.mktemp())
        os.mkdir(folder, 0o700)
        self.assertRefused(folder, "cannot read it")
        self.assertRefused(self.write(b"\xff\xfe" + FIRST.encode()), "not UTF-8")


class TokensTests(SynchronousTestCase):
    """``Tokens.valid`` accepts one of the known tokens and nothing else."""

    def test_rightToken(self) -> None:
        """The token from the file is valid."""
        self.assertTrue(Tokens((FIRST,)).valid(FIRST))

    def test_wrongToken(self) -> None:
        """Another string, a prefix, an extension, or a different case is not valid."""
        tokens = Tokens((FIRST,))
        for token in [SECOND, FIRST[:-1], FIRST + "0", FIRST.upper(), "", " " + FIRST]:
            self.assertFalse(tokens.valid(token), token)

    def test_missingToken(self) -> None:
        """No token at all (None) is not valid."""
        self.assertFalse(Tokens((FIRST,)).valid(None))

    def test_nonStringToken(self) -> None:
        """A number, list, object, bytes or true is not valid, even holding the token."""
        tokens = Tokens((FIRST,))
        for token in [12345678901234567890, [FIRST], {"Token": FIRST}, FIRST.encode(), True]:
            self.assertFalse(tokens.valid(token), token)

    def test_unencodableToken(self) -> None:
        """A string JSON allows but UTF-8 cannot encode (a lone surrogate) is simply not valid."""
        self.assertFalse(Tokens((FIRST,)).valid("\ud800" + FIRST))

    def test_severalTokensForRotation(self) -> None:
        """With several tokens, each of them is valid, and only they are."""
        tokens = Tokens((FIRST, SECOND))
        self.assertTrue(tokens.required)
        self.assertTrue(tokens.valid(FIRST))
        self.assertTrue(tokens.valid(SECOND))
        self.assertFalse(tokens.valid(FIRST + SECOND))

    def test_noTokensAllowsEverything(self) -> None:
        """Without tokens none is required, and any Token, or none, is valid."""
        tokens = Tokens()
        self.assertFalse(tokens.required)
        for token in [None, "", FIRST, 5, ["x"]]:
            self.assertTrue(tokens.valid(token), token)


class BeyondLoopbackTests(SynchronousTestCase):
    """``beyond_loopback`` tells which ``--port`` descriptions other machines could reach."""

    def test_descriptions(self) -> None:
        """TCP and TLS on every interface or a LAN address are exposed; loopback and unix not."""
        cases = [
            ("tcp:8765", True),
            ("tcp:8765:interface=127.0.0.1", False),
            ("tcp:port=8765:interface=127.0.0.1", False),
            ("tcp:8765:interface=127.0.0.2", False),
            ("tcp:8765:interface=localhost", False),
            ("tcp:8765:interface=0.0.0.0", True),
            ("tcp:8765:interface=192.168.1.20", True),
            ("tcp:8765:interface=10.0.0.1:backlog=5", True),
            ("TCP:8765:interface=127.0.0.1", False),
            ("tcp6:8765:interface=\\:\\:1", False),
            ("tcp6:8765", True),
            ("tcp6:8765:interface=\\:\\:", True),
            ("ssl:8765:privateKey=k:certKey=c:interface=127.0.0.1", False),
            ("ssl:8765:privateKey=k:certKey=c", True),
            ("ssl:8765:privateKey=C\\:/keys/k.pem:certKey=c.pem:interface=127.0.0.1", False),
            ("ssl:8765:privateKey=/a\\:b=c.pem:interface=0.0.0.0", True),
            ("unix:/x", False),
            ("unix:/run/measuring.sock:mode=660", False),
            ("systemd:domain=INET:index=1000", True),
            ("onion:8765", True),
        ]
        for description, exposed in cases:
            self.assertEqual(beyond_loopback(description), exposed, description)

    def passed(self, family: int, address: tuple[str, int] | str) -> int:
        """A bound socket of this process, as systemd would pass it; returns its ``index``."""
        passed = socket.socket(family, socket.SOCK_STREAM)
        self.addCleanup(passed.close)
        passed.bind(address)
        passed.listen(1)
        return passed.fileno() - 3

    def systemd(self, index: int) -> bool:
        """``beyond_loopback`` for the socket systemd passed as ``index``."""
        return beyond_loopback(f"systemd:domain=INET:index={index}")

    def test_systemdLoopbackSocket(self) -> None:
        """A socket systemd passed that listens on loopback is not exposed."""
        self.assertFalse(self.systemd(self.passed(socket.AF_INET, ("127.0.0.1", 0))))
        self.assertFalse(self.systemd(self.passed(socket.AF_INET6, ("::1", 0))))

    def test_systemdUnixSocket(self) -> None:
        """A unix socket systemd passed is not exposed."""
        # A unix socket's path is short (108 bytes): not below the test's deep temp folder.
        folder = tempfile.mkdtemp(prefix="measuring-")
        self.addCleanup(shutil.rmtree, folder, True)
        self.assertFalse(self.systemd(self.passed(socket.AF_UNIX, os.path.join(folder, "s"))))

    def test_systemdSocketOnEveryInterface(self) -> None:
        """A socket systemd passed that is bound to every interface is exposed."""
        self.assertTrue(self.systemd(self.passed(socket.AF_INET, ("0.0.0.0", 0))))

    def test_systemdNoSocket(self) -> None:
        """A descriptor that is no socket, or none at all, counts as exposed."""
        read, write = os.pipe()
        self.addCleanup(os.close, read)
        self.addCleanup(os.close, write)
        self.assertTrue(self.systemd(read - 3))
        self.assertTrue(self.systemd(1000))

    def test_systemdSocketByName(self) -> None:
        """A socket chosen by name= is judged by the descriptor Twisted adopts for it.

        Without that descriptor, a socket named but not indexed counts as reaching beyond.
        """
        script = textwrap.dedent(
            """
            import os, socket
            loopback = socket.socket(); loopback.bind(("127.0.0.1", 0)); loopback.listen(1)
            anywhere = socket.socket(); anywhere.bind(("0.0.0.0", 0)); anywhere.listen(1)
            os.dup2(loopback.fileno(), 3)
            os.dup2(anywhere.fileno(), 4)
            os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="2")
            os.environ.update(LISTEN_FDNAMES="admin:web")
            from twisted.internet import endpoints, reactor
            from measuring.server.access import beyond_loopback
            for name in ("admin", "web"):
                description = f"systemd:domain=INET:name={name}"
                adopted = endpoints.serverFromString(reactor, description).fileno
                print(name, adopted, beyond_loopback(description, adopted))
                print(name, "unknown", beyond_loopback(description))
            """
        )
        output = subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            check=True,
            env=environment(),
        ).stdout
        self.assertEqual(
            output.splitlines(),
            ["admin 3 False", "admin unknown True", "web 4 True", "web unknown True"],
        )


class KeepPrivateTests(SynchronousTestCase):
    """``keep_private`` makes the server process undumpable (in a child, to spare this one)."""

    def test_undumpable(self) -> None:
        """After keep_private, prctl(PR_GET_DUMPABLE) says 0; before, 1."""
        if not sys.platform.startswith("linux"):
            raise self.skipTest("prctl is Linux only")
        script = textwrap.dedent(
            """
            import ctypes
            from measuring.server.access import keep_private
            prctl = ctypes.CDLL(None).prctl
            before = prctl(3, 0, 0, 0, 0)
            keep_private()
            print(before, prctl(3, 0, 0, 0, 0))
            """
        )
        output = subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            check=True,
            env=environment(),
        ).stdout
        self.assertEqual(output, "1 0\n")
