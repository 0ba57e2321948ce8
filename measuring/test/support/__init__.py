"""
What several test modules share: the test modules import it from here.

``data``: the sample time series and the files of a test's folder. ``formulas``: the sources of
the formula files tests write. ``system``: processes, ports, token files and bubblewrap on this
machine. ``servers``: real servers (``measuring.local``'s, the same one the demo starts) and
``ServerTestCase``, which checks at cleanup that each stopped cleanly and left nothing running.
``worker``: ``WorkerTestCase``, for running ``measuring.worker`` in this process.
"""

from measuring.local import Connection, environment
from measuring.test.support.data import sample_frame, write_dataset, write_formulas, write_parts
from measuring.test.support.formulas import (
    CLIENT_FORMULAS,
    FORMULA_NAMES,
    FORMULAS,
    HOSTILE_FORMULAS,
    LIFECYCLE_FORMULAS,
)
from measuring.test.support.servers import (
    BASE,
    FINISHED,
    JOB_ID,
    PATIENCE,
    ROWS,
    STATUS,
    STOPPING,
    ClientTestCase,
    HostileTestCase,
    Server,
    ServerTestCase,
    dataset,
    run_twistd,
)
from measuring.test.support.system import (
    TOKEN,
    alive,
    bwrap_missing,
    carrying,
    closed_port,
    end,
    gone,
    naming,
    write_token_file,
)
from measuring.test.support.worker import WorkerTestCase

__all__ = [
    "BASE",
    "CLIENT_FORMULAS",
    "FINISHED",
    "FORMULAS",
    "FORMULA_NAMES",
    "HOSTILE_FORMULAS",
    "JOB_ID",
    "LIFECYCLE_FORMULAS",
    "PATIENCE",
    "ROWS",
    "STATUS",
    "STOPPING",
    "TOKEN",
    "ClientTestCase",
    "Connection",
    "HostileTestCase",
    "Server",
    "ServerTestCase",
    "WorkerTestCase",
    "alive",
    "bwrap_missing",
    "carrying",
    "closed_port",
    "dataset",
    "end",
    "environment",
    "gone",
    "naming",
    "run_twistd",
    "sample_frame",
    "write_dataset",
    "write_formulas",
    "write_parts",
    "write_token_file",
]
