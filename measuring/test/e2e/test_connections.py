"""
End to end, connections as clients and attackers make them: a client that half-closes its side
(``nc -N``, ``ncat``, ``socat`` at the end of their input) still gets every answer.

Each test starts the real ``twistd -n measuring`` (``support.ServerTestCase``) and speaks to it
over plain sockets.
"""

from __future__ import annotations

import json
import socket
from typing import Any

from measuring.test.support import PATIENCE, STATUS, Server, ServerTestCase


def half_closed(server: Server, *requests: dict[str, Any] | bytes) -> list[dict[str, Any]]:
    """Send ``requests``, end the sending side at once, and read every answer until the close."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=PATIENCE) as connection:
        connection.sendall(
            b"".join(
                request if isinstance(request, bytes) else json.dumps(request).encode() + b"\n"
                for request in requests
            )
        )
        connection.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := connection.recv(65536):
            received += chunk
    return [json.loads(line) for line in received.splitlines()]


class HalfCloseTests(ServerTestCase):
    """A client that ends its side after its requests gets their answers, then the close."""

    def test_infoListAndBadJson(self) -> None:
        """Status, Job List and a line that is not JSON are each answered, every time."""
        server = self.start()
        listing = {"Header": "Job", "Request": "List", "Id": "list"}
        for _ in range(10):
            # Answers come as they are ready, not in order: the Id tells them apart.
            answers = half_closed(server, {**STATUS, "Id": "status"}, listing, b"{not json\n")
            by_id = {answer.get("Id"): answer for answer in answers}
            self.assertEqual(len(answers), 3, answers)
            self.assertEqual(by_id["status"]["Status"], "OK", answers)
            self.assertEqual(by_id["list"]["Status"], "OK", answers)
            self.assertEqual(by_id[None]["Error"]["Code"], "BadRequest", answers)

    def test_lastRequestWithoutNewline(self) -> None:
        """``printf '{...}' | nc -N``: a request without its newline is answered at the end."""
        server = self.start()
        [answer] = half_closed(server, json.dumps(STATUS).encode())
        self.assertEqual(answer["Status"], "OK", answer)

    def test_synchronousJobAnswered(self) -> None:
        """A Dask request's answer, sent when its job ends, reaches the half-closed client."""
        server = self.start()
        [answer] = half_closed(server, self.dask("mean_by_sensor"))
        self.assertEqual(answer["Status"], "OK", answer)
        self.assert_means(answer["Response"]["Results"])
