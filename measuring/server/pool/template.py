"""
The template process seen from the server: started, asked to fork job processes, heard of their
exits.

``TemplateProcess`` spawns ``python -P -m measuring.worker SERVER_PID`` with a Unix socket as its
file descriptor ``CONTROL_FD``, over which ``fork`` sends a Fork request with the four pipes of a
job process (see ``measuring.messages``). ``ready`` fires once the template has loaded and warmed
up; ``ended`` when its process has ended (``reason`` says how). Each fork answers a Deferred of
the job process's pid and, through ``exit_of``, one of how it exited (None when the template ended
first and could not tell). It never waits on a process: everything arrives through the reactor.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
from typing import Any

from twisted.internet import defer
from twisted.internet.error import ConnectionDone, ProcessExitedAlready
from twisted.internet.interfaces import IReactorProcess, IReactorSocket
from twisted.internet.protocol import ProcessProtocol, Protocol, ServerFactory
from twisted.logger import Logger
from twisted.python.failure import Failure

from measuring.errors import Internal
from measuring.messages import CONTROL_FD, Message, MessageBuffer, encode


class TemplateLost(Internal):
    """The template ended before it could answer."""


class _Control(Protocol):
    """The server's end of the control socket: passes the template's messages on."""

    def __init__(self, template: TemplateProcess) -> None:
        self._template = template
        self._messages = MessageBuffer()

    def dataReceived(self, data: bytes) -> None:
        try:
            messages = self._messages.feed(data)
        except ValueError as e:
            self._template.garbled(str(e))
            return
        for message in messages:
            self._template.received(message)

    def connectionLost(self, reason: Failure = ConnectionDone) -> None:  # type: ignore[assignment]
        self._template.control_lost()


class _One(ServerFactory):
    """A factory of the one protocol it was given."""

    def __init__(self, protocol: Protocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: object) -> Protocol:
        self._protocol.factory = self
        return self._protocol


class TemplateProcess(ProcessProtocol):
    """One template process: ``starting``, then ``ready``, then ``ended``."""

    _log = Logger()

    def __init__(self, reactor: Any, argv: list[str], environment: dict[str, str], path: str):
        self._reactor = reactor
        self._argv = argv
        self._environment = environment
        self._path = path
        self._control: _Control | None = None
        self._ids = itertools.count(1)
        self._forks: dict[int, tuple[defer.Deferred[int], list[int]]] = {}
        self._exits: dict[int, defer.Deferred[int | None]] = {}
        self.state = "starting"
        self.pid: int | None = None
        #: How many threads the template had when it said Ready (it must be one).
        self.threads: int | None = None
        self.was_ready = False
        self.ready: defer.Deferred[None] = defer.Deferred()
        self.ended: defer.Deferred[None] = defer.Deferred()
        #: How its process ended, once it has.
        self.reason: Failure | None = None

    def start(self) -> None:
        """Start the template process, its control socket in hand."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            process: IReactorProcess = self._reactor
            process.spawnProcess(
                self,
                self._argv[0],
                self._argv,
                env=self._environment,
                path=self._path,
                childFDs={0: "w", 1: "r", 2: "r", CONTROL_FD: theirs.fileno()},
            )
            adopting: IReactorSocket = self._reactor
            self._control = _Control(self)
            adopting.adoptStreamConnection(ours.fileno(), socket.AF_UNIX, _One(self._control))
        finally:
            ours.close()
            theirs.close()

    def fork(self, fds: list[int], request: Message) -> defer.Deferred[int]:
        """
        Ask for a job process with the pipes ``fds`` (stdout, stderr, job, reply); fires with
        its pid. The server's copies of ``fds`` are closed once the template has them.
        """
        if self.state != "ready" or self._control is None or self._control.transport is None:
            for fd in fds:
                _close(fd)
            return defer.fail(TemplateLost("the template process is not ready"))
        number = next(self._ids)
        forked: defer.Deferred[int] = defer.Deferred()
        self._forks[number] = (forked, fds)
        transport = self._control.transport
        for fd in fds:
            transport.sendFileDescriptor(fd)  # type: ignore[attr-defined]
        transport.write(encode({**request, "Type": "Fork", "Id": number, "Fds": len(fds)}))
        return forked

    def exit_of(self, pid: int) -> defer.Deferred[int | None]:
        """How job process ``pid`` exits: its wait status, or None if the template ends first."""
        if pid not in self._exits:
            self._exits[pid] = defer.Deferred()
        return self._exits[pid]

    def stop(self) -> None:
        """Ask the template to end (closing its control socket), and make sure it does."""
        if self._control is not None and self._control.transport is not None:
            self._control.transport.loseConnection()
        self._kill()

    # -- what comes from the template

    def received(self, message: Message) -> None:
        kind = message.get("Type")
        if kind == "Ready" and self.state == "starting":
            self.threads = message.get("Threads")
            if self.threads != 1:
                self._log.warn(
                    "the template process has {n} threads, not one: a job process forked from "
                    "it may hang",
                    n=self.threads,
                )
            self.state = "ready"
            self.was_ready = True
            self.ready.callback(None)
        elif kind == "Forked" and message.get("Id") in self._forks:
            forked, fds = self._forks.pop(message["Id"])
            for fd in fds:
                _close(fd)
            forked.callback(int(message["Pid"]))
        elif kind == "Exited":
            self.exit_of(int(message["Pid"])).callback(int(message["Status"]))
            del self._exits[int(message["Pid"])]

    def garbled(self, problem: str) -> None:
        self._log.error("the template process sent what the server cannot read: {p}", p=problem)
        self.stop()

    def control_lost(self) -> None:
        self._control = None
        self._kill()

    def _kill(self) -> None:
        if self.state != "ended" and self.transport is not None:
            with contextlib.suppress(ProcessExitedAlready, OSError):
                self.transport.signalProcess("KILL")

    # -- the process

    def connectionMade(self) -> None:
        self.pid = self.transport.pid  # type: ignore[union-attr]
        self.transport.closeChildFD(0)  # type: ignore[union-attr]

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        self._log.warn(
            "template process {pid}: {output}",
            pid=self.pid,
            output=data[:4096].decode("utf-8", "replace").rstrip(),
        )

    def processEnded(self, reason: Failure) -> None:
        was, self.state = self.state, "ended"
        lost = TemplateLost("the template process ended")
        forks, self._forks = self._forks, {}
        for forked, fds in forks.values():
            for fd in fds:
                _close(fd)
            forked.errback(lost)
        exits, self._exits = self._exits, {}
        for exited in exits.values():
            exited.callback(None)
        if was == "starting":
            early = TemplateLost("the template process ended before it was ready")
            self.ready.errback(Failure(early))
        self.reason = reason
        self.ended.callback(None)


def _close(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)
