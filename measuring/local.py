"""
A real ``twistd -n measuring`` on this machine, in a subprocess, and blocking connections to it.

For the demo and the tests: ``LocalServer`` starts the server on a free loopback port (``tcp:0``;
the server logs the port it got, so nothing races for it) and stops it the way systemd does.
``Connection`` speaks the protocol over a plain socket. Plain Python: no reactor here.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any

import measuring

PACKAGE_ROOT = measuring.PACKAGE_ROOT
LISTENING = "measuring listening on "


def environment() -> dict[str, str]:
    """The environment for a subprocess that must import this same ``measuring``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [PACKAGE_ROOT, env.get("PYTHONPATH")]))
    return env


def twistd() -> list[str]:
    """The command that runs ``twistd`` with this interpreter."""
    beside = os.path.join(os.path.dirname(sys.executable), "twistd")
    if os.access(beside, os.X_OK):
        return [beside]
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


class LocalServer:
    """The server in a subprocess, its output in ``log_path``."""

    def __init__(self, folder: str, *arguments: str, patience: float = 60.0) -> None:
        self.folder = folder
        self.patience = patience
        self.log_path = os.path.join(folder, "server.log")
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed by stop)
        self.process = subprocess.Popen(
            [
                *twistd(), "-n", "--pidfile=", "measuring",
                "--port", "tcp:0:interface=127.0.0.1",
                "--state-dir", os.path.join(folder, ".measuring"),
                *arguments,
            ],
            cwd=folder,
            env=environment(),
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        #: Where the server says it listens, ``host:port``; and the port.
        self.address = self._wait_for_address()
        self.port = int(self.address.rsplit(":", 1)[1])

    def log(self) -> str:
        """Everything the server has logged so far."""
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def _wait_for_address(self) -> str:
        deadline = time.monotonic() + self.patience
        while time.monotonic() < deadline:
            for line in self.log().splitlines():
                if LISTENING in line:
                    return line.split(LISTENING)[1].split()[0]
            if self.process.poll() is not None:
                self._log.close()
                raise RuntimeError(f"the server exited at start:\n{self.log()}")
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"the server did not listen within {self.patience} s:\n{self.log()}")

    def connect(self) -> Connection:
        return Connection(self.port, timeout=self.patience)

    def ask(self, request: dict[str, Any] | str) -> dict[str, Any]:
        """Send one request on a new connection and return its answer."""
        with self.connect() as connection:
            return connection.ask(request)

    def wait_until_ready(self) -> None:
        """Ask for Status until the template process has loaded and warmed up."""
        deadline = time.monotonic() + self.patience
        while time.monotonic() < deadline:
            workers = self.ask({"Header": "Info", "Request": "Status"})["Response"]["Workers"]
            if workers["Template"] == "ready":
                return
            time.sleep(0.05)
        raise RuntimeError(f"the template process was not ready within {self.patience} s")

    def stop(self) -> int:
        """Stop the server as systemd does (SIGTERM, then SIGKILL) and return its exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(self.patience)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


class Connection:
    """One blocking client connection: a JSON line out, JSON lines back."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 60.0) -> None:
        self.socket = socket.create_connection((host, port), timeout=timeout)
        self._file = self.socket.makefile("rwb")

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()
        self.socket.close()

    def send(self, request: dict[str, Any] | str | bytes) -> None:
        """Send a request object, or raw text or bytes (a newline is added)."""
        if isinstance(request, dict):
            request = json.dumps(request)
        if isinstance(request, str):
            request = request.encode("utf-8")
        self._file.write(request + b"\n")
        self._file.flush()

    def receive(self) -> dict[str, Any]:
        """The next answer line; ConnectionError when the server has closed the connection."""
        line = self._file.readline()
        if not line:
            raise ConnectionError("the server closed the connection")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def ask(self, request: dict[str, Any] | str | bytes) -> dict[str, Any]:
        self.send(request)
        return self.receive()
