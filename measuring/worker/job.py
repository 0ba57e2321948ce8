"""
Runs inside a worker process: one job, then exit.

``python -m measuring.worker PARENT_PID`` imports Dask, pandas and pyarrow, warms them up with a
tiny computation, says Ready and waits for one job (see ``messages``). It then imports the
formula file, calls every formula on the dataset, computes them all in one ``dask.compute`` call,
writes the results (``loader``) and reports back. Everything the formulas print goes to stdout and
stderr, which the server keeps as the job's log. This module never imports the reactor.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import os
import signal
import sys
import tempfile
import traceback
from collections.abc import Callable
from types import ModuleType
from typing import Any

import psutil
from dask.callbacks import Callback

from measuring.errors import Internal, JobFailed, MeasuringError, NotFound
from measuring.messages import JOB_MARK, Message, job_tmp
from measuring.wire import ENGINES
from measuring.worker import dataset as datasets
from measuring.worker.output import ResultWriter, WriteFailed, is_table, summarize

#: Threads a job computes with when the server does not say (``--job-threads``).
DEFAULT_THREADS = 2
Formula = Callable[[Any], Any]
Progress = Callable[[int, int], None]


def _where(error: BaseException, path: str) -> str:
    """`` (work.py line 12)`` for the deepest frame of ``error`` in the formula file, or ``""``."""
    line = None
    for frame in traceback.extract_tb(error.__traceback__):
        if frame.filename == path:
            line = frame.lineno
    return f" ({os.path.basename(path)} line {line})" if line is not None else ""


def describe(error: BaseException, path: str) -> str:
    """What a formula's exception says, in one line, with where in the formula file it arose."""
    if isinstance(error, SystemExit):
        return f"called sys.exit({error.code!r}){_where(error, path)}"
    message = str(error)
    name = type(error).__name__
    return f"{name}: {message}{_where(error, path)}" if message else f"{name}{_where(error, path)}"


def _print_traceback(error: BaseException) -> None:
    traceback.print_exception(type(error), error, error.__traceback__, file=sys.stderr)


def import_formulas(path: str) -> ModuleType:
    """Import the formula file as a module; JobFailed says what went wrong and on which line."""
    name = "measuring_formulas"
    filename = os.path.basename(path)
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise JobFailed(f"{filename} cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    folder = os.path.dirname(path)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        _print_traceback(e)
        raise JobFailed(f"{filename} line {e.lineno}: {type(e).__name__}: {e.msg}") from None
    except BaseException as e:
        _print_traceback(e)
        raise JobFailed(f"importing {filename} raised {describe(e, path)}") from None
    return module


def find_formulas(module: ModuleType, path: str, wanted: list[str] | None) -> dict[str, Formula]:
    """
    The formulas of a module, in the order they are defined (or the order ``wanted`` names them).

    A formula is a public top-level function defined in the file itself, narrowed by ``__all__``
    and then by ``wanted``.
    """
    filename = os.path.basename(path)
    public: dict[str, Formula] = {
        name: value
        for name, value in vars(module).items()
        if inspect.isfunction(value)
        and value.__module__ == module.__name__
        and not name.startswith("_")
    }
    exported = getattr(module, "__all__", None)
    if exported is not None:
        public = {name: value for name, value in public.items() if name in exported}
    if wanted is None:
        if not public:
            raise JobFailed(
                f"{filename} defines no formulas: a formula is a public top-level function "
                f"that takes the dataset"
            )
        return public
    missing = [name for name in wanted if name not in public]
    if missing:
        raise NotFound(
            f"{filename} has no formula named {missing[0]!r} "
            f"(its formulas: {', '.join(public) or 'none'})"
        )
    return {name: public[name] for name in wanted}


class ProgressReporter(Callback):
    """
    A Dask callback reporting ``(tasks done, tasks in all)`` as tasks complete. It does not
    throttle: the server passes progress on to clients at most every 0.25 s, on its own clock.
    """

    def __init__(self, report: Progress) -> None:
        super().__init__()
        self._report = report

    def _send(self, state: dict[str, Any]) -> None:
        done = len(state["finished"])
        self._report(done, done + sum(len(state[k]) for k in ("ready", "waiting", "running")))

    def _start_state(self, dsk: Any, state: dict[str, Any]) -> None:
        self._send(state)

    def _posttask(self, key: Any, result: Any, dsk: Any, state: Any, worker_id: Any) -> None:
        self._send(state)

    def _finish(self, dsk: Any, state: dict[str, Any], errored: bool) -> None:
        if not errored:
            self._send(state)


def compute(
    formulas: dict[str, Formula],
    dataset: Any,
    path: str,
    progress: Progress | None = None,
    writer: ResultWriter | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """
    Call every formula on the dataset, then compute all their results in one Dask call with
    ``threads`` threads, reporting its tasks to ``progress(done, total)`` as they complete.

    With a ``writer``, table results are written partition by partition as they are computed
    (their values are then what the writer streamed, not the tables).
    """
    import dask

    lazy = {}
    for name, formula in formulas.items():
        try:
            lazy[name] = formula(dataset.copy())
        except BaseException as e:
            _print_traceback(e)
            raise JobFailed(f"formula {name!r} raised {_explained(e, path, dataset)}") from None
    try:
        if writer is not None:
            lazy = {
                name: writer.stream(name, value) if is_table(value) else value
                for name, value in lazy.items()
            }
        with ProgressReporter(progress) if progress is not None else contextlib.nullcontext():
            values = dask.compute(*lazy.values(), scheduler="threads", num_workers=threads)
    except BaseException as e:
        if writer is not None:
            writer.abandon()
        if isinstance(e, MeasuringError):
            raise
        if isinstance(e, WriteFailed) and writer is not None:
            raise writer.failure(e) from None
        _print_traceback(e)
        raise JobFailed(
            f"computing the formulas ({', '.join(lazy)}) raised {_explained(e, path, dataset)}"
        ) from None
    return dict(zip(lazy, values, strict=True))


#: What Dask and pandas say when a formula needs a time index with known divisions.
_NEEDS_INDEX = ("known divisions", "Only valid with DatetimeIndex")


def _explained(error: BaseException, path: str, dataset: Any) -> str:
    """``describe(error)``, and what to do when it failed for want of an indexed dataset."""
    said = describe(error, path)
    if not any(words in str(error) for words in _NEEDS_INDEX):
        return said
    times = [str(name) for name, dtype in dataset.dtypes.items() if dtype.kind == "M"]
    column = times[0] if times else "time"
    return (
        f'{said}; index the dataset by its time column with "Index": "{column}" in the '
        f"request (measuring-client --index {column}), which gives it known divisions"
    )


def run_job(message: Message, progress: Progress | None = None) -> Message:
    """Run one job message; the answer is a Done or an Error message, never an exception."""
    path = message["File"]
    os.environ[JOB_MARK] = message["Job"]
    limits = message.get("Limits") or {}
    share = datasets.budget(
        limits.get("Memory"),
        limits.get("Threads") or DEFAULT_THREADS,
        psutil.Process().memory_info().rss,
    )
    try:
        limit_job(limits, sandboxed=message.get("Outbox") is not None)
        # A temporary folder of the job's own, which the server removes when the job has ended.
        tempfile.tempdir = os.environ["TMPDIR"] = job_tmp(tempfile.gettempdir(), message["Job"])
        os.makedirs(tempfile.tempdir, exist_ok=True)
        os.chdir(message["Directory"])
        module = import_formulas(path)
        formulas = find_formulas(module, path, message.get("Functions"))
        dataset = _dataset(message, share)
        writer = ResultWriter(
            message.get("Outbox") or message["Directory"],
            message["Job"],
            message.get("Output", "parquet"),
            limits.get("ResultBytes"),
        )
        values = compute(formulas, dataset, path, progress, writer, share.threads)
        described = summarize(values, writer)
    except MeasuringError as e:
        return {"Type": "Error", "Error": e.to_json()}
    except BaseException as e:
        _print_traceback(e)
        return {
            "Type": "Error",
            "Error": Internal(f"the worker failed: {type(e).__name__}: {e}").to_json(),
        }
    return {"Type": "Done", "Results": described}


def _dataset(message: Message, share: datasets.Budget) -> Any:
    """The job's dataset, in partitions sized for its memory and threads; JobFailed if unread."""
    try:
        return datasets.read_dataset(
            message["Base"],
            message.get("Engine", "pyarrow"),
            message.get("Index"),
            share.partition,
            share.threads,
        )
    except MeasuringError:
        raise
    except Exception as e:
        _print_traceback(e)
        base = os.path.basename(message["Base"])
        raise JobFailed(f"cannot read {base} as Parquet: {type(e).__name__}: {e}") from None


def limit_job(limits: dict[str, int], sandboxed: bool) -> None:
    """
    Hold the job to its limits: no file larger than ``ResultBytes`` (a write past it fails with
    EFBIG), and at most ``Processes`` more threads and processes (the kernel counts both) than its
    user runs now: not in the sandbox, where the count would miss what runs outside it (the
    service's TasksMax bounds it there), and the kernel exempts root.
    """
    import resource

    if limits.get("ResultBytes"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        _lower(resource.RLIMIT_FSIZE, limits["ResultBytes"])
    if limits.get("Processes") and not sandboxed:
        import psutil

        uid = os.getuid()
        running = sum(
            process.info["num_threads"] or 1
            for process in psutil.process_iter(["uids", "num_threads"])
            if process.info["uids"] and process.info["uids"].real == uid
        )
        _lower(resource.RLIMIT_NPROC, running + limits["Processes"])


def _lower(limit: int, value: int) -> None:
    import resource

    _, hard = resource.getrlimit(limit)
    value = value if hard == resource.RLIM_INFINITY else min(value, hard)
    resource.setrlimit(limit, (value, value))


def warm_up() -> None:
    """Import and exercise what a job uses, so that the first job does not pay for it."""
    import pandas as pd

    with tempfile.TemporaryDirectory(prefix="measuring-warm-") as folder:
        path = os.path.join(folder, "warm.parquet")
        frame = pd.DataFrame(
            {
                "time": pd.date_range("2026-01-01", periods=3, freq="h"),
                "sensor": ["a", "b", "a"],
                "value": [1.0, 2.0, 3.0],
            }
        )
        frame.to_parquet(path)
        formulas: dict[str, Formula] = {
            "mean": lambda data: data.groupby("sensor").value.mean(),
            "kept": lambda data: data[data.value > 1],
            "hourly": lambda data: data.value.resample("1h").mean(),
        }
        for engine in ENGINES:
            dataset = datasets.read_dataset(path, engine, index="time")
            writer = ResultWriter(folder, "warm", "parquet")
            summarize(compute(formulas, dataset, path, writer=writer), writer)
