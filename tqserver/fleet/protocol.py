"""What the supervisor and its proxy processes (server.proxy_processes > 1) say to each
other: AMP over the proxy process's stdin and stdout.

    supervisor -> proxy process   Configure (server.yaml), Publish (routes and instances),
                                  Idle (answered once instances have no request in flight)
    proxy process -> supervisor   Report (request counts, every second), WorkerOutput
                                  (a PHP script's STDERR lines, for the worker's log)

Payloads are pickles: both ends are the same TQServer code, and the pipe reaches only the
process the supervisor started.
"""

from __future__ import annotations

import pickle

import attrs
from twisted.internet.interfaces import IAddress, ITransport
from twisted.internet.protocol import connectionDone
from twisted.protocols import amp
from twisted.python.failure import Failure
from zope.interface import implementer

from tqserver.config.discovery import WorkerSpec
from tqserver.config.server import ServerConfig

# Set by a proxy process on what it relays to the supervisor; stripped from client requests.
RELAY_HEADER = b"X-TQServer-Relay"


class Pickled(amp.Argument):
    """Any picklable value, of any size: AMP values stop at 65535 bytes, so a longer one
    travels as the keys name, name.2, name.3..."""

    CHUNK = 0xFFFF

    def toBox(self, name, strings, objects, proto):
        data = pickle.dumps(
            self.retrieve(objects, name.decode("ascii"), proto), protocol=pickle.HIGHEST_PROTOCOL
        )
        strings[name] = data[: self.CHUNK]
        for n, start in enumerate(range(self.CHUNK, len(data), self.CHUNK), 2):
            strings[b"%s.%d" % (name, n)] = data[start : start + self.CHUNK]

    def fromBox(self, name, strings, objects, proto):
        parts = [strings[name]]
        n = 2
        while b"%s.%d" % (name, n) in strings:
            parts.append(strings[b"%s.%d" % (name, n)])
            n += 1
        objects[name.decode("ascii")] = pickle.loads(b"".join(parts))


@attrs.frozen
class Settings:
    """What a proxy process needs besides routes."""

    config: ServerConfig
    mode: str
    root: str
    relay_port: int  # the supervisor's loopback HTTP port for reserved endpoints
    relay_secret: bytes  # proves a relayed request came from a proxy process


@attrs.frozen
class PoolSnapshot:
    """One worker as the proxy sees it at one moment."""

    spec: WorkerSpec
    instances: tuple[tuple[str, int], ...]  # (instance id, port) of the serving ones
    may_serve_soon: bool  # starting or restarting: hold requests
    error: str | None
    build_error: str | None
    start_error: str | None = None  # dev: why new code exited at start
    config_error_text: str | None = None  # its worker.yaml cannot be applied: why


class Configure(amp.Command):
    arguments = [(b"settings", Pickled())]
    response = []


class Publish(amp.Command):
    """A whole new routing table; answered once the proxy process uses it."""

    arguments = [(b"version", amp.Integer()), (b"pools", Pickled())]
    response = []


class Idle(amp.Command):
    """Answered once none of these instances has a request in flight in that process."""

    arguments = [(b"instances", amp.ListOf(amp.Unicode()))]
    response = []


class Report(amp.Command):
    """Per instance (requests finished since the last report, in flight now), and the
    process's cumulative RequestStats snapshot."""

    arguments = [(b"instances", Pickled()), (b"requests", Pickled())]
    requiresAnswer = False


class WorkerOutput(amp.Command):
    arguments = [(b"instance", amp.Unicode()), (b"data", Pickled())]
    requiresAnswer = False


class QuietAMP(amp.AMP):
    """AMP without its connection-made and connection-lost log lines: the supervisor says
    itself when a proxy process starts or exits."""

    def makeConnection(self, transport) -> None:
        amp.BinaryBoxProtocol.makeConnection(self, transport)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        amp.BinaryBoxProtocol.connectionLost(self, reason)
        self.transport = None


@implementer(IAddress)
@attrs.frozen
class PipeAddress:
    description: str


@implementer(ITransport)
class ChildStdio:
    """AMP's transport on the supervisor's side: writes go to the proxy process's stdin
    (its answers arrive on its stdout, see ProxyProcess.childDataReceived)."""

    def __init__(self, process) -> None:
        self.process = process

    def write(self, data: bytes) -> None:
        self.process.writeToChild(0, data)

    def writeSequence(self, data) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        self.process.closeStdin()

    def getPeer(self) -> IAddress:
        return PipeAddress("proxy process stdio")

    def getHost(self) -> IAddress:
        return PipeAddress("supervisor")
