"""
The protocol's vocabulary, declared once: error Codes, request names, job states, output formats,
engines, result kinds and the default port.

Server, worker, client and CLI all import these names from here. Standard library only, and no
imports from the rest of ``measuring``: the client imports it in a notebook in microseconds.
"""

from __future__ import annotations

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
DEFAULT_ENDPOINT = f"tcp:{DEFAULT_PORT}:interface={DEFAULT_HOST}"

HEADERS = ("Info", "Dask", "Job")
INFO_REQUESTS = ("Status", "Dask process", "All process", "All statistic")
JOB_REQUESTS = ("Status", "Cancel", "List", "Log", "Result")

# Error Codes, in the order docs/protocol.md lists them.
CODES = (
    "BadRequest",
    "TooLarge",
    "Unauthorized",
    "Forbidden",
    "NotFound",
    "Busy",
    "Timeout",
    "Cancelled",
    "MemoryLimit",
    "JobFailed",
    "Unavailable",
    "Internal",
)

# A job's states; a job in one of FINISHED never changes again.
WAITING = ("queued", "running")
FINISHED = ("done", "failed", "cancelled", "timeout")
STATES = (*WAITING, *FINISHED)

# What a formula's result is, and how tables are written (format -> file ending).
KINDS = ("DataFrame", "Series", "Scalar")
OUTPUTS = {"parquet": ".parquet", "csv": ".csv", "json": ".json"}
ENGINES = ("pyarrow", "fastparquet")

# How a Job Result request gets a table: JSON records, or an Arrow IPC stream of this media type.
RESULT_FORMATS = ("json", "arrow")
ARROW_STREAM = "application/vnd.apache.arrow.stream"

# Results go to <Directory>/RESULTS/<job>/.
RESULTS = "results"


def token_lines(lines: list[str]) -> tuple[str, ...]:
    """The tokens among a token file's lines: stripped, without blank and ``#`` comment lines."""
    stripped = (line.strip() for line in lines)
    return tuple(line for line in stripped if line and not line.startswith("#"))
