"""
The messages between the server's pool (``pool``) and a worker process (``worker``).

Each message is a JSON object on one line. The worker reads its job on file descriptor
``JOB_FD`` and writes its messages on ``REPLY_FD``, so that whatever the formulas print on
stdout and stderr stays apart and becomes the job's log:

- worker -> server ``{"Type": "Ready"}``: imports done and warmed up, waiting for a job.
- server -> worker ``{"Type": "Job", "Job": id, "Directory", "Base", "File", "Functions",
  "Output", "Engine"}``: paths are real and already checked against the data roots. Formulas
  sent with the request come as ``"Code"`` and ``"Name"`` with ``"File": null``; with a cluster,
  ``"Cluster"`` says where it is (``measuring.cluster.ClusterSettings.to_message``).
- worker -> server ``{"Type": "Done", "Results": {...}}`` or
  ``{"Type": "Error", "Error": {"Code", "Message"}}``; then the worker exits.

Plain Python: both sides import it.
"""

from __future__ import annotations

import json
import os
from typing import Any

JOB_FD = 3
REPLY_FD = 4
#: Environment variables marking a worker's processes: the server (its state directory), the
#: worker process (a random token, in its environment from its start, so every process below it
#: inherits it, forked or not), and the job (set when the job starts, for the formulas to read).
SERVER_MARK = "MEASURING_SERVER"
WORKER_MARK = "MEASURING_WORKER"
JOB_MARK = "MEASURING_JOB"
#: In a worker's environment when its jobs compute on a cluster: it imports distributed warming up.
CLUSTER_MARK = "MEASURING_CLUSTER"
MAX_MESSAGE_BYTES = 16 * 1024 * 1024

Message = dict[str, Any]


def job_tmp(tmp: str, job: str) -> str:
    """The temporary folder of a job inside the workers' one (``TMPDIR``); gone after the job."""
    return os.path.join(tmp, f"job-{job}")


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
