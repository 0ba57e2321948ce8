"""
Fuzz the protocol's framing, parsing and request validation with atheris.

    pip install atheris
    python fuzz/fuzz_protocol.py -max_total_time=300 [corpus-folder]

(from the repository root). Each input is split into lines and fed to a real ``RequestProtocol``
over a ``StringTransport``, with the real ``Dispatcher`` in front of stand-ins for Info and the
jobs. What must hold for any input: nothing raises out of the protocol, and every line the server
writes is one JSON object with a ``Header`` and a ``Status``. Not part of the test suite.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from typing import Any

import atheris

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

with atheris.instrument_imports():
    from twisted.internet import defer
    from twisted.internet.testing import StringTransport

    from measuring.errors import Busy
    from measuring.server.dispatch import Dispatcher
    from measuring.server.protocol import RequestProtocol
    from measuring.server.stats import Stats

ROOT = tempfile.mkdtemp(prefix="measuring-fuzz-")
os.makedirs(os.path.join(ROOT, "data"))


class Info:
    def answer(self, request: str) -> defer.Deferred[dict[str, Any]]:
        return defer.succeed({"Asked": request})


class Jobs:
    """Refuses every job at once: the fuzzer exercises validation, not the pool."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: defer.fail(Busy("fuzzing"))


def test_one_input(data: bytes) -> None:
    dispatcher = Dispatcher(Info(), Jobs(), Stats(), (ROOT,), (os.path.join(ROOT, "state"),))
    protocol = RequestProtocol(dispatcher, 4096)
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(data)
    for line in transport.value().splitlines():
        answer = json.loads(line)
        assert isinstance(answer, dict) and "Header" in answer and "Status" in answer, answer


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
