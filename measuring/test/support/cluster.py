"""
A real dask.distributed cluster on loopback for the cluster tests: ``dask scheduler`` and
``dask worker`` processes started by the tests (``DaskCluster``), a client of the test's own to
look at what the scheduler holds, and ``shared``: one cluster (and servers on it) for a whole
test class, started by its first test and stopped when the test run ends.

Every process is started with ``PR_SET_PDEATHSIG``, so none outlives the test run even when it
is killed. Plain blocking subprocesses: no reactor here.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

from measuring.test.support.system import closed_port

T = TypeVar("T")
PATIENCE = 60.0
POLL = 0.05
PR_SET_PDEATHSIG = 1
#: A preload for the scheduler and the workers that makes ``measuring`` unimportable there, as on
#: a cluster that does not have it installed: what a job needs of it must come by value.
NO_MEASURING = """
import sys


class NoMeasuring:
    def find_spec(self, name, path=None, target=None):
        if name == "measuring" or name.startswith("measuring."):
            raise ImportError(f"{name} is not installed on this cluster's workers")
        return None


sys.meta_path.insert(0, NoMeasuring())
for name in [name for name in sys.modules if name.split(".")[0] == "measuring"]:
    del sys.modules[name]
"""


def die_with_parent() -> None:
    """End this (child) process when its parent ends (``preexec_fn``)."""
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def dask_command() -> list[str]:
    """The ``dask`` command of this interpreter."""
    beside = os.path.join(os.path.dirname(sys.executable), "dask")
    if os.access(beside, os.X_OK):
        return [beside]
    return [sys.executable, "-m", "dask"]  # pragma: no cover


class DaskCluster:
    """
    A scheduler on ``127.0.0.1:port`` (a free one unless given, kept across restarts) and
    ``workers`` worker processes of one thread each; ``tls`` is ``(ca, cert, key)`` for a
    ``tls://`` cluster. Logs go to ``folder``.
    """

    def __init__(
        self,
        folder: str,
        workers: int = 2,
        tls: tuple[str, str, str] | None = None,
        preload: str | None = None,
    ) -> None:
        self.folder = folder
        self.workers = workers
        self.tls = tls
        self.preload = preload
        self.port = closed_port()
        self.address = f"{'tls' if tls else 'tcp'}://127.0.0.1:{self.port}"
        self.scheduler: subprocess.Popen[bytes] | None = None
        self.worker_processes: list[subprocess.Popen[bytes]] = []
        self._client: Any = None
        os.makedirs(folder, exist_ok=True)

    def _tls_options(self) -> list[str]:
        if self.tls is None:
            return []
        ca, cert, key = self.tls
        return ["--tls-ca-file", ca, "--tls-cert", cert, "--tls-key", key]

    def _start(self, name: str, arguments: list[str]) -> subprocess.Popen[bytes]:
        env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
        with open(os.path.join(self.folder, f"{name}.log"), "ab") as log:
            return subprocess.Popen(
                [*dask_command(), *arguments],
                cwd=self.folder,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent,
            )

    def start(self) -> DaskCluster:
        """Start the scheduler and the workers; return once the scheduler has every worker."""
        self.start_scheduler()
        unimportable = self._no_measuring()
        options = ["--nthreads", "1", "--no-nanny", "--no-dashboard", "--host", "127.0.0.1",
                   "--death-timeout", "60", "--preload", unimportable]  # fmt: skip
        options += self._tls_options()
        for n in range(self.workers):
            process = self._start(f"worker-{n}", ["worker", self.address, *options])
            self.worker_processes.append(process)
        self.client().wait_for_workers(self.workers, timeout=PATIENCE)
        return self

    def start_scheduler(self) -> None:
        """Start the scheduler (again) on the cluster's address."""
        arguments = ["scheduler", "--host", "127.0.0.1", "--port", str(self.port),
                     "--no-dashboard", *self._tls_options()]  # fmt: skip
        if self.tls is not None:
            arguments += ["--protocol", "tls"]
        arguments += ["--preload", self._no_measuring()]
        if self.preload is not None:
            arguments += ["--preload", self.preload]
        self.scheduler = self._start("scheduler", arguments)

    def _no_measuring(self) -> str:
        path = os.path.join(self.folder, "no_measuring.py")
        with open(path, "w") as f:
            f.write(NO_MEASURING)
        return path

    def stop_scheduler(self) -> None:
        """Kill the scheduler (its workers stay, and connect again when it is back)."""
        self._close_client()
        if self.scheduler is not None:
            _kill(self.scheduler)
            self.scheduler = None

    def client(self) -> Any:
        """The test's own client of the cluster (no task of its own)."""
        if self._client is None:
            from distributed import Client, Security

            security = None
            if self.tls is not None:
                ca, cert, key = self.tls
                security = Security(
                    tls_ca_file=ca,
                    tls_client_cert=cert,
                    tls_client_key=key,
                    require_encryption=True,
                )
            self._client = Client(
                self.address, security=security, timeout=PATIENCE, set_as_default=False
            )
        return self._client

    def _close_client(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close(timeout=5)
            self._client = None

    # The functions run on the scheduler and the workers are lambdas, which travel by value:
    # a function of this module would make them import it, and with it twisted, whose pickling
    # of methods (twisted.persisted.styles) would then garble what they send each other.

    def tasks(self) -> int:
        """How many tasks the scheduler holds, of any state."""
        count: int = self.client().run_on_scheduler(
            lambda dask_scheduler: len(dask_scheduler.tasks)
        )
        return count

    def executing(self) -> int:
        """How many tasks the workers are executing now."""
        running: dict[str, int] = self.client().run(
            lambda dask_worker: len(dask_worker.state.executing)
        )
        return sum(running.values())

    def worker_addresses(self) -> set[str]:
        """The addresses of the cluster's workers."""
        return set(self.client().scheduler_info(n_workers=-1)["workers"])

    def stop(self) -> None:
        """Stop every process of the cluster."""
        self._close_client()
        for process in [*self.worker_processes, *([self.scheduler] if self.scheduler else [])]:
            _kill(process)
        self.worker_processes, self.scheduler = [], None

    def logs(self) -> str:
        """What the cluster's processes logged, for a failing test's message."""
        text = []
        for name in sorted(os.listdir(self.folder)):
            if name.endswith(".log"):
                with open(os.path.join(self.folder, name), errors="replace") as f:
                    text.append(f"--- {name}\n{f.read()[-3000:]}")
        return "\n".join(text)


def _kill(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_for(
    condition: Callable[[], T | None], what: str | Callable[[], str], patience: float = PATIENCE
) -> T:
    """Poll ``condition`` until it gives something true, and return that; AssertionError after
    ``patience`` seconds, naming ``what`` was waited for."""
    deadline = time.monotonic() + patience
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(
                f"waited {patience:g} s for {what if isinstance(what, str) else what()}"
            )
        time.sleep(POLL)


class Shared:
    """Fixtures made once per test run on first use, ended when the run ends."""

    def __init__(self) -> None:
        self._made: dict[str, Any] = {}
        self._ends: list[Callable[[], None]] = []
        atexit.register(self.end)

    def get(self, name: str, make: Callable[[], T], end: Callable[[T], None]) -> T:
        """The fixture called ``name``, made by ``make`` the first time; ``end`` ends it."""
        if name not in self._made:
            made = self._made[name] = make()
            self._ends.append(lambda: end(made))
        found: T = self._made[name]
        return found

    def end(self) -> None:
        while self._ends:
            with contextlib.suppress(Exception):
                self._ends.pop()()
        self._made.clear()


shared = Shared()
