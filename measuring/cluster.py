"""
What the server and a job's process share about a dask.distributed cluster (``--scheduler``):
its settings as a job message carries them, the connection (a ``distributed.Client`` with a
``Security`` when the address is ``tls://``), the version check, and the scheduler's figures that
Info shows.

Every failure to reach or use the cluster is ``Unavailable``, with a message naming the address and
what went wrong (and, for versions, which packages differ and how). Never imports twisted;
distributed is an optional extra (``pip install '.[cluster]'``) imported only inside the
functions, so that the server's reactor thread never loads it (the server calls these functions
in a thread of its own).
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from measuring.errors import Unavailable

if TYPE_CHECKING:
    from distributed import Client

#: Packages compared beyond distributed's own list (dask, distributed, cloudpickle, msgpack,
#: tornado, toolz, numpy, pandas, lz4, python): the workers read Parquet with it.
PACKAGES = ("pyarrow",)
#: Task states the scheduler counts per task prefix (``get_task_prefix_states``).
TASK_STATES = ("waiting", "processing", "memory", "erred", "released")
MISMATCH = "Mismatched versions"
INSTALL = "pip install 'measuring[cluster]'"


@dataclass(frozen=True)
class ClusterSettings:
    """Where the cluster's scheduler is, how to talk TLS to it, and how long to try to connect."""

    address: str
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    timeout: float = 10.0

    @property
    def tls(self) -> bool:
        return self.address.startswith("tls://")

    def to_message(self) -> dict[str, Any]:
        """The ``Cluster`` field of a job message."""
        return {
            "Address": self.address,
            "CA": self.ca,
            "Cert": self.cert,
            "Key": self.key,
            "Timeout": self.timeout,
        }

    @classmethod
    def from_message(cls, fields: dict[str, Any]) -> ClusterSettings:
        return cls(
            address=fields["Address"],
            ca=fields.get("CA"),
            cert=fields.get("Cert"),
            key=fields.get("Key"),
            timeout=float(fields.get("Timeout", 10.0)),
        )


def _security(settings: ClusterSettings) -> Any:
    """A ``distributed.Security`` requiring TLS with the given files; None for ``tcp://``."""
    if not settings.tls:
        return None
    from distributed import Security

    return Security(
        tls_ca_file=settings.ca,
        tls_client_cert=settings.cert,
        tls_client_key=settings.key,
        require_encryption=True,
    )


def open_client(settings: ClusterSettings, name: str) -> Client:
    """
    A ``distributed.Client`` on the cluster, not the process's default (computations name it);
    Unavailable when distributed is missing or the scheduler cannot be reached in time.
    """
    try:
        from distributed import Client
    except ImportError:
        raise Unavailable(
            f"this server runs jobs on the cluster at {settings.address} (--scheduler), but "
            f"dask.distributed is not installed here: {INSTALL}"
        ) from None
    try:
        return Client(
            settings.address,
            security=_security(settings),
            timeout=settings.timeout,
            set_as_default=False,
            name=name,
        )
    except Exception as e:
        raise Unavailable(
            f"the cluster's scheduler at {settings.address} cannot be reached: "
            f"{_one_line(e)} (within --scheduler-timeout {settings.timeout:g} s)"
        ) from None


def check_versions(client: Client, address: str) -> dict[str, Any]:
    """
    The versions of this process, the scheduler and the workers (``get_versions(check=True)``);
    Unavailable naming every package that differs, and how, when distributed finds a mismatch.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            versions: Any = client.get_versions(check=True, packages=list(PACKAGES))
        except Exception as e:
            raise Unavailable(
                f"the cluster at {address} did not say its versions: {_one_line(e)}"
            ) from None
    if any(str(warning.message).startswith(MISMATCH) for warning in caught):
        differences = mismatches(versions) or ["see the job's log"]
        raise Unavailable(
            f"the cluster at {address} runs other versions than this server: "
            f"{'; '.join(differences)}. Install the same versions on the server, the scheduler "
            f"and the workers"
        )
    return versions


def mismatches(versions: dict[str, Any]) -> list[str]:
    """
    Each package whose version differs between here, the scheduler (for the packages distributed
    compares there) and the workers: ``dask 2026.8.0 here, 2025.1.0 on the scheduler``.
    """
    from distributed.versions import scheduler_relevant_packages

    def packages(side: Any) -> dict[str, Any]:
        return side.get("packages", {}) if isinstance(side, dict) else {}

    here = packages(versions.get("client"))
    scheduler = packages(versions.get("scheduler"))
    workers = [packages(side) for side in (versions.get("workers") or {}).values()]
    names = sorted({*here, *scheduler, *(name for worker in workers for name in worker)})
    found = []
    for name in names:
        mine = here.get(name)
        theirs = []
        if name in scheduler_relevant_packages and scheduler.get(name) != mine:
            theirs.append(f"{scheduler.get(name) or 'none'} on the scheduler")
        others = Counter(worker.get(name) for worker in workers if worker.get(name) != mine)
        for version, count in sorted(others.items(), key=lambda item: str(item[0])):
            theirs.append(f"{version or 'none'} on {count} worker{'s' if count > 1 else ''}")
        if theirs:
            found.append(f"{name} {mine or 'none'} here, {', '.join(theirs)}")
    return found


def connect(settings: ClusterSettings, name: str) -> Client:
    """A client on the cluster whose versions match this process's; Unavailable otherwise."""
    client = open_client(settings, name)
    try:
        check_versions(client, settings.address)
    except BaseException:
        close(client)
        raise
    return client


def close(client: Client) -> None:
    """Close the client (its futures are released on the scheduler); never raises."""
    try:
        client.close(timeout=2)
    except Exception as e:
        logging.getLogger(__name__).warning("closing the cluster's client: %s", _one_line(e))


def figures(client: Client, address: str) -> dict[str, Any]:
    """
    What Info shows of the cluster: its scheduler's address, its workers with their threads and
    memory, and the tasks the scheduler holds now, by state.
    """
    info = client.scheduler_info(n_workers=-1)
    assert client.scheduler is not None  # connected
    prefixes = client.sync(client.scheduler.get_task_prefix_states)
    states = {
        state: sum(counts.get(state, 0) for counts in prefixes.values()) for state in TASK_STATES
    }
    workers = [
        {
            "Address": worker_address,
            "Threads": worker.get("nthreads"),
            "MemoryLimit": worker.get("memory_limit"),
            "Memory": (worker.get("metrics") or {}).get("memory"),
            "Cpu": (worker.get("metrics") or {}).get("cpu"),
        }
        for worker_address, worker in info.get("workers", {}).items()
    ]
    return {
        "Address": address,
        "Scheduler": info.get("address"),
        "Workers": info.get("n_workers", len(workers)),
        "Threads": info.get("total_threads"),
        "Memory": info.get("total_memory"),
        "Tasks": sum(states.values()),
        "TaskStates": states,
        "WorkerList": workers,
    }


def probe(settings: ClusterSettings) -> dict[str, Any]:
    """
    One look at the cluster for the server's Info: the figures and ``"Versions": "match"``, or
    ``"Reachable": false`` and the ``Error`` saying why not. Blocking: call it in a thread.
    """
    logging.getLogger("distributed").setLevel(logging.ERROR)
    try:
        client = open_client(settings, "measuring-info")
    except Unavailable as e:
        return {"Address": settings.address, "Reachable": False, "Error": e.message}
    try:
        try:
            check_versions(client, settings.address)
            versions = "match"
        except Unavailable as e:
            versions = e.message
        return {"Reachable": True, **figures(client, settings.address), "Versions": versions}
    except Exception as e:
        return {
            "Address": settings.address,
            "Reachable": False,
            "Error": f"the cluster's scheduler at {settings.address} failed to answer: "
            f"{_one_line(e)}",
        }
    finally:
        close(client)


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."
