"""
Who may connect: the connections open, in all and by client address, and whom to refuse.

``Connections`` keeps every open connection. A new one is refused (``Busy``) when its address
already holds ``most_per_client`` connections that count against it: loopback addresses and
Unix sockets do not (they are this machine's users, bounded by ``most`` alone), nor connections
that have shown a valid token. When all ``most`` places are taken, the new connection takes the
place of one that has sent no request yet: the oldest of the address holding the most, which is
closed saying why; only when every connection is in use is the new one refused. So one client
holding idle sockets cannot shut out the others. Plain Python; no reactor, no I/O.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterator
from typing import Generic, Protocol, TypeVar

from measuring.errors import Busy
from measuring.server.access import loopback


class Connection(Protocol):
    """What the book needs of a connection (``protocol.RequestProtocol``)."""

    #: The address it comes from (an IP address), or None for a Unix socket.
    client_host: str | None

    @property
    def unused(self) -> bool:
        """True while it has sent no request the server acted on, and waits for no answer."""
        ...

    def make_room(self) -> None:
        """Close it, saying that its place went to a new connection."""
        ...


C = TypeVar("C", bound=Connection)


def client_host(address: object) -> str | None:
    """The host of a peer address (IPv4 or IPv6), or None for a Unix socket."""
    host = getattr(address, "host", None)
    return host if isinstance(host, str) and host else None


def bounded(host: str | None) -> bool:
    """Whether connections from ``host`` count against the bound per client address."""
    return host is not None and not loopback(host)


class Connections(Generic[C]):
    """The open connections, counted in all and by client address."""

    def __init__(self, most: int | None = None, most_per_client: int | None = None) -> None:
        self.most = most
        self.most_per_client = most_per_client
        self._open: dict[C, int] = {}
        self._counted: set[C] = set()
        self._per_client: Counter[str] = Counter()
        self._serials = itertools.count()

    def __iter__(self) -> Iterator[C]:
        return iter(list(self._open))

    def __len__(self) -> int:
        return len(self._open)

    def __contains__(self, connection: object) -> bool:
        return connection in self._open

    def refusal(self, host: str | None) -> Busy | None:
        """
        Why a new connection from ``host`` is refused, or None when it may come in (having
        made room for it, if the server was full).
        """
        limit = self.most_per_client
        if limit is not None and bounded(host) and self._per_client[host or ""] >= limit:
            return Busy(
                f"{host} has {limit} connections open, as many as one client address may "
                f"(--max-client-connections); close some, or try again later"
            )
        if self.most is not None and len(self._open) >= self.most:
            room = self._idlest()
            if room is None:
                return Busy(
                    f"the server has {len(self._open)} connections open, as many as it takes "
                    f"(--max-connections), each busy with a request; try again later"
                )
            self.discard(room)
            room.make_room()
        return None

    def _idlest(self) -> C | None:
        """The connection to close for a new one: unused, of the busiest address, oldest."""
        unused = [connection for connection in self._open if connection.unused]
        if not unused:
            return None
        held = Counter(connection.client_host for connection in self._open)
        return min(unused, key=lambda c: (-held[c.client_host], self._open[c]))

    def add(self, connection: C) -> None:
        """Count a new connection."""
        if connection in self._open:
            return
        self._open[connection] = next(self._serials)
        if bounded(connection.client_host):
            self._counted.add(connection)
            self._per_client[connection.client_host or ""] += 1

    def trust(self, connection: C) -> None:
        """The connection has shown a valid token: it no longer counts against its address."""
        if connection in self._counted:
            self._counted.discard(connection)
            self._per_client[connection.client_host or ""] -= 1

    def discard(self, connection: C) -> None:
        """Forget a connection that closed (or is closing)."""
        self.trust(connection)
        self._open.pop(connection, None)

    def from_client(self, host: str) -> int:
        """How many open connections count against ``host``."""
        return self._per_client[host]
