"""
One job, run in a job process (``main``): import the formula file, call every formula on the
dataset, compute them all in one ``dask.compute`` call, write the results (``output``) and answer
with a Done or an Error message. ``warm_up`` is what the template runs once, single-threaded,
before it forks job processes. Never imports twisted or ``measuring.server``.
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

from dask.callbacks import Callback

from measuring import formulas as words
from measuring import procfs, storage
from measuring.errors import Internal, JobFailed, MeasuringError
from measuring.messages import (
    CLUSTER_MARK,
    JOB_MARK,
    STORAGE_MARK,
    WARM_TMP_PREFIX,
    Message,
    job_tmp,
)
from measuring.worker import dataset as datasets
from measuring.worker import unreadable
from measuring.worker.cluster import Remote, in_file_remotely
from measuring.worker.output import ResultWriter, WriteFailed, is_table, summarize

#: Threads a job computes with when the server does not say (``--job-threads``).
DEFAULT_THREADS = 2
Formula = Callable[[Any], Any]
Progress = Callable[[int, int], None]


def _where(error: BaseException, path: str) -> str:
    """`` (work.py line 12)`` for the deepest frame of ``error`` in the formula file, or ``""``."""
    line = None
    for frame in traceback.extract_tb(error.__traceback__):
        if frame.filename == path or in_file_remotely(frame, path):
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


def module_name(job: str) -> str:
    """The formula module's name in ``job``: one of its own, so that no two jobs share one."""
    return "measuring_formulas_" + "".join(c if c.isalnum() else "_" for c in job)


def import_formulas(path: str, name: str = "measuring_formulas") -> ModuleType:
    """Import the formula file as a module; JobFailed says what went wrong and on which line."""
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
        raise JobFailed(words.syntax_error(path, e)) from None
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
    public: dict[str, Formula] = {
        name: value
        for name, value in vars(module).items()
        if inspect.isfunction(value)
        and value.__module__ == module.__name__
        and words.is_public(name)
    }
    exported = getattr(module, "__all__", None)
    if exported is not None:
        public = {name: value for name, value in public.items() if name in exported}
    if wanted is None:
        if not public:
            raise JobFailed(words.none_defined(path))
        return public
    missing = [name for name in wanted if name not in public]
    if missing:
        raise words.missing(path, missing[0], public)
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
    remote: Remote | None = None,
    base: str | None = None,
    engine: str = "pyarrow",
) -> dict[str, Any]:
    """
    Call every formula on the dataset, then compute all their results in one Dask call with
    ``threads`` threads (or on the cluster, with ``remote``), reporting its tasks to
    ``progress(done, total)`` as they complete.

    With a ``writer``, table results are written partition by partition as they are computed
    (their values are then what the writer streamed, not the tables). On a cluster they are
    computed whole and written after: the tasks run in other processes than the writer's.
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
        if writer is not None and remote is None:
            lazy = {
                name: writer.stream(name, value) if is_table(value) else value
                for name, value in lazy.items()
            }
        if remote is not None:
            values = remote.compute(list(lazy.values()), progress)
        else:
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
        # Reading the dataset failed: say which file and row group (``base``: the dataset).
        located = unreadable.locate(base, engine) if base and unreadable.from_reading(e) else None
        if located is not None:
            raise JobFailed(f"{located} (computing the formulas {', '.join(lazy)})") from None
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


#: Where, in the job's temporary folder (its working directory), results bound for object storage
#: are made.
SCRATCH = "scratch"


def run_job(message: Message, progress: Progress | None = None) -> Message:
    """Run one job message; the answer is a Done or an Error message, never an exception."""
    os.environ[JOB_MARK] = message["Job"]
    limits = message.get("Limits") or {}
    remote = None
    share = datasets.budget(
        limits.get("Memory"), limits.get("Threads") or DEFAULT_THREADS, _held_memory()
    )
    try:
        limit_job(limits, sandboxed=message.get("Outbox") is not None)
        # A temporary folder of the job's own, which the server removes when the job has ended:
        # in the folder the server gave, never elsewhere (tempfile would fall back to /tmp).
        tempfile.tempdir = os.environ["TMPDIR"] = job_tmp(
            os.environ.get("TMPDIR") or tempfile.gettempdir(), message["Job"]
        )
        try:
            os.makedirs(tempfile.tempdir, exist_ok=True)
        except OSError as e:
            raise Internal(
                f"the job's temporary folder {tempfile.tempdir} cannot be made: {e.strerror}"
            ) from None
        stored = storage.is_url(message["Directory"])
        os.chdir(tempfile.tempdir if stored else message["Directory"])
        path = (
            message["File"]
            if message.get("Code") is None
            else write_code(message["Code"], message["Name"])
        )
        remote = Remote.connect(message.get("Cluster"), message["Job"])
        module = import_formulas(path, module_name(message["Job"]))
        if remote is not None:
            remote.adopt(module)
        formulas = find_formulas(module, path, message.get("Functions"))
        dataset = _dataset(message, share)
        # Results of a Directory on object storage are made in the job's temporary folder,
        # which the server removes, then published there.
        writer = ResultWriter(
            message.get("Outbox")
            or (os.path.join(tempfile.tempdir, SCRATCH) if stored else message["Directory"]),
            message["Job"],
            message.get("Output", "parquet"),
            limits.get("ResultBytes"),
            upload=message["Directory"] if stored else None,
        )
        values = compute(
            formulas, dataset, path, progress, writer, share.threads, remote,
            base=message["Base"], engine=message.get("Engine", "pyarrow"),
        )  # fmt: skip
        described = summarize(values, writer)
    except MeasuringError as e:
        return {"Type": "Error", "Error": e.to_json()}
    except BaseException as e:
        _print_traceback(e)
        return {
            "Type": "Error",
            "Error": Internal(f"the worker failed: {type(e).__name__}: {e}").to_json(),
        }
    finally:
        if remote is not None:
            remote.close()
    return {"Type": "Done", "Results": described}


def _held_memory() -> int:
    """What this job process holds already, as the server's memory watch counts it."""
    return procfs.private_memory(os.getpid())


def write_code(code: str, name: str) -> str:
    """
    Formulas sent with the request, as the file ``name`` in the job's temporary folder: imported,
    checked and described like a formula file (messages name ``name``).
    """
    path = os.path.join(tempfile.gettempdir(), name)
    with open(path, "w", encoding="utf-8") as f:
        f.write(code)
    return path


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
        engine = message.get("Engine", "pyarrow")
        stored = storage.is_url(message["Base"])
        located = None if stored else unreadable.locate(message["Base"], engine)
        base = message["Base"].rstrip("/").rpartition("/")[2]
        raise JobFailed(
            located or f"cannot read {base} as Parquet: {type(e).__name__}: {e}"
        ) from None


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
        _lower(resource.RLIMIT_NPROC, tasks_of(os.getuid()) + limits["Processes"])


def tasks_of(uid: int) -> int:
    """How many threads (the kernel counts them as processes) the user ``uid`` runs now."""
    count = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if entry.stat().st_uid != uid:
                continue
            with open(f"/proc/{entry.name}/stat") as f:
                count += int(f.read().rsplit(")", 1)[1].split()[17])
        except (OSError, ValueError, IndexError):
            continue
    return count


def _lower(limit: int, value: int) -> None:
    import resource

    _, hard = resource.getrlimit(limit)
    value = value if hard == resource.RLIM_INFINITY else min(value, hard)
    resource.setrlimit(limit, (value, value))


def warm_up() -> None:
    """
    Import and exercise what a job uses, so that no job pays for it, without starting a thread:
    the template forks job processes, and a fork copies no thread. Dask computes a small frame
    with its single-threaded scheduler, fastparquet reads a file, pyarrow reads from memory (it
    starts I/O threads to open a file). Pools of threads start in the job process.
    """
    import io

    import dask
    import dask.dataframe  # the collections a formula gets
    import fastparquet
    import pandas as pd
    import pyarrow as pa
    import pyarrow.dataset  # what Dask reads Parquet through
    import pyarrow.parquet as pq

    if os.environ.get(CLUSTER_MARK):
        import distributed  # noqa: F401 (jobs will compute on the cluster)
    if os.environ.get(STORAGE_MARK):
        import pyarrow.fs
        import s3fs  # noqa: F401
    with tempfile.TemporaryDirectory(prefix=WARM_TMP_PREFIX) as folder:
        path = os.path.join(folder, "warm.parquet")
        frame = pd.DataFrame({"sensor": ["a", "b", "a"], "value": [1.0, 2.0, 3.0]})
        frame.to_parquet(path, engine="pyarrow")
        # Opening a file through pyarrow starts Arrow's I/O threads: the readers' own code is
        # imported here, and first runs in the job.
        import measuring.worker.dataset
        import measuring.worker.output  # noqa: F401

        dataset = dask.dataframe.from_pandas(frame, npartitions=1)
        dask.compute(dataset.groupby("sensor").value.mean(), scheduler="sync")
        fastparquet.ParquetFile(path).to_pandas()
        buffer = io.BytesIO()
        frame.to_parquet(buffer, engine="pyarrow")
        table = pq.ParquetFile(pa.BufferReader(buffer.getvalue())).read(use_threads=False)
        table.to_pandas(use_threads=False)
