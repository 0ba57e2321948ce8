"""
``--sandbox bwrap``: worker processes inside bubblewrap (Debian's ``bwrap``).

A sandboxed worker sees the system's programs and libraries and Python read-only, the data roots
read-only, and one folder of its own, writable (its outbox: results and temporary files); not the
server's state directory, not its token file, not the network, not the server's processes (it has
a PID namespace of its own, which ends, with everything in it, when the worker's bwrap ends).
The server moves a job's results from the outbox into ``<Directory>/results/``. Plain Python.
"""

from __future__ import annotations

import os
import site
import sys

import measuring

#: The sandbox's own /tmp lives in memory, which the memory watch does not see: keep it small.
TMPFS_BYTES = 64 * 2**20
#: System folders a worker reads: programs, libraries, and the files Python and libc consult.
SYSTEM = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
SYSTEM_FILES = (
    "/etc/localtime",
    "/etc/timezone",
    "/etc/passwd",
    "/etc/group",
    "/etc/nsswitch.conf",
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/alternatives",
    "/etc/ssl",
    "/etc/ca-certificates",
    "/etc/mime.types",
)


def python_paths() -> list[str]:
    """The folders this Python and its packages live in (a venv and its base, site-packages)."""
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, measuring.PACKAGE_ROOT}
    paths.update(site.getsitepackages())
    paths.update(path for path in sys.path if path and os.path.isdir(path))
    return sorted(os.path.realpath(path) for path in paths if os.path.exists(path))


class Bubblewrap:
    """Builds the ``bwrap`` command line that runs a worker in the sandbox."""

    def __init__(
        self, data_roots: tuple[str, ...], hidden: tuple[str, ...] = (), bwrap: str = "bwrap"
    ) -> None:
        self._data_roots = data_roots
        self._hidden = hidden
        self._bwrap = bwrap

    def command(self, argv: list[str], outbox: str) -> list[str]:
        """``argv`` run in the sandbox, with ``outbox`` its one writable folder."""
        command = [
            self._bwrap,
            "--die-with-parent",
            "--new-session",
            "--unshare-pid",
            "--unshare-net",
            "--unshare-ipc",
            "--unshare-uts",
            "--proc", "/proc",
            "--dev", "/dev",
            "--size", str(TMPFS_BYTES), "--tmpfs", "/tmp",
        ]  # fmt: skip
        for path in SYSTEM:
            command += ["--ro-bind-try", path, path]
        for path in SYSTEM_FILES:
            command += ["--ro-bind-try", path, path]
        for path in [*python_paths(), *self._data_roots]:
            command += ["--ro-bind", path, path]
        for path in self._hidden:
            if os.path.isdir(path):
                command += ["--tmpfs", path]
            elif os.path.exists(path):
                command += ["--ro-bind", "/dev/null", path]
        command += ["--bind", outbox, outbox, "--chdir", outbox, "--"]
        return [*command, *argv]


def server_secrets(
    state_dir: str, token_file: str | None, config_file: str | None, ports: tuple[str, ...]
) -> tuple[str, ...]:
    """
    What a sandboxed formula must not read even where it may read: the server's own files (its
    state directory, token file, ``--config`` file and TLS key files), as real paths.
    """
    from measuring.server.access import secret_files

    named = [state_dir, token_file, config_file, *(f for port in ports for f in secret_files(port))]
    return tuple(os.path.realpath(path) for path in named if path)
