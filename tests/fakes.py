"""Test doubles for the reactor's process side: spawnProcess without processes, driven by
a Clock, so pool and health logic can be tested without sleeping."""
from __future__ import annotations

from typing import Dict, List, Optional

from twisted.internet import defer, error
from twisted.internet.task import Clock
from twisted.python.failure import Failure


class FakeProcessTransport:
    _next_pid = 40000

    def __init__(self, reactor: "FakeProcessReactor", proto, argv, env, path) -> None:
        FakeProcessTransport._next_pid += 1
        self.pid = FakeProcessTransport._next_pid
        self.reactor = reactor
        self.proto = proto
        self.argv = argv
        self.env = env
        self.path = path
        self.ended = False

    stdin = None   # set to a callable to receive what is written to the child's stdin

    def closeStdin(self) -> None:
        pass

    def writeToChild(self, fd: int, data: bytes) -> None:
        assert fd == 0 and self.stdin is not None, fd
        self.stdin(data)

    def signalProcess(self, sig) -> None:
        self.reactor.signals.append((self.pid, sig))

    def exit(self, code: int = 0, signal: Optional[int] = None) -> None:
        """Make the fake process end, as the real reactor would report it."""
        if self.ended:
            return
        self.ended = True
        if code == 0 and signal is None:
            reason = Failure(error.ProcessDone(0))
        else:
            reason = Failure(error.ProcessTerminated(code if signal is None else None, signal))
        self.proto.processEnded(reason)


class FakeProcessReactor(Clock):
    """A Clock that also 'spawns' processes (recorded, never run)."""

    def __init__(self) -> None:
        Clock.__init__(self)
        self.spawned: List[FakeProcessTransport] = []
        self.signals: List = []

    def spawnProcess(self, proto, executable, args=(), env=None, path=None, **kw):
        transport = FakeProcessTransport(self, proto, list(args), env or {}, path)
        self.spawned.append(transport)
        proto.makeConnection(transport)
        return transport

    def by_pid(self, pid: int) -> FakeProcessTransport:
        return next(t for t in self.spawned if t.pid == pid)


class GroupSignals:
    """Stands in for process.signal_group: records signals, ends processes like a real
    worker would on SIGTERM/SIGKILL (unless told to ignore SIGTERM)."""

    def __init__(self, reactor: FakeProcessReactor) -> None:
        self.reactor = reactor
        self.sent: List = []
        self.ignore_term: set = set()

    def __call__(self, pid, sig) -> bool:
        import signal as _signal
        self.sent.append((pid, sig))
        try:
            transport = self.reactor.by_pid(pid)
        except StopIteration:
            return False
        if transport.ended:
            return False
        if sig == _signal.SIGKILL or (sig == _signal.SIGTERM and pid not in self.ignore_term):
            transport.exit(0 if sig == _signal.SIGTERM else 1,
                           None if sig == _signal.SIGTERM else sig)
        return True


class ScriptedProbe:
    """Health probe whose answers the test decides per port (default: healthy)."""

    def __init__(self) -> None:
        self.answers: Dict[int, bool] = {}
        self.calls: List[int] = []
        self.default = True

    def __call__(self, inst, path: str, timeout: float) -> defer.Deferred:
        self.calls.append(inst.port)
        return defer.succeed(self.answers.get(inst.port, self.default))
