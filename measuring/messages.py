"""
The messages between the server's pool (``measuring.server.pool``), the template process and the
job processes it forks (``measuring.worker``). Each message is a JSON object on one line.

The template reads the server's requests on its control socket, file descriptor ``CONTROL_FD``
(a Unix socket, so that file descriptors travel with the requests):

- template -> server ``{"Type": "Ready", "Pid": pid, "Threads": n}``: loaded and warmed up.
- server -> template ``{"Type": "Fork", "Id": n, "Fds": 4, "Environment": {...},
  "Sandbox": [bwrap command line] or null}`` with four descriptors: the job process's stdout,
  stderr, job pipe and reply pipe. The template answers ``{"Type": "Forked", "Id": n, "Pid":
  pid}`` and, when that process has ended, ``{"Type": "Exited", "Pid": pid, "Status": wait
  status, "Cpu": seconds}``.

A job process reads its job on file descriptor ``JOB_FD`` and writes its messages on
``REPLY_FD``, so that whatever the formulas print on stdout and stderr stays apart and becomes
the job's log:

- job process -> server ``{"Type": "Ready", "Pid": pid}``: settled in (its host pid, also from
  inside a sandbox), waiting for its job.
- server -> job process ``{"Type": "Job", "Job": id, "Directory", "Base", "File", "Functions",
  "Output", "Engine", "Limits", "Outbox"}``: paths are real and already checked against the data
  roots. Formulas sent with the request come as ``"Code"`` and ``"Name"`` with ``"File": null``;
  with a cluster, ``"Cluster"`` says where it is (``measuring.cluster.ClusterSettings``).
- job process -> server ``{"Type": "Progress", "Done": n, "Total": n}``, then
  ``{"Type": "Done", "Results": {...}}`` or ``{"Type": "Error", "Error": {"Code", "Message"}}``;
  then it exits.

Plain Python: both sides import it.
"""

from __future__ import annotations

import json
import os
from typing import Any

CONTROL_FD = 3
JOB_FD = 3
REPLY_FD = 4
#: Environment variables marking a job's processes: the server (its state directory, in the
#: template's environment from its start), the job process (a random token, set when it is
#: forked, so every process it starts inherits it), and the job (set when the job starts, for the
#: formulas to read).
SERVER_MARK = "MEASURING_SERVER"
WORKER_MARK = "MEASURING_WORKER"
JOB_MARK = "MEASURING_JOB"
#: In a worker's environment when its jobs compute on a cluster: it imports distributed warming up.
CLUSTER_MARK = "MEASURING_CLUSTER"
#: In a worker's environment when a data root is on object storage: it imports s3fs warming up.
STORAGE_MARK = "MEASURING_STORAGE"
MAX_MESSAGE_BYTES = 16 * 1024 * 1024

Message = dict[str, Any]


#: The folders made in the workers' temporary folder (``TMPDIR``, ``<state>/tmp``): a job's own
#: (``job_tmp``), a worker's warm-up, a sandboxed worker's outbox. Whatever a server that died
#: left of them is removed at the next start.
JOB_TMP_PREFIX = "job-"
WARM_TMP_PREFIX = "measuring-warm-"
OUTBOX_PREFIX = "worker-"
TMP_PREFIXES = (JOB_TMP_PREFIX, WARM_TMP_PREFIX, OUTBOX_PREFIX)


def job_tmp(tmp: str, job: str) -> str:
    """The temporary folder of a job inside the workers' one (``TMPDIR``); gone after the job."""
    return os.path.join(tmp, f"{JOB_TMP_PREFIX}{job}")


def encode(message: Message) -> bytes:
    """One message as a line of bytes."""
    return json.dumps(message, allow_nan=False, separators=(",", ":")).encode() + b"\n"


class MessageBuffer:
    """Splits a byte stream into messages; raises ValueError on an oversize or unreadable one."""

    def __init__(self, limit: int = MAX_MESSAGE_BYTES) -> None:
        self._limit = limit
        self._parts: list[bytes] = []
        self._size = 0

    def feed(self, data: bytes) -> list[Message]:
        *complete, rest = data.split(b"\n")
        lines = []
        if complete:
            lines = [b"".join([*self._parts, complete[0]]), *complete[1:]]
            self._parts, self._size = [], 0
        self._parts.append(rest)
        self._size += len(rest)
        if self._size > self._limit or any(len(line) > self._limit for line in lines):
            raise ValueError(f"a message from the worker is longer than {self._limit} bytes")
        messages = []
        for line in lines:
            message = json.loads(line)
            if not isinstance(message, dict):
                raise ValueError(f"a message from the worker is not an object: {line[:80]!r}")
            messages.append(message)
        return messages
