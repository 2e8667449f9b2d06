"""A proxy process (server.proxy_processes > 1), started by the supervisor as
``python -m tqserver.fleet.child``.

It accepts connections on the listening socket(s) the supervisor passed down, routes them
with the table the supervisor publishes (Publish), forwards to worker instances itself
with the same Front and Forward as the supervisor, relays TQServer's own endpoints
(/health, /metrics, /_tqserver) to the supervisor, and reports what it did (Report).
Requests are accounted per instance here, so the supervisor can drain an instance across
every process before stopping it (Idle).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys

from twisted.internet import defer, stdio, task, tcp
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger, globalLogBeginner
from twisted.python.failure import Failure

from tqserver.config.discovery import WorkerSpec
from tqserver.config.server import default_server_config
from tqserver.config.worker import WorkerConfig
from tqserver.control.metrics import RequestStats
from tqserver.control.reserved import ReservedPaths
from tqserver.fastcgi.client import FastCGIPool
from tqserver.fastcgi.forward import forwarding as fastcgi_forwarding
from tqserver.fleet.protocol import (
    RELAY_HEADER,
    Configure,
    Idle,
    PoolSnapshot,
    Publish,
    QuietAMP,
    Report,
    Settings,
    WorkerOutput,
)
from tqserver.heap import freeze_startup_heap
from tqserver.logs.files import LOG_FILES, resolve_template
from tqserver.logs.observer import ServerLogObserver
from tqserver.logs.reopen import ReopenLogs
from tqserver.proxy.access_log import AccessLog
from tqserver.proxy.forward import Forward
from tqserver.proxy.front import Front
from tqserver.proxy.router import RoutingTable
from tqserver.proxy.site import ProxySite
from tqserver.proxy.state import ProxyState
from tqserver.supervise.rotation import InFlight, Rotation
from tqserver.twisted_compat import adopt_listening_port

log = Logger()
REPORT_SECONDS = 1.0
DRAIN_POLL_SECONDS = 0.05


class MirrorInstance(InFlight):
    """A worker instance as this process sees it: where it listens and what it has in
    flight from here."""

    __slots__ = (
        "_idle_waiters",
        "_output",
        "finished",
        "id",
        "inflight",
        "port",
        "reported_inflight",
    )

    def __init__(self, instance_id: str, port: int, output) -> None:
        self.id = instance_id
        self.port = port
        self.inflight = 0
        self.finished = 0  # since the last report
        self.reported_inflight = 0
        self._idle_waiters: list[defer.Deferred] = []
        self._output = output

    def request_started(self) -> None:
        self.inflight += 1

    def request_finished(self) -> None:
        self.inflight -= 1
        self.finished += 1
        if self.inflight == 0:
            self._wake_idle()

    def log_lines(self, data: bytes) -> None:
        """A PHP script's STDERR lines: the supervisor writes the worker's log."""
        self._output(self.id, data)


class MirrorPool(Rotation):
    """A worker's serving instances, as last published by the supervisor."""

    def __init__(self, reactor) -> None:
        self.reactor = reactor
        self._serving_waiters: list[defer.Deferred] = []
        self.serving: tuple[MirrorInstance, ...] = ()
        self.soon = False

    def update(self, snapshot: PoolSnapshot, serving: tuple[MirrorInstance, ...]) -> None:
        self.spec = snapshot.spec
        self.name = snapshot.spec.name
        self.error = snapshot.error
        self.build_error = snapshot.build_error
        self.start_error = snapshot.start_error
        self.config_error_text = snapshot.config_error_text
        self.soon = snapshot.may_serve_soon
        self.serving = serving
        if serving or not self.soon:
            self._wake_waiters()

    @property
    def public_dir(self) -> str:
        return os.path.join(self.spec.directory, "public")

    def _may_serve_soon(self) -> bool:
        return self.soon

    @property
    def _reactor(self):
        return self.reactor


class RelayForward(Forward):
    """A reserved endpoint (/health, /metrics, /_tqserver...) handed to the supervisor,
    which knows the answers; the secret header lets it trust the client address we add."""

    decorate = False

    def __init__(self, relay_secret: bytes, *args) -> None:
        Forward.__init__(self, *args)
        self.relay_secret = relay_secret

    def forwarded_headers(self):
        return Forward.forwarded_headers(self) + [(RELAY_HEADER, self.relay_secret)]


class OneAcceptPort(tcp.Port):
    """A listening port shared with other processes: take one connection per wake-up, so
    connections arriving together spread over the processes instead of all going to the
    first one that wakes (nginx's multi_accept off)."""

    def doRead(self) -> None:
        self.numberAccepts = 1
        tcp.Port.doRead(self)


class ProxyProcess(QuietAMP):
    """The control connection to the supervisor (on stdin/stdout) and everything it
    drives: the listening ports, the routing table, the reports."""

    def __init__(self, reactor, listen_fds: list[int], observer: ServerLogObserver) -> None:
        QuietAMP.__init__(self)
        self.reactor = reactor
        self.listen_fds = listen_fds
        self.observer = observer
        self.shared = ProxyState("prod", default_server_config())  # (AMP has a ``state``)
        self.stats = RequestStats()  # what this process answered, reported to the supervisor
        self.relay_port = 0
        self.relay_secret = b""
        self.fastcgi = FastCGIPool(reactor)
        self.front = Front(
            self.shared,
            reactor,
            reserved=ReservedPaths(self.shared),
            forwards={"php": fastcgi_forwarding(self.fastcgi)},
            relay=self._relay,
        )
        self.fastcgi.setServiceParent(self.front)
        self.site: ProxySite | None = None
        self.ports: list[tcp.Port] = []
        self.pools: dict[str, MirrorPool] = {}
        self.instances: dict[str, MirrorInstance] = {}
        self.retired: dict[str, MirrorInstance] = {}  # unpublished, maybe still busy
        self.relay_pool = MirrorPool(reactor)
        self.reporter = task.LoopingCall(self.report)
        self.reporter.clock = reactor
        self._reported_requests = -1
        self.stopping = False

    # -- from the supervisor ---------------------------------------------------------
    @Configure.responder
    def configure(self, settings: Settings):
        shared = self.shared
        shared.config, shared.mode = settings.config, settings.mode
        self.relay_port, self.relay_secret = settings.relay_port, settings.relay_secret
        server = settings.config.server
        LOG_FILES.configure(server.log_file_mode, server.log_retention_days)
        self.observer.set_file(resolve_template(server.log_file, settings.root))
        relay_spec = WorkerSpec(
            name="tqserver",
            directory=settings.root,
            route="/",
            type="http",
            config=WorkerConfig(strip_prefix=False),
            config_file=None,
        )
        self.relay_pool.update(
            PoolSnapshot(relay_spec, (), False, None, None),
            (MirrorInstance("supervisor", settings.relay_port, self._worker_output),),
        )
        if self.site is None:
            self.site = ProxySite(
                self.front,
                log_access=AccessLog(shared, self.stats, self.reactor, root=settings.root),
            )
        return {}

    @Publish.responder
    def publish(self, version: int, pools: list[PoolSnapshot]):
        known = self.instances
        current: dict[str, MirrorInstance] = {}
        table = []
        new_pools: dict[str, MirrorPool] = {}
        for snapshot in pools:
            serving = []
            for instance_id, port in snapshot.instances:
                inst = (
                    known.get(instance_id)
                    or self.retired.pop(instance_id, None)
                    or MirrorInstance(instance_id, port, self._worker_output)
                )
                current[instance_id] = inst
                serving.append(inst)
            pool = self.pools.get(snapshot.spec.name) or MirrorPool(self.reactor)
            new_pools[snapshot.spec.name] = pool
            table.append((snapshot.spec.route, pool))
        self.shared.routes = RoutingTable(table)  # one assignment: the switch
        for snapshot, (_, pool) in zip(pools, table):
            pool.update(snapshot, tuple(current[i] for i, _ in snapshot.instances))
        for name, pool in self.pools.items():
            if name not in new_pools:  # a removed worker: waiters get a 404/503
                pool.update(PoolSnapshot(pool.spec, (), False, pool.error, pool.build_error), ())
        for instance_id, inst in known.items():
            if instance_id not in current:
                self._retire(inst)
        self.pools, self.instances = new_pools, current
        if not self.reporter.running and self.site is not None and not self.stopping:
            self._listen()  # the first table: now requests can be routed
        return {}

    @Idle.responder
    def idle(self, instances: list[str]):
        waits = [inst.idle() for inst in map(self._find, instances) if inst is not None]
        d = defer.gatherResults(waits) if waits else defer.succeed(None)
        return d.addCallback(lambda _: {})

    def _find(self, instance_id: str) -> MirrorInstance | None:
        return self.instances.get(instance_id) or self.retired.get(instance_id)

    def _retire(self, inst: MirrorInstance) -> None:
        """Out of every rotation: once its last request here ends, forget it and close our
        pooled connections to its port (a later instance may get the same port)."""
        self.retired[inst.id] = inst

        def forget(_):
            if self.retired.get(inst.id) is inst:
                del self.retired[inst.id]
                self.front.upstreams.close_port(inst.port)
                self.fastcgi.close_port(inst.port)

        inst.idle().addCallback(forget)

    # -- to the supervisor -----------------------------------------------------------
    def report(self) -> None:
        changed = {}
        for inst in list(self.instances.values()) + list(self.retired.values()):
            if inst.finished or inst.inflight != inst.reported_inflight:
                changed[inst.id] = (inst.finished, inst.inflight)
                inst.finished, inst.reported_inflight = 0, inst.inflight
        total = sum(self.stats.counts.values())
        if not changed and total == self._reported_requests:
            return
        self._reported_requests = total
        self.callRemote(Report, instances=changed, requests=self.stats.snapshot())

    def _worker_output(self, instance_id: str, data: bytes) -> None:
        self.callRemote(WorkerOutput, instance=instance_id, data=data)

    # -- serving ---------------------------------------------------------------------
    def _relay(self, request) -> Forward:
        uri = request.uri
        target = request.path + (b"?" + uri.partition(b"?")[2] if b"?" in uri else b"")
        return RelayForward(
            self.relay_secret, self.front, request, self.relay_pool, "/", target, self.shared.config
        )

    def _listen(self) -> None:
        # Every proxy process's descriptor shares one open file, and so its O_NONBLOCK.
        # PyPy clears that flag when it makes a socket object from a descriptor (unless the
        # default timeout is 0): the other processes would then block in accept() whenever
        # they lose a connection to a sibling.
        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(0.0)
        try:
            for fd in self.listen_fds:
                port = adopt_listening_port(OneAcceptPort, self.reactor, fd, _family(fd), self.site)
                port.startListening()
                os.close(fd)
                self.ports.append(port)
        finally:
            socket.setdefaulttimeout(previous)
        self.reporter.start(REPORT_SECONDS, now=False)
        log.info("proxy process {pid} accepting connections", pid=os.getpid())

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        QuietAMP.connectionLost(self, reason)
        if not self.stopping:
            log.info("the supervisor is gone: stopping")
            self.reactor.stop()

    async def drain(self) -> None:
        """On SIGTERM (or the supervisor gone): stop accepting, let requests in flight
        finish (up to workers.shutdown_grace_period_ms), then let the reactor stop."""
        self.stopping = True
        for port in self.ports:
            port.stopListening()
        if self.reporter.running:
            self.reporter.stop()
        grace = self.shared.config.workers.shutdown_grace_period_ms / 1000.0
        deadline = self.reactor.seconds() + grace
        while self._busy() and self.reactor.seconds() < deadline:
            await task.deferLater(self.reactor, DRAIN_POLL_SECONDS, lambda: None)
        if self.transport is not None:
            self.report()

    def _busy(self) -> bool:
        return any(
            inst.inflight
            for inst in [*self.instances.values(), *self.retired.values(), *self.relay_pool.serving]
        )


def _family(fd: int) -> int:
    with socket.socket(fileno=os.dup(fd)) as sock:
        return sock.family


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tqserver.fleet.child",
        description="A TQServer proxy process (started by the "
        "supervisor when server.proxy_processes > 1).",
    )
    parser.add_argument("--index", type=int, default=1)
    parser.add_argument(
        "--listen",
        type=int,
        action="append",
        default=[],
        help="an inherited listening socket's file descriptor",
    )
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    from twisted.internet import reactor

    observer = ServerLogObserver(
        quiet=args.quiet, file_template=None, console=sys.stderr, system=f"proxy {args.index}"
    )
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    reactor.callWhenRunning(freeze_startup_heap)
    control = ProxyProcess(reactor, args.listen, observer)
    stdio.StandardIO(control, reactor=reactor)
    reactor.addSystemEventTrigger(
        "before", "shutdown", lambda: defer.ensureDeferred(control.drain())
    )
    # The supervisor decides when we stop: a terminal's Ctrl-C reaches it, and it sends
    # SIGTERM here after it.
    reactor.callWhenRunning(signal.signal, signal.SIGINT, signal.SIG_IGN)
    reactor.callWhenRunning(signal.signal, signal.SIGHUP, signal.SIG_IGN)
    # SIGUSR1 (passed on by the supervisor after a log rotation): reopen the server log.
    ReopenLogs(reactor).startService()
    reactor.run()


if __name__ == "__main__":
    main()
