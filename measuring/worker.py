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
import ctypes
import errno
import importlib.util
import inspect
import json
import os
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from types import ModuleType
from typing import Any

from dask.callbacks import Callback

from measuring import loader, results
from measuring.errors import Internal, JobFailed, MeasuringError, NotFound
from measuring.messages import JOB_FD, JOB_MARK, REPLY_FD, Message, encode, job_tmp

PREVIEW_ROWS = 20
PREVIEW_BYTES = 64 * 1024
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
    """A Dask callback reporting ``(tasks done, tasks in all)``, at most every ``every`` seconds."""

    def __init__(self, report: Progress, every: float = 0.25) -> None:
        super().__init__()
        self._report = report
        self._every = every
        self._last = 0.0

    def _send(self, state: dict[str, Any]) -> None:
        done = len(state["finished"])
        self._report(done, done + sum(len(state[k]) for k in ("ready", "waiting", "running")))
        self._last = time.monotonic()

    def _start_state(self, dsk: Any, state: dict[str, Any]) -> None:
        self._send(state)

    def _posttask(self, key: Any, result: Any, dsk: Any, state: Any, worker_id: Any) -> None:
        if time.monotonic() - self._last >= self._every:
            self._send(state)

    def _finish(self, dsk: Any, state: dict[str, Any], errored: bool) -> None:
        if not errored:
            self._send(state)


def compute(
    formulas: dict[str, Formula], dataset: Any, path: str, progress: Progress | None = None
) -> dict[str, Any]:
    """
    Call every formula on the dataset, then compute all their results in one Dask call,
    reporting its tasks to ``progress(done, total)`` as they complete.
    """
    import dask

    lazy = {}
    for name, formula in formulas.items():
        try:
            lazy[name] = formula(dataset.copy())
        except BaseException as e:
            _print_traceback(e)
            raise JobFailed(f"formula {name!r} raised {describe(e, path)}") from None
    try:
        with ProgressReporter(progress) if progress is not None else contextlib.nullcontext():
            values = dask.compute(*lazy.values(), scheduler="threads")
    except BaseException as e:
        _print_traceback(e)
        raise JobFailed(
            f"computing the formulas ({', '.join(lazy)}) raised {describe(e, path)}"
        ) from None
    return dict(zip(lazy, values, strict=True))


def as_frame(name: str, value: Any) -> tuple[str, Any]:
    """
    The kind of a computed result and, for tables, the frame to write (``None`` for a scalar).

    Column names become strings; a column of several levels becomes ``level1_level2``. The
    index is made plain (``plain_index``).
    """
    import pandas as pd

    if isinstance(value, pd.Index):
        value = value.to_series(index=pd.RangeIndex(len(value)))
    if isinstance(value, pd.Series):
        kind, frame = "Series", value.to_frame(name=str(name if value.name is None else value.name))
    elif isinstance(value, pd.DataFrame):
        kind, frame = "DataFrame", value.copy(deep=False)
        if isinstance(frame.columns, pd.MultiIndex):
            frame.columns = [
                "_".join(str(level) for level in col if level != "") for col in frame.columns
            ]
        frame.columns = [str(column) for column in frame.columns]
    elif value is None:
        raise JobFailed(f"formula {name!r} returned None; does it miss a return statement?")
    elif pd.api.types.is_scalar(value):
        return "Scalar", None
    else:
        raise JobFailed(
            f"formula {name!r} returned a {type(value).__name__}; a formula must return a "
            f"DataFrame, a Series or a single value (number, string, bool, time)"
        )
    return kind, plain_index(frame)


def plain_index(frame: Any) -> Any:
    """
    ``frame`` with an index every output format names the same way.

    An unnamed whole-number index holds row numbers from the dataset's partitions (so it differs
    between engines) and is dropped; other unnamed levels are called what pandas calls them as
    columns: ``index``, or ``level_0``, ``level_1``...
    """
    import pandas as pd

    index = frame.index
    if index.nlevels == 1 and index.name is None and pd.api.types.is_integer_dtype(index.dtype):
        return frame.reset_index(drop=True)
    if index.nlevels == 1:
        names = ["index" if index.name is None else str(index.name)]
    else:
        names = [f"level_{i}" if n is None else str(n) for i, n in enumerate(index.names)]
    frame.index = index.set_names(names)
    return frame


def preview(frame: Any) -> list[dict[str, Any]]:
    """The first rows as JSON records, as many of the first 20 as fit in 64 KiB."""
    rows = results.records(frame.head(PREVIEW_ROWS))
    while rows and len(json.dumps(rows)) > PREVIEW_BYTES:
        rows = rows[: len(rows) // 2]
    return rows


def summarize(
    values: dict[str, Any], job: str, directory: str, output: str, max_bytes: int | None = None
) -> dict[str, Any]:
    """Write the tables among ``values`` and describe every result for the answer."""
    described: dict[str, Any] = {}
    frames = {}
    for name, value in values.items():
        kind, frame = as_frame(name, value)
        if frame is None:
            described[name] = {"Kind": kind, "Value": results.json_value(value)}
            continue
        frames[name] = frame
        described[name] = {
            "Kind": kind,
            "File": None,
            "Rows": len(frame),
            "Columns": list(frame.columns),
            "Index": [str(level) for level in frame.index.names]
            if results.has_own_index(frame)
            else [],
            "Types": results.column_types(frame),
            "Preview": preview(frame),
        }
    try:
        files = results.write_results(directory, job, frames, output, max_bytes)
    except MeasuringError:
        raise
    except results.ResultsTooLarge as e:
        raise JobFailed(str(e)) from None
    except OSError as e:
        _print_traceback(e)
        if e.errno == errno.EFBIG:
            raise JobFailed(
                f"a result file grew past {max_bytes} bytes, the most a job may write "
                f"(--max-result-bytes)"
            ) from None
        raise JobFailed(f"writing the results failed: {type(e).__name__}: {e}") from None
    except Exception as e:
        _print_traceback(e)
        raise JobFailed(
            f"writing the results to {directory}/results failed: {type(e).__name__}: {e}"
        ) from None
    for name, file in files.items():
        described[name]["File"] = file
    return described


def run_job(message: Message, progress: Progress | None = None) -> Message:
    """Run one job message; the answer is a Done or an Error message, never an exception."""
    path = message["File"]
    os.environ[JOB_MARK] = message["Job"]
    limits = message.get("Limits") or {}
    try:
        limit_job(limits, sandboxed=message.get("Outbox") is not None)
        # A temporary folder of the job's own, which the server removes when the job has ended.
        tempfile.tempdir = os.environ["TMPDIR"] = job_tmp(tempfile.gettempdir(), message["Job"])
        os.makedirs(tempfile.tempdir, exist_ok=True)
        os.chdir(message["Directory"])
        module = import_formulas(path)
        formulas = find_formulas(module, path, message.get("Functions"))
        try:
            dataset = loader.read_dataset(message["Base"], message.get("Engine", "pyarrow"))
        except Exception as e:
            _print_traceback(e)
            base = os.path.basename(message["Base"])
            raise JobFailed(f"cannot read {base} as Parquet: {type(e).__name__}: {e}") from None
        values = compute(formulas, dataset, path, progress)
        described = summarize(
            values,
            message["Job"],
            message.get("Outbox") or message["Directory"],
            message.get("Output", "parquet"),
            limits.get("ResultBytes"),
        )
    except MeasuringError as e:
        return {"Type": "Error", "Error": e.to_json()}
    except BaseException as e:
        _print_traceback(e)
        return {
            "Type": "Error",
            "Error": Internal(f"the worker failed: {type(e).__name__}: {e}").to_json(),
        }
    return {"Type": "Done", "Results": described}


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
        pd.DataFrame({"sensor": ["a", "b", "a"], "value": [1.0, 2.0, 3.0]}).to_parquet(path)
        for engine in loader.ENGINES:
            dataset = loader.read_dataset(path, engine)
            compute({"mean": lambda data: data.groupby("sensor").value.mean()}, dataset, path)


PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36


def _settle_in(parent: int) -> None:
    """
    Lead a new process group; end when the server ends; keep every process the formulas start
    below this one (as a subreaper); and be the process the kernel's out-of-memory killer picks
    before the server.
    """
    if os.getpgid(0) != os.getpid():
        os.setsid()
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1)
        with contextlib.suppress(OSError), open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
    if parent and os.getppid() != parent:
        os._exit(1)


def end_descendants() -> None:
    """End every process the formulas started and left running (they are all below this one)."""
    import psutil

    children = psutil.Process().children(recursive=True)
    for child in children:
        with contextlib.suppress(psutil.Error):
            child.kill()
    psutil.wait_procs(children, timeout=2)


def main(argv: list[str]) -> None:
    """The worker process: warm up, say Ready, run one job, report, exit."""
    _settle_in(int(argv[1]))
    os.set_inheritable(JOB_FD, False)
    os.set_inheritable(REPLY_FD, False)
    replies = os.fdopen(REPLY_FD, "wb", buffering=0)
    warm_up()
    replies.write(encode({"Type": "Ready"}))
    with os.fdopen(JOB_FD, "rb") as jobs:
        line = jobs.readline()
    if not line:
        os._exit(0)

    def progress(done: int, total: int) -> None:
        replies.write(encode({"Type": "Progress", "Done": done, "Total": total}))

    answer = run_job(json.loads(line), progress)
    end_descendants()
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    try:
        reply = encode(answer)
    except ValueError as e:
        reply = encode(
            {"Type": "Error", "Error": Internal(f"the answer could not be sent: {e}").to_json()}
        )
    replies.write(reply)
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv)
