"""
What tests look at or make on this machine, outside any server: which processes still run, carry a
job's mark or name a folder, a port nothing listens on, a token file, and whether bubblewrap can
make a sandbox. Plain Python: no reactor here.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterable

import psutil

from measuring.messages import JOB_MARK

#: What ``write_token_file`` writes unless told: a token long enough for the server.
TOKEN = "a-token-long-enough-for-the-server"


def alive(pids: Iterable[int]) -> list[int]:
    """Those of ``pids`` that are still running (a zombie has ended)."""
    running = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                running.append(pid)
        except psutil.NoSuchProcess:
            continue
    return running


def gone(pid: int) -> bool:
    """True when process ``pid`` has ended (a zombie waiting for its parent counts as ended)."""
    return not alive([pid])


def end(pid: int) -> None:
    """Kill process ``pid`` unless it has ended."""
    if not gone(pid):
        os.kill(pid, signal.SIGKILL)


def carrying(job: str) -> list[int]:
    """Pids of the running processes whose environment marks them as ``job``'s."""
    found = []
    for process in psutil.process_iter(["environ", "status"]):
        environ = process.info["environ"] or {}
        if environ.get(JOB_MARK) == job and process.info["status"] != "zombie":
            found.append(process.pid)
    return found


def naming(folder: str) -> list[int]:
    """Pids of the processes whose command line names ``folder``."""
    return [
        process.pid
        for process in psutil.process_iter(["cmdline"])
        if folder in " ".join(process.info["cmdline"] or [])
    ]


def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def write_token_file(folder: str, *lines: str, mode: int = 0o600, name: str = "tokens") -> str:
    """
    ``folder``/``name`` holding ``lines`` (by default, ``TOKEN``), with permissions ``mode``: by
    default only its owner may read it (the server refuses any other). Returns its path.
    """
    path = os.path.join(folder, name)
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        f.write("".join(line + "\n" for line in lines or [TOKEN]))
    os.chmod(path, mode)
    return path


@functools.cache
def bwrap_missing() -> str | None:
    """Why ``--sandbox bwrap`` cannot run on this machine, or None when it can."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return "bubblewrap (bwrap) is not installed; Debian: apt install bubblewrap"
    sandbox = ["--unshare-pid", "--unshare-net", "--proc", "/proc", "--dev", "/dev"]
    probe = subprocess.run(
        [bwrap, "--ro-bind", "/", "/", *sandbox, "true"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if probe.returncode != 0:
        return f"bwrap cannot make a sandbox on this machine: {probe.stderr.strip()}"
    return None
