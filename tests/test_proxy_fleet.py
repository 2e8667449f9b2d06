"""server.proxy_processes > 1 without processes: the supervisor's ProxyFleet and a proxy
process's ProxyProcess talk AMP over an in-memory pipe, on a Clock."""
from __future__ import annotations

import sys

import attrs
from prometheus_client import generate_latest
from twisted.internet import defer
from twisted.trial import unittest
from twisted.web import resource, server
from twisted.web.test.requesthelper import DummyChannel

from tqserver.config.discovery import WorkerSpec
from tqserver.config.server import default_server_config
from tqserver.config.worker import WorkerConfig
from tqserver.control.metrics import Metrics, RequestStats
from tqserver.fleet.child import ProxyProcess
from tqserver.fleet.parent import ProxyFleet, RelayRequest, proxy_process_count
from tqserver.fleet.protocol import PoolSnapshot, Publish
from tqserver.logs.observer import ServerLogObserver
from tqserver.proxy.router import RoutingTable
from tqserver.supervise.instance import Instance

from .fakes import FakeProcessReactor, FakeProcessTransport


def make_instance(reactor, worker: str, n: int, port: int) -> Instance:
    return Instance(reactor, worker, f"{worker}#{n}", port, [sys.executable], {}, "/",
                    output=lambda data: None)


@attrs.define(eq=False)
class FakePool:
    spec: WorkerSpec
    serving: tuple = ()
    instances: set = attrs.field(factory=set)
    error: object = None
    build_error: object = None
    start_error: object = None
    config_error_text: object = None
    soon: bool = False

    @property
    def name(self):
        return self.spec.name

    def _may_serve_soon(self):
        return self.soon


class FakeSupervisor:
    def __init__(self, reactor) -> None:
        self.root = "/srv/site"
        self.mode = "prod"
        self.config = default_server_config()
        self.pools = {}
        self.routes = RoutingTable()

    def add_pool(self, name: str, route: str) -> FakePool:
        spec = WorkerSpec(name=name, directory=f"/srv/site/workers/{name}", route=route,
                          type="python", config=WorkerConfig(), config_file=None)
        pool = self.pools[name] = FakePool(spec)
        self.routes = RoutingTable((p.spec.route, p) for p in self.pools.values())
        return pool


class FakePort:
    class _Host:
        port = 45678

    def getHost(self):
        return self._Host()

    def stopListening(self):
        return None


class ChildStdout:
    """The proxy process's stdout, read by the supervisor's ProxyChild (a pipe: what is
    written arrives on a later reactor turn)."""

    def __init__(self, reactor, parent) -> None:
        self.reactor = reactor
        self.parent = parent

    def write(self, data: bytes) -> None:
        self.reactor.callLater(0, self.parent.childDataReceived, 1, data)

    def writeSequence(self, data) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        pass

    def getPeer(self):
        return None

    getHost = getPeer


class Harness:
    """A ProxyFleet with `count` proxy processes, each a real ProxyProcess object."""

    def __init__(self, count: int = 2) -> None:
        self.reactor = FakeProcessReactor()
        self.supervisor = FakeSupervisor(self.reactor)
        self.app = self.supervisor.add_pool("app", "/app")
        self.fleet = ProxyFleet(self.reactor, self.supervisor, self.supervisor.root, [], count,
                                quiet=True)
        self.supervisor.metrics = Metrics(elsewhere=self.fleet.request_stats)
        self.fleet.running = True
        self.children = []

        def spawn(proto, executable, args=(), env=None, path=None, **kw):
            child = ProxyProcess(self.reactor, [], ServerLogObserver(quiet=True,
                                                                     file_template=None))
            self.children.append(child)
            transport = FakeProcessTransport(self.reactor, proto, list(args), env or {}, path)
            transport.stdin = lambda data: self.reactor.callLater(0, child.dataReceived, data)
            child.makeConnection(ChildStdout(self.reactor, proto))
            self.reactor.spawned.append(transport)
            proto.makeConnection(transport)
            return transport
        self.reactor.spawnProcess = spawn
        self.fleet._relay_listening(FakePort())
        self.reactor.advance(0)

    def serve(self, pool: FakePool, *instances: Instance) -> None:
        pool.serving = tuple(instances)
        pool.instances.update(instances)
        self.fleet.publish()
        self.reactor.advance(0)


class FleetTests(unittest.TestCase):
    def test_spawns_proxy_processes_with_the_listening_sockets(self) -> None:
        h = Harness(2)
        self.assertEqual(len(h.reactor.spawned), 2)
        argv = h.reactor.spawned[0].argv
        self.assertEqual(argv[1:5], ["-m", "tqserver.fleet.child", "--index", "1"])
        self.assertEqual(h.reactor.spawned[1].env["TQSERVER_PROXY_PROCESS"], "2")
        for child in h.children:
            self.assertEqual(child.relay_port, 45678)
            self.assertEqual(child.relay_secret, h.fleet.relay_secret)

    def test_published_routes_reach_every_process(self) -> None:
        h = Harness(2)
        inst = make_instance(h.reactor, "app", 1, 9001)
        h.serve(h.app, inst)
        for child in h.children:
            route, pool = child.shared.routes.match(b"/app/x")
            self.assertEqual(route, "/app")
            self.assertEqual([(i.id, i.port) for i in pool.serving], [("app#1", 9001)])

    def test_publishes_coalesce_within_a_reactor_turn(self) -> None:
        h = Harness(1)
        sent = []
        h.fleet.children[1].call = lambda command, **kw: sent.append(command) or defer.succeed({})
        for _ in range(5):
            h.fleet.publish()
        h.reactor.advance(0)
        self.assertEqual(sent, [Publish])

    def test_a_held_request_gets_the_instance_once_published(self) -> None:
        h = Harness(1)
        h.app.soon = True
        h.serve(h.app)
        [child] = h.children
        _, pool = child.shared.routes.match(b"/app")
        got = []
        pool.wait_serving(5.0).addCallback(got.append)
        self.assertEqual(got, [])
        h.serve(h.app, make_instance(h.reactor, "app", 1, 9001))
        self.assertEqual([i.id for i in got], ["app#1"])

    def test_waiters_get_none_when_nothing_will_serve(self) -> None:
        h = Harness(1)
        h.app.soon = True
        h.serve(h.app)
        _, pool = h.children[0].shared.routes.match(b"/app")
        got = []
        pool.wait_serving(5.0).addCallback(got.append)
        h.app.soon = False
        h.app.error = "build failed"
        h.serve(h.app)
        self.assertEqual(got, [None])
        self.assertEqual(pool.error, "build failed")

    def test_idle_waits_for_requests_in_flight_in_every_process(self) -> None:
        h = Harness(2)
        old = make_instance(h.reactor, "app", 1, 9001)
        h.serve(h.app, old)
        mirrors = [c.instances["app#1"] for c in h.children]
        mirrors[0].request_started()
        mirrors[1].request_started()
        h.serve(h.app, make_instance(h.reactor, "app", 2, 9002))   # the swap
        idle = h.fleet.idle(old)
        self.assertNoResult(idle)
        mirrors[0].request_finished()
        self.assertNoResult(idle)
        mirrors[1].request_finished()
        h.reactor.advance(0)
        self.successResultOf(idle)
        for child in h.children:            # forgotten once idle
            self.assertNotIn("app#1", child.retired)

    def test_idle_sends_a_pending_publish_first(self) -> None:
        h = Harness(1)
        old = make_instance(h.reactor, "app", 1, 9001)
        h.serve(h.app, old)
        [child] = h.children
        child.instances["app#1"].request_started()
        h.app.serving = (make_instance(h.reactor, "app", 2, 9002),)
        h.fleet.publish()                   # not yet sent...
        idle = h.fleet.idle(old)            # ...but before this
        h.reactor.advance(0)
        _, pool = child.shared.routes.match(b"/app")
        self.assertEqual([i.id for i in pool.serving], ["app#2"])
        self.assertNoResult(idle)
        child.retired["app#1"].request_finished()
        h.reactor.advance(0)
        self.successResultOf(idle)

    def test_reports_count_requests_and_load_on_the_instances(self) -> None:
        h = Harness(2)
        inst = make_instance(h.reactor, "app", 1, 9001)
        recycled = []
        inst.recycle_after = 3
        inst.on_request_limit = recycled.append
        h.serve(h.app, inst)
        a, b = (c.instances["app#1"] for c in h.children)
        a.request_started()
        a.request_finished()
        a.request_started()
        b.request_started()
        b.request_finished()
        b.request_started()
        for child in h.children:
            child.stats.observe_request("app", 200, 0.002)
        h.reactor.advance(1.0)
        self.assertEqual(inst.requests, 2)
        self.assertEqual(inst.inflight_elsewhere, 2)
        self.assertEqual(recycled, [])
        a.request_finished()
        h.reactor.advance(1.0)
        self.assertEqual(inst.requests, 3)
        self.assertEqual(inst.inflight_elsewhere, 1)
        self.assertEqual(recycled, [inst])
        text = generate_latest(h.supervisor.metrics.registry)
        self.assertIn(b'tqserver_requests_total{code="200",worker="app"} 2.0', text)

    def test_an_exited_process_keeps_its_counts_and_is_replaced(self) -> None:
        h = Harness(2)
        inst = make_instance(h.reactor, "app", 1, 9001)
        h.serve(h.app, inst)
        mirror = h.children[0].instances["app#1"]
        mirror.request_started()
        h.children[0].stats.observe_request("app", 200, 0.002)
        h.reactor.advance(1.0)
        self.assertEqual(inst.inflight_elsewhere, 1)
        h.reactor.spawned[0].exit(signal=9)
        self.assertEqual(inst.inflight_elsewhere, 0)
        text = generate_latest(h.supervisor.metrics.registry)
        self.assertIn(b'tqserver_requests_total{code="200",worker="app"} 1.0', text)
        self.assertEqual(len(h.reactor.spawned), 2)
        h.reactor.advance(0.5)
        self.assertEqual(len(h.reactor.spawned), 3)
        self.assertEqual(h.reactor.spawned[2].argv[4], "1")
        h.reactor.advance(0)
        # and the new one is told the routes at once
        route, pool = h.children[2].shared.routes.match(b"/app")
        self.assertEqual([i.id for i in pool.serving], ["app#1"])

    def test_crash_loop_backs_off(self) -> None:
        h = Harness(1)
        delays = []
        for _ in range(4):
            before = len(h.reactor.spawned)
            h.reactor.spawned[-1].exit(code=1)
            waited = 0.0
            while len(h.reactor.spawned) == before:
                h.reactor.advance(0.25)
                waited += 0.25
            delays.append(waited)
        self.assertEqual(delays, [0.5, 1.0, 2.0, 4.0])

    def test_stop_terms_then_kills(self) -> None:
        h = Harness(2)
        d = h.fleet.stopService()
        self.assertEqual(sorted(sig for _, sig in h.reactor.signals), ["TERM", "TERM"])
        h.reactor.spawned[0].exit(0)
        h.reactor.advance(h.supervisor.config.workers.kill_timeout_ms / 1000.0)
        self.assertIn((h.reactor.spawned[1].pid, 9), h.reactor.signals)
        self.assertNoResult(d)
        h.reactor.spawned[1].exit(signal=9)
        self.successResultOf(d)
        h.reactor.advance(60)
        self.assertEqual(len(h.reactor.spawned), 2)     # stopped ones are not restarted


class ProxyProcessTests(unittest.TestCase):
    def test_removed_worker_leaves_the_table(self) -> None:
        h = Harness(1)
        h.serve(h.app, make_instance(h.reactor, "app", 1, 9001))
        del h.supervisor.pools["app"]
        h.supervisor.routes = RoutingTable()
        h.fleet.publish()
        h.reactor.advance(0)
        self.assertIsNone(h.children[0].shared.routes.match(b"/app"))

    def test_pooled_connections_to_a_retired_instance_are_closed_once_idle(self) -> None:
        h = Harness(1)
        [child] = h.children
        closed = []
        child.front.upstreams.close_port = closed.append
        h.serve(h.app, make_instance(h.reactor, "app", 1, 9001))
        child.instances["app#1"].request_started()
        h.serve(h.app, make_instance(h.reactor, "app", 2, 9002))
        self.assertEqual(closed, [])
        child.retired["app#1"].request_finished()
        self.assertEqual(closed, [9001])

    def test_big_tables_cross_amp_in_pieces(self) -> None:
        h = Harness(1)
        for n in range(300):
            pool = h.supervisor.add_pool(f"w{n}", f"/w{n}")
            pool.serving = (make_instance(h.reactor, f"w{n}", 1, 10000 + n),)
            pool.build_error = "x" * 1000
        h.fleet.publish()
        h.reactor.advance(0)
        _, pool = h.children[0].shared.routes.match(b"/w299/a")
        self.assertEqual(pool.serving[0].port, 10299)
        self.assertEqual(len(pool.build_error), 1000)

    def test_snapshot_shape(self) -> None:
        h = Harness(1)
        h.app.serving = (make_instance(h.reactor, "app", 1, 9001),)
        h.app.build_error = "boom"
        [snap] = h.fleet.snapshot()
        self.assertEqual(snap, PoolSnapshot(h.app.spec, (("app#1", 9001),), False, None, "boom"))


class RelayRequestTests(unittest.TestCase):
    def request(self, headers):
        channel = DummyChannel()
        channel.site = server.Site(resource.Resource())
        channel.site.relay_secret = b"s3cret"
        request = RelayRequest(channel)
        for name, value in headers.items():
            request.requestHeaders.setRawHeaders(name, [value])
        return request

    def test_relayed_client_is_the_last_forwarded_hop(self) -> None:
        request = self.request({b"x-tqserver-relay": b"s3cret",
                                b"x-forwarded-for": b"10.0.0.1, 203.0.113.9"})
        self.assertEqual(request.client_ip, "203.0.113.9")

    def test_without_the_secret_the_peer_counts(self) -> None:
        request = self.request({b"x-tqserver-relay": b"guess",
                                b"x-forwarded-for": b"203.0.113.9"})
        self.assertEqual(request.client_ip, "192.168.1.1")   # DummyChannel's peer


class CountTests(unittest.TestCase):
    def test_auto_is_the_usable_cores(self) -> None:
        import psutil
        self.assertEqual(proxy_process_count("auto"), len(psutil.Process().cpu_affinity()))
        self.assertEqual(proxy_process_count(3), 3)


class RequestStatsTests(unittest.TestCase):
    def test_sum_of_sources_in_prometheus_form(self) -> None:
        metrics = Metrics()
        other = RequestStats()
        metrics.elsewhere = lambda: [other]
        metrics.observe_request("app", 200, 0.0004)
        other.observe_request("app", 200, 0.003)
        other.observe_request("app", 502, 45.0)
        text = generate_latest(metrics.registry).decode()
        self.assertIn('tqserver_requests_total{code="200",worker="app"} 2.0', text)
        self.assertIn('tqserver_requests_total{code="502",worker="app"} 1.0', text)
        self.assertIn('tqserver_request_duration_seconds_bucket{le="0.0005",worker="app"} 1.0',
                      text)
        self.assertIn('tqserver_request_duration_seconds_bucket{le="0.005",worker="app"} 2.0',
                      text)
        self.assertIn('tqserver_request_duration_seconds_bucket{le="30.0",worker="app"} 2.0',
                      text)
        self.assertIn('tqserver_request_duration_seconds_bucket{le="+Inf",worker="app"} 3.0',
                      text)
        self.assertIn('tqserver_request_duration_seconds_count{worker="app"} 3.0', text)
        self.assertIn('tqserver_request_duration_seconds_sum{worker="app"} 45.0034', text)


class SharedSocketTests(unittest.TestCase):
    def test_adopting_the_listening_socket_keeps_it_non_blocking(self) -> None:
        """The descriptor is shared with the other proxy processes: it must stay
        non-blocking for them (PyPy's socket objects would clear O_NONBLOCK)."""
        import fcntl
        import os
        import socket

        from twisted.internet import protocol, reactor
        listener = socket.socket()
        self.addCleanup(listener.close)
        listener.bind(("127.0.0.1", 0))
        listener.listen(5)
        listener.setblocking(False)
        child = ProxyProcess(reactor, [os.dup(listener.fileno())],
                             ServerLogObserver(quiet=True, file_template=None))
        child.site = protocol.Factory()
        child._listen()
        child.reporter.stop()
        for port in child.ports:
            self.addCleanup(port.stopListening)
        flags = fcntl.fcntl(listener.fileno(), fcntl.F_GETFL)
        self.assertTrue(flags & os.O_NONBLOCK)
