"""
Runs in the job's process when the server has a cluster (``--scheduler``): the job's computation
on the cluster's workers, through a ``distributed.Client`` of the job's own.

``Remote.connect`` opens the client (versions checked: ``measuring.cluster``); ``adopt`` makes the
formula module and ``measuring``'s own code travel to the workers by value (they need not have
either); ``compute`` computes collections through that client,
reports Done/Total from the scheduler (Dask's local callbacks see no task of a distributed
computation), and cancels and releases the job's futures when the computation fails or the job is
stopped (SIGTERM: Timeout, Cancel, the server's stop). A process killed outright loses its
connection, and the scheduler then releases its futures by itself. Never imports twisted or
``measuring.server``.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
import threading
import traceback
import types
from collections.abc import Callable
from types import FrameType, ModuleType
from typing import TYPE_CHECKING, Any

import measuring
from measuring.cluster import ClusterSettings, close, connect
from measuring.errors import Unavailable

if TYPE_CHECKING:
    from distributed import Client

Progress = Callable[[int, int], None]
#: Seconds between two looks of the scheduler at a job's tasks.
EVERY = 0.25
#: How long to wait, once the results are in, for the scheduler's last count.
LAST_COUNT = 1.0
#: The file name cloudpickle gives the code it pickles.
BLANK_FILENAME = "<dynamic-code>"


class _Stopped(BaseException):
    """The job's process was asked to end (SIGTERM) while it computed."""


def _stop(signum: int, frame: FrameType | None) -> None:
    raise _Stopped()


class Remote:
    """One job's connection to the cluster."""

    def __init__(self, client: Client, settings: ClusterSettings) -> None:
        self._client = client
        self._settings = settings

    @classmethod
    def connect(cls, fields: dict[str, Any] | None, job: str) -> Remote | None:
        """The job's connection, or None when the job runs here; Unavailable when it cannot."""
        if not fields:
            return None
        settings = ClusterSettings.from_message(fields)
        remote = cls(connect(settings, f"measuring-{job}"), settings)
        if not remote._client.scheduler_info(n_workers=0).get("n_workers"):
            print(
                f"the cluster at {settings.address} has no workers now: the job waits for some",
                file=sys.stderr,
            )
        return remote

    def adopt(self, module: ModuleType) -> None:
        """
        Make the formula ``module`` and ``measuring`` itself (its dataset readers) travel to the
        cluster's workers by value: pickled whole, not by a name they would have to import.
        Nothing is uploaded to the cluster, and each job's module has a name of its own, so two
        jobs whose formula files have the same name never see each other's code (nor share the
        keys of its tasks). Modules the formulas import must be installed on the workers.
        """
        import cloudpickle

        cloudpickle.register_pickle_by_value(measuring)
        cloudpickle.register_pickle_by_value(module)
        _pickle_with_cloudpickle()

    def compute(self, collections: list[Any], progress: Progress | None = None) -> list[Any]:
        """
        The values of ``collections``, computed together on the cluster; ``progress(done,
        total)`` hears of the tasks as they complete. Whatever way this ends but with the values,
        the job's futures are cancelled first.
        """
        from distributed.client import FutureCancelledError

        client = self._client
        futures = client.compute(collections)
        counter = _TaskCounter(client, futures, progress) if progress is not None else None
        previous = signal.signal(signal.SIGTERM, _stop)
        done = False
        try:
            values: list[Any] = client.gather(futures)
            done = True
        except _Stopped:
            self._end(futures)
            # End as the signal would have ended the process, now that the cluster is clean.
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            raise
        except FutureCancelledError as e:
            if client.status != "running" or "connection" in str(e.reason):
                raise Unavailable(
                    f"the connection to the cluster's scheduler at {self._settings.address} was "
                    f"lost during the job ({e.reason}); send it again when the cluster is back"
                ) from None
            raise
        finally:
            signal.signal(signal.SIGTERM, previous)
            if not done:
                self._cancel(futures)
            if counter is not None:
                counter.finish(done)
        return values

    def _cancel(self, futures: list[Any]) -> None:
        try:
            self._client.cancel(futures, force=True)
        except Exception as e:
            print(f"cancelling the job's tasks on the cluster failed: {e}", file=sys.stderr)

    def _end(self, futures: list[Any]) -> None:
        self._cancel(futures)
        self.close()

    def close(self) -> None:
        """Let go of the cluster: the scheduler releases whatever the job still held."""
        close(self._client)


def in_file_remotely(frame: traceback.FrameSummary, path: str) -> bool:
    """
    True when ``frame``, of a traceback from a cluster worker, ran code of the file at ``path``.

    Code that travelled by value has lost its file name on the way (cloudpickle blanks it); its
    function's name and line number still say where in the file it comes from.
    """
    return frame.filename == BLANK_FILENAME and (frame.name, frame.lineno) in _lines(path)


@functools.cache
def _lines(path: str) -> frozenset[tuple[str, int]]:
    """``(function name, line)`` of every line of code in the Python file at ``path``."""
    try:
        with open(path, "rb") as f:
            code = compile(f.read(), path, "exec")
    except (OSError, SyntaxError, ValueError):
        return frozenset()
    found: set[tuple[str, int]] = set()
    waiting = [code]
    while waiting:
        one = waiting.pop()
        found.update((one.co_name, line) for _, _, line in one.co_lines() if line is not None)
        waiting.extend(const for const in one.co_consts if isinstance(const, types.CodeType))
    return frozenset(found)


def _pickle_with_cloudpickle() -> None:
    """
    Make distributed pickle what this process sends with cloudpickle, which honours
    ``register_pickle_by_value`` for every object inside what it pickles. distributed first
    tries the standard pickle, which sends a module-level function or class by its name whenever
    its module is importable here (the formula module, ``measuring``): the cluster's workers then
    fail to import it. Only this job's process is changed.
    """
    import cloudpickle
    from distributed.protocol import pickle

    if getattr(pickle.dumps, "by_value", False):
        return

    def dumps(
        x: Any, *, buffer_callback: Callable[[Any], None] | None = None, protocol: int | None = None
    ) -> bytes:
        data: bytes = cloudpickle.dumps(
            x, protocol=protocol or pickle.HIGHEST_PROTOCOL, buffer_callback=buffer_callback
        )
        return data

    dumps.by_value = True  # type: ignore[attr-defined]
    pickle.dumps = dumps


class _TaskCounter:
    """
    Done/Total of a job's tasks, as the scheduler counts them (distributed's ``Progress``
    plugin, fed by its progress bar's stream), passed to ``report`` until ``finish``.
    """

    def __init__(self, client: Any, futures: list[Any], report: Progress) -> None:
        from distributed.diagnostics.progressbar import ProgressBar

        self._report = report
        self._lock = threading.Lock()
        self._open = True
        self._last: tuple[int, int] | None = None
        self._finished = threading.Event()
        counter = self

        class Bar(ProgressBar):
            """distributed's progress bar, drawing into ``report``."""

            def _draw_bar(self, remaining: int = 0, all: int = 0, **kwargs: Any) -> None:
                counter._seen(all - remaining, all)

            def _draw_stop(self, **kwargs: Any) -> None:
                counter._finished.set()

        self._client = client
        self._bar = Bar(futures, scheduler=client.scheduler.address, interval=EVERY)
        client.loop.add_callback(self._listen)

    async def _listen(self) -> None:
        try:
            await self._bar.listen()
        except Exception as e:  # progress is news, never the job's failure
            print(f"the cluster's task count stopped: {e}", file=sys.stderr)
        finally:
            self._finished.set()

    def _seen(self, done: int, total: int) -> None:
        with self._lock:
            self._last = (done, total)
            if self._open:
                self._report(done, total)

    def finish(self, done: bool) -> None:
        """Stop reporting; when the job's values are in, report all its tasks done last."""
        if done:
            self._finished.wait(LAST_COUNT)
        with self._lock:
            self._open = False
            last = self._last
        if done and last is not None and last[0] < last[1]:
            self._report(last[1], last[1])
        comm = getattr(self._bar, "comm", None)
        if comm is not None:
            self._client.loop.add_callback(comm.abort)
