"""
Who may talk to the server: its tokens, and whether an endpoint can be reached from elsewhere.

``load_tokens`` reads the token file (refusing one that other users can read); ``Tokens`` checks
a request's token in constant time. ``beyond_loopback`` tells whether a ``--port`` description
listens where other machines can connect. Plain Python; nothing here logs a secret.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import socket
import stat

from measuring.server.pool.processes import prctl
from measuring.wire import token_lines

MIN_TOKEN = 16


def load_tokens(path: str) -> tuple[str, ...]:
    """
    The secrets in a token file: one per line; blank lines and lines starting with ``#`` are
    skipped. Raises ValueError with a message to act on.
    """
    try:
        mode = os.stat(path).st_mode
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise ValueError(f"cannot read it: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ValueError("it is not UTF-8 text") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ValueError(
            f"other users can read or change it (mode {stat.S_IMODE(mode):o}); run chmod 600 on it"
        )
    tokens = token_lines(lines)
    if not tokens:
        raise ValueError("it holds no token (one per line)")
    if any(len(token) < MIN_TOKEN for token in tokens):
        raise ValueError(f"a token in it is shorter than {MIN_TOKEN} characters")
    return tokens


class Tokens:
    """The tokens a request may carry; with none, every request is allowed."""

    def __init__(self, tokens: tuple[str, ...] = ()) -> None:
        self._tokens = [token.encode("utf-8") for token in tokens]

    @property
    def required(self) -> bool:
        return bool(self._tokens)

    def valid(self, token: object) -> bool:
        """True when ``token`` is one of the tokens, comparing with every one in constant time."""
        if not self._tokens:
            return True
        given = token.encode("utf-8", "surrogatepass") if isinstance(token, str) else b""
        matches = [hmac.compare_digest(given, known) for known in self._tokens]
        return isinstance(token, str) and any(matches)


def _split(description: str) -> tuple[str, list[str], dict[str, str]]:
    """An endpoint description as (kind, positional arguments, keyword arguments)."""
    parts, current, escaped = [], "", False
    for char in description:
        if escaped:
            current += char
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ":":
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    kind, arguments = parts[0].lower(), parts[1:]
    keywords = dict(part.split("=", 1) for part in arguments if "=" in part)
    return kind, [part for part in arguments if "=" not in part], keywords


#: Keyword arguments of TLS endpoint descriptions that name files with secrets in them.
SECRET_ARGUMENTS = ("privateKey", "certKey", "extraCertChain", "dhParameters")


def secret_files(description: str) -> list[str]:
    """The files an endpoint description names that hold its TLS secrets (none for plain TCP)."""
    kind, _, keywords = _split(description)
    if kind != "ssl":
        return []
    return [keywords[name] for name in SECRET_ARGUMENTS if keywords.get(name)]


def loopback(host: str) -> bool:
    """True when ``host`` (a name, or an address, IPv6 in brackets or not) is loopback."""
    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def beyond_loopback(description: str, fileno: int | None = None) -> bool:
    """
    True when the endpoint ``description`` may accept connections from other machines: TCP or
    TLS on every interface or on a non-loopback address, or a socket systemd passed that is
    (``fileno``: the descriptor Twisted adopts for it; by default 3 + its ``index``).
    """
    kind, _, keywords = _split(description)
    if kind in ("unix",):
        return False
    if kind in ("tcp", "ssl"):
        return not loopback(keywords.get("interface", "0.0.0.0"))
    if kind == "tcp6":
        return not loopback(keywords.get("interface", "::"))
    if kind == "systemd":
        if fileno is None and "index" not in keywords and "name" in keywords:
            return True
        return _passed_socket_beyond_loopback(
            fileno if fileno is not None else 3 + int(keywords.get("index", "0"))
        )
    return True


def _passed_socket_beyond_loopback(fd: int) -> bool:
    """
    Whether the socket systemd passed as ``fd`` listens beyond loopback. (Twisted removes
    LISTEN_PID and LISTEN_FDS from the environment once it has read them, so the descriptor
    itself is asked.) Anything that is not a socket counts as beyond.
    """
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            return True
        with socket.socket(fileno=os.dup(fd)) as passed:
            if passed.family == socket.AF_UNIX:
                return False
            return not loopback(passed.getsockname()[0])
    except OSError:
        return True


PR_SET_DUMPABLE = 4


def keep_private() -> None:
    """
    Make this process undumpable: its /proc files (environment, memory, open files) are then
    readable only by root, not by the formulas the server's workers run as the same user.
    """
    if os.uname().sysname == "Linux":
        prctl(PR_SET_DUMPABLE, 0)
