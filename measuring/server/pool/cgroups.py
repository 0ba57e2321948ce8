"""
Containing each job: a cgroup of its own where this process may make one, and a guard process
that ends every job's processes when the server dies, however it dies (``kill -9`` included).

``Containment`` finds the cgroup v2 folder this process is in; where it may make folders there
(root, or systemd's ``Delegate=yes``) and the kernel has ``cgroup.kill`` (5.14), each job process
joins ``<that folder>/measuring-<hash of the state directory>/job-<key>`` as its first act, so
everything it starts stays in it, whatever session, process group or environment it takes; at
the job's end ``end`` kills what is left there (``cgroup.kill``) and removes the folder. The
guard (``guard``: a small process of the standard library only) waits on a pipe whose other end
only this process holds: when this process ends, it ends every job's cgroup and every process
carrying the server's mark. Where no cgroup can be had, that mark is all there is: a process that
leaves both its job's process tree and that environment outlives a server killed with SIGKILL
(docs/deploy.md, Operations). The pool calls ``job_cgroup`` and ``end`` (see ``pool``); file
calls are quick writes to the cgroup file system, ``end`` and the sweep wait and run in a thread.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import sys

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import IReactorProcess
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from measuring.server.pool.guard import PREFIX, kill_group


def own_cgroup(proc: str = "/proc/self") -> tuple[str | None, str]:
    """The cgroup v2 folder of this process, or None and why there is none."""
    try:
        with open(os.path.join(proc, "cgroup")) as f:
            lines = f.read().splitlines()
        with open(os.path.join(proc, "mountinfo")) as f:
            mounts = f.read().splitlines()
    except OSError as e:
        return None, f"cannot read {proc}/cgroup: {e.strerror}"
    path = next((line[3:] for line in lines if line.startswith("0::")), None)
    if path is None:
        return None, "this process is in no cgroup v2 (the unified hierarchy is not mounted)"
    mount = next(
        (line.split()[4] for line in mounts if " - cgroup2 " in line and len(line.split()) > 4),
        None,
    )
    if mount is None:
        return None, "no cgroup2 file system is mounted"
    return os.path.join(mount, path.lstrip("/")), ""


class _Guard(ProcessProtocol):
    """The guard process, seen from here: ended, it says so."""

    def __init__(self) -> None:
        self.ended: defer.Deferred[None] = defer.Deferred()

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(None)


class Containment(Service):
    """The jobs' cgroups (where they can be had) and the guard that ends jobs with the server."""

    _log = Logger()

    def __init__(
        self,
        reactor: IReactorProcess,
        state_dir: str,
        mark: str,
        cgroup: tuple[str | None, str] | None = None,
    ) -> None:
        """``mark``: the server's (``SERVER_MARK``); ``cgroup``: ``own_cgroup()`` unless given."""
        self._reactor = reactor
        self._mark = mark
        self._name = "measuring-" + hashlib.sha256(state_dir.encode()).hexdigest()[:12]
        self._own, self.why = cgroup if cgroup is not None else own_cgroup()
        self.folder: str | None = None
        self._guard: _Guard | None = None

    def startService(self) -> None:
        super().startService()
        self.folder = self._make_folder()
        if self.folder is None:
            self._log.warn(
                "no cgroup for the jobs ({why}): a process a formula starts that leaves its "
                "job's process tree and clears its environment outlives a server killed with "
                "SIGKILL (docs/deploy.md, Operations)",
                why=self.why,
            )
        self._start_guard()

    def _make_folder(self) -> str | None:
        """The folder of the jobs' cgroups, made if missing and emptied; None if none can be."""
        if self._own is None:
            return None
        folder = os.path.join(self._own, self._name)
        probe = os.path.join(folder, PREFIX + "probe-" + secrets.token_hex(4))
        try:
            os.makedirs(folder, exist_ok=True)
            os.mkdir(probe)
            has_kill = os.path.exists(os.path.join(probe, "cgroup.kill"))
            os.rmdir(probe)
        except OSError as e:
            self.why = f"cannot make cgroups in {self._own}: {e.strerror}"
            return None
        if not has_kill:
            self.why = "the kernel has no cgroup.kill (Linux 5.14 or newer has)"
            return None
        left = [name for name in os.listdir(folder) if name.startswith(PREFIX)]
        for name in left:  # what a server that died left: its jobs' processes end now
            kill_group(os.path.join(folder, name))
        if left:
            self._log.warn("ended the cgroups of {n} jobs a previous server left", n=len(left))
        return folder

    def _start_guard(self) -> None:
        self._guard = _Guard()
        argv = [sys.executable, "-P", "-m", "measuring.server.pool.guard", self._mark,
                self.folder or "-"]  # fmt: skip
        # Only this process holds the write end of the guard's stdin: its end is the signal.
        environment = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        self._reactor.spawnProcess(
            self._guard, argv[0], argv, env={**environment, "PYTHONPATH": _package_root()},
            childFDs={0: "w", 1: "r", 2: "r"},
        )  # fmt: skip

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        guard, self._guard = self._guard, None
        if guard is None or guard.transport is None:
            return defer.succeed(None)
        guard.transport.closeStdin()
        return guard.ended

    @property
    def guard_pid(self) -> int | None:
        """The guard's pid, while it runs."""
        guard = self._guard
        return getattr(guard.transport, "pid", None) if guard is not None else None

    def job_cgroup(self, key: str) -> str | None:
        """A new cgroup for the job process of ``key``, for it to join; None without cgroups."""
        if self.folder is None:
            return None
        path = os.path.join(self.folder, PREFIX + key)
        try:
            os.mkdir(path)
        except OSError as e:
            self._log.warn("no cgroup for a job ({why})", why=e.strerror)
            return None
        return path

    def end(self, key: str) -> None:
        """Kill whatever is left in the cgroup of ``key`` and remove it (blocking: a thread)."""
        if self.folder is not None:
            kill_group(os.path.join(self.folder, PREFIX + key))


def _package_root() -> str:
    import measuring

    return measuring.PACKAGE_ROOT
