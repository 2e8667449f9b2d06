"""server.proxy_processes > 1: the supervisor owns the listening socket(s) and the routing
table, and N proxy processes (tqserver.fleet.child) accept and forward the requests, the
way nginx's worker processes share its listening sockets.

The supervisor publishes a new table to every proxy process whenever a pool's serving
instances (or its error, or the set of workers) change, and before an instance stops it
waits until no proxy process has a request in flight on it (Idle), so a swap loses no
request. Reserved endpoints reach the supervisor through a loopback relay port.
"""

from __future__ import annotations

import os
import secrets
import socket
import sys
from typing import cast

import psutil
from twisted.application.service import MultiService, Service
from twisted.internet import defer, endpoints, protocol, tcp
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from tqserver.control.metrics import RequestStats
from tqserver.fleet.protocol import (
    RELAY_HEADER,
    ChildStdio,
    Configure,
    Idle,
    PoolSnapshot,
    Publish,
    QuietAMP,
    Report,
    Settings,
    WorkerOutput,
)
from tqserver.proxy.site import ProxyRequest, ProxySite
from tqserver.supervise.lifecycle import Backoff, Stopper

log = Logger()
RESTART_MIN_SECONDS = 0.5
RESTART_MAX_SECONDS = 10.0
LISTEN_BACKLOG = 1024


def proxy_process_count(setting) -> int:
    """server.proxy_processes: an integer, or "auto" for one per usable core."""
    if setting == "auto":
        try:
            return len(psutil.Process().cpu_affinity())
        except (AttributeError, psutil.Error):  # no affinity on this platform
            return os.cpu_count() or 1
    return int(setting)


def bind_listening_socket(host: str, port: int, family: int) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class RelayRequest(ProxyRequest):
    """A request a proxy process relayed to the supervisor: the client is the last
    X-Forwarded-For hop, when the relay secret proves a proxy process added it."""

    @property
    def client_ip(self) -> str:
        headers = self.requestHeaders
        given = headers.getRawHeaders(RELAY_HEADER, [b""])[0]
        site = cast("RelaySite", self.channel.site)  # the site of a RelayRequest
        if secrets.compare_digest(given, site.relay_secret):
            xff = headers.getRawHeaders(b"x-forwarded-for")
            if xff:
                return xff[-1].rsplit(b",", 1)[-1].strip().decode("latin-1")
        return super().client_ip


class RelaySite(ProxySite):
    """The supervisor's loopback port for what proxy processes relay; they log the
    requests, so nothing is logged here."""

    requestFactory = RelayRequest

    def __init__(self, front, relay_secret: bytes) -> None:
        ProxySite.__init__(self, front, log_access=lambda request: None)
        self.relay_secret = relay_secret


class RelayListener(Service):
    """The loopback port (any free one) where the supervisor answers what proxy processes
    relay (TQServer's own endpoints). ``listening`` fires with the port once bound."""

    name = "relay"  # type: ignore[assignment]  # Twisted types Service.name as None

    def __init__(self, reactor, site: RelaySite) -> None:
        self.reactor = reactor
        self.site = site
        self.port = None
        self.listening: defer.Deferred = defer.Deferred()

    def startService(self) -> None:
        Service.startService(self)
        endpoint = endpoints.TCP4ServerEndpoint(self.reactor, 0, interface="127.0.0.1")
        d = endpoint.listen(self.site)
        d.addCallback(self._listening)
        d.addErrback(lambda f: log.failure("cannot start the relay port", f))

    def _listening(self, port) -> None:
        self.port = port
        self.listening.callback(port)

    def stopService(self):
        Service.stopService(self)
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()
        return None


class SupervisorControl(QuietAMP):
    """The supervisor's end of one proxy process's control connection."""

    def __init__(self, child: ProxyChild) -> None:
        QuietAMP.__init__(self)
        self.child = child

    @Report.responder
    def report(self, instances: dict, requests):
        self.child.fleet.reported(self.child, instances, requests)
        return {}

    @WorkerOutput.responder
    def worker_output(self, instance: str, data: bytes):
        inst = self.child.fleet.instances().get(instance)
        if inst is not None:
            inst.log_lines(data)
        return {}


class ProxyChild(protocol.ProcessProtocol):
    """One proxy process, as the supervisor sees it."""

    def __init__(self, fleet: ProxyFleet, index: int) -> None:
        self.fleet = fleet
        self.index = index
        self.control = SupervisorControl(self)
        self.inflight: dict[str, int] = {}  # instance id -> requests in flight there
        self.requests = RequestStats()  # its cumulative counts, as last reported
        self.started_at = fleet.reactor.seconds()
        self.ended: defer.Deferred = defer.Deferred()
        self.connected = False
        self.stopper = Stopper(fleet.reactor, self._signal, f"proxy process {index}")

    def _signal(self, sig) -> None:
        if self.transport is not None:
            self.transport.signalProcess(sig)

    def connectionMade(self) -> None:
        self.connected = True
        self.control.makeConnection(ChildStdio(self.transport))
        self.fleet.child_started(self)

    def childDataReceived(self, fd: int, data: bytes) -> None:
        if fd == 1:
            self.control.dataReceived(data)

    def processEnded(self, reason) -> None:
        self.connected = False
        self.stopper.ended()
        self.control.connectionLost(reason)
        self.fleet.child_ended(self, reason)
        self.ended.callback(None)

    def call(self, command, **kwargs) -> defer.Deferred:
        """A command to this process; fails quietly (with None) if it goes away."""
        if not self.connected:
            return defer.succeed(None)
        d = self.control.callRemote(command, **kwargs)
        return d.addErrback(lambda f: None)


class ProxyFleet(MultiService):
    """Owns the public listening sockets and the proxy processes that accept on them. It
    reads what it tells them from ``state`` (the routes and configuration the Supervisor
    publishes there) and is a listener of the Supervisor (``pool_changed``,
    ``configure``, ``idle``). Its child ``relay`` (a RelayListener, added by makeService)
    is where they hand over TQServer's own endpoints."""

    name = "fleet"  # type: ignore[assignment]  # Twisted types Service.name as None

    def __init__(self, reactor, state, root: str, addresses, count: int, quiet: bool) -> None:
        MultiService.__init__(self)
        self.reactor = reactor
        self.state = state
        self.root = root
        self.addresses = addresses  # [(host, port, family)]
        self.count = count
        self.quiet = quiet
        self.sockets: list[socket.socket] = []
        self.children: dict[int, ProxyChild] = {}
        self.retired = RequestStats()  # counts of proxy processes that have exited
        self.relay_secret = secrets.token_hex(16).encode()
        self.relay_port: tcp.Port | None = None
        self._version = 0
        self._publish_call: IDelayedCall | None = None
        self._backoff: dict[int, Backoff] = {}  # by process index
        self._restart_calls: dict[int, IDelayedCall] = {}

    # -- lifecycle -------------------------------------------------------------------
    def privilegedStartService(self) -> None:
        """Bind before twistd gives up privileges, so ports below 1024 work."""
        self.sockets = [
            bind_listening_socket(host, port, family) for host, port, family in self.addresses
        ]
        MultiService.privilegedStartService(self)

    def startService(self) -> None:
        if not self.sockets:
            self.sockets = [
                bind_listening_socket(host, port, family) for host, port, family in self.addresses
            ]
        MultiService.startService(self)
        relay = self.getServiceNamed("relay")
        relay.listening.addCallback(self._relay_listening)

    def _relay_listening(self, port) -> None:
        self.relay_port = port
        for index in range(1, self.count + 1):
            self._spawn(index)
        log.info(
            "{n} proxy processes accept on {where}",
            n=self.count,
            where=", ".join(f"{h or '*'}:{p}" for h, p, _ in self.addresses),
        )

    def stopService(self) -> defer.Deferred:
        # Not MultiService's: the relay stays until every proxy process is gone (they may
        # relay requests while they drain).
        Service.stopService(self)
        for call in self._restart_calls.values():
            if call.active():
                call.cancel()
        self._restart_calls.clear()
        kill_timeout = self.state.config.workers.kill_timeout_ms / 1000.0
        waits = []
        for child in list(self.children.values()):
            if child.connected:
                child.stopper.stop("TERM", kill_timeout)
            waits.append(child.ended)
        d = defer.gatherResults(waits, consumeErrors=True)

        def closed(_):
            for sock in self.sockets:
                sock.close()
            self.sockets = []
            return defer.gatherResults(
                [defer.maybeDeferred(service.stopService) for service in self],
                consumeErrors=True,
            )

        return d.addBoth(closed)

    def _spawn(self, index: int) -> None:
        self._restart_calls.pop(index, None)
        child = ProxyChild(self, index)
        fds = {0: "w", 1: "r", 2: 2}
        argv = [sys.executable, "-m", "tqserver.fleet.child", "--index", str(index)]
        for n, sock in enumerate(self.sockets, 3):
            fds[n] = sock.fileno()
            argv += ["--listen", str(n)]
        if self.quiet:
            argv.append("--quiet")
        self.children[index] = child
        env = dict(os.environ, TQSERVER_ROOT=self.root, TQSERVER_PROXY_PROCESS=str(index))
        self.reactor.spawnProcess(
            child, sys.executable, argv, env=env, path=self.root, childFDs=fds
        )

    def reopen_logs(self) -> None:
        """SIGUSR1 reached the supervisor: each proxy process reopens its log files too."""
        for child in self.children.values():
            if child.connected:
                child._signal("USR1")

    def child_started(self, child: ProxyChild) -> None:
        child.call(Configure, settings=self._settings())
        child.call(Publish, version=self._version, pools=self.snapshot())

    def child_ended(self, child: ProxyChild, reason) -> None:
        self.retired.add(child.requests.snapshot())
        if self.children.get(child.index) is child:
            del self.children[child.index]
        known = self.instances()
        for instance_id in child.inflight:
            if instance_id in known:
                known[instance_id].requests_elsewhere(0, self._inflight_on(instance_id))
        if not self.running:
            return
        code = getattr(reason.value, "exitCode", None)
        sig = getattr(reason.value, "signal", None)
        backoff = self._backoff.setdefault(child.index, Backoff())
        backoff.died(self.reactor.seconds() - child.started_at)
        delay = backoff.next(RESTART_MIN_SECONDS, RESTART_MAX_SECONDS)
        log.warn(
            "proxy process {index} exited ({how}); starting another in {delay:.1f}s",
            index=child.index,
            how=f"signal {sig}" if sig else f"status {code}",
            delay=delay,
        )
        self._restart_calls[child.index] = self.reactor.callLater(delay, self._spawn, child.index)

    # -- what the proxy processes are told -------------------------------------------
    def _settings(self) -> Settings:
        assert self.relay_port is not None  # proxy processes start once it listens
        return Settings(
            config=self.state.config,
            mode=self.state.mode,
            root=self.root,
            relay_port=self.relay_port.getHost().port,
            relay_secret=self.relay_secret,
        )

    def configure(self, config=None) -> None:
        """server.yaml was reloaded (a Supervisor config listener)."""
        settings = self._settings()
        for child in self.children.values():
            child.call(Configure, settings=settings)

    def snapshot(self) -> list[PoolSnapshot]:
        return [
            PoolSnapshot(
                spec=pool.spec,
                instances=tuple((inst.id, inst.port) for inst in pool.serving),
                may_serve_soon=pool._may_serve_soon(),
                error=pool.error,
                build_error=pool.build_error,
                start_error=pool.start_error,
                config_error_text=pool.config_error_text,
            )
            for _, pool in self.state.routes.items()
        ]

    def pool_changed(self, pool, event) -> None:
        """A Supervisor listener: whatever changed, the processes get a new table."""
        self.publish()

    def publish(self) -> None:
        """Something a proxy process routes by changed: publish once, at the end of this
        reactor turn (a swap changes several things at once)."""
        if self._publish_call is None and self.running:
            self._publish_call = self.reactor.callLater(0, self._publish_now)

    def _publish_now(self) -> None:
        self._publish_call = None
        self._version += 1
        pools = self.snapshot()
        for child in self.children.values():
            child.call(Publish, version=self._version, pools=pools)

    def idle(self, inst) -> defer.Deferred:
        """Fires once no proxy process has a request in flight on ``inst``. Sent after
        any pending Publish, so each process has stopped sending it new requests."""
        if self._publish_call is not None:
            self._publish_call.cancel()
            self._publish_now()
        waits = [inst.idle()] + [
            child.call(Idle, instances=[inst.id]) for child in self.children.values()
        ]
        return defer.gatherResults(waits, consumeErrors=True)

    # -- what they report ------------------------------------------------------------
    def reported(self, child: ProxyChild, instances: dict, requests) -> None:
        child.requests = RequestStats()
        child.requests.add(requests)
        for instance_id, (_, inflight) in instances.items():
            if inflight:
                child.inflight[instance_id] = inflight
            else:
                child.inflight.pop(instance_id, None)
        known = self.instances()
        for instance_id, (finished, _) in instances.items():
            inst = known.get(instance_id)
            if inst is not None:
                inst.requests_elsewhere(finished, self._inflight_on(instance_id))

    def _inflight_on(self, instance_id: str) -> int:
        return sum(c.inflight.get(instance_id, 0) for c in self.children.values())

    def instances(self) -> dict:
        """Every instance of every pool, by id (one pass, not one per lookup)."""
        return {inst.id: inst for _, pool in self.state.routes.items() for inst in pool.instances}

    def request_stats(self) -> list[RequestStats]:
        return [self.retired] + [child.requests for child in self.children.values()]
