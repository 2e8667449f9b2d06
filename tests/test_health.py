"""/health, /health/<worker>, /health/live and /health/ready (with health.degraded_status),
pool readiness, the HealthChecker's rounds (task.Clock), and the HTTP
prober against real loopback servers."""
from __future__ import annotations

import os
import textwrap
from types import SimpleNamespace

import attrs
from twisted.internet import defer, protocol, reactor, task
from twisted.trial import unittest
from twisted.web import resource, server

from tqserver.config.errors import ConfigError
from tqserver.config.server import default_server_config, load_server_config
from tqserver.control.health import aggregate
from tqserver.control.reserved import Reserved, ReservedPaths
from tqserver.supervise import health as health_checker
from tqserver.supervise import probe as health_probe
from tqserver.supervise.health import HealthChecker
from tqserver.supervise.probe import Prober

from .test_pool import PoolTestBase


class FakePool:
    def __init__(self, name: str, status: str) -> None:
        self.name = name
        self._status = status

    def describe(self) -> dict:
        return {"status": self._status}


class AggregateTests(unittest.TestCase):
    def test_all_healthy(self) -> None:
        code, body = aggregate([FakePool("a", "healthy"), FakePool("b", "healthy")])
        self.assertEqual((code, body["status"]), (200, "healthy"))
        self.assertEqual(set(body["workers"]), {"a", "b"})

    def test_some_not_healthy_is_degraded(self) -> None:
        code, body = aggregate([FakePool("a", "healthy"), FakePool("b", "failed")])
        self.assertEqual((code, body["status"]), (200, "degraded"))
        code, body = aggregate([FakePool("a", "starting")])
        self.assertEqual((code, body["status"]), (200, "degraded"))

    def test_nothing_serving_is_unhealthy(self) -> None:
        code, body = aggregate([FakePool("a", "failed"), FakePool("b", "stopped")])
        self.assertEqual((code, body["status"]), (503, "unhealthy"))
        self.assertEqual(aggregate([])[0], 503)

    def test_degraded_status_is_configurable(self) -> None:
        pools = [FakePool("a", "healthy"), FakePool("b", "failed")]
        code, body = aggregate(pools, degraded_status=503)
        self.assertEqual((code, body["status"]), (503, "degraded"))
        self.assertEqual(aggregate([FakePool("a", "healthy")], degraded_status=503)[0], 200)

    def test_a_failed_file_watcher_degrades_and_is_shown(self) -> None:
        watcher = SimpleNamespace(describe=lambda: {"status": "failed", "error": "overflow"})
        code, body = aggregate([FakePool("a", "healthy")], watcher)
        self.assertEqual((code, body["status"]), (200, "degraded"))
        self.assertEqual(body["watcher"]["error"], "overflow")
        watcher.describe = lambda: {"status": "watching", "error": None}
        self.assertEqual(aggregate([FakePool("a", "healthy")], watcher)[1]["status"], "healthy")


class Status(resource.Resource):
    isLeaf = True

    def __init__(self, code: int, hang: bool = False) -> None:
        super().__init__()
        self.code = code
        self.hang = hang
        self.chunked = False      # no Content-Length: HTTP/1.1 chunked
        self.close = False        # Connection: close
        self.pending = []
        self.channels = []        # the server side of every request, in order

    def render_GET(self, request):
        self.channels.append(request.channel)
        if self.hang:
            self.pending.append(request)
            return server.NOT_DONE_YET
        request.setResponseCode(self.code)
        if self.close:
            request.setHeader(b"connection", b"close")
        if self.chunked:
            request.write(b"o")
            request.write(b"k")
            request.finish()
            return server.NOT_DONE_YET
        return b"ok"

    @property
    def connections(self) -> int:
        return len(set(map(id, self.channels)))


class Target:
    def __init__(self, port: int) -> None:
        self.port = port


class Canned(protocol.Protocol):
    """Answers every request head with the factory's bytes, as they are."""

    def connectionMade(self) -> None:
        self.factory.connections += 1
        self.buffer = b""

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            _, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
            self.transport.write(self.factory.answer)


class CannedFactory(protocol.Factory):
    protocol = Canned
    noisy = False

    def __init__(self, answer: bytes) -> None:
        self.answer = answer
        self.connections = 0


class ProberTests(unittest.TestCase):
    def setUp(self) -> None:
        self.prober = Prober(reactor)
        self.addCleanup(self.prober.close)

    def listen(self, res) -> int:
        port = reactor.listenTCP(0, server.Site(res), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port

    @defer.inlineCallbacks
    def probe_times(self, port: int, n: int):
        results = []
        for _ in range(n):
            results.append((yield self.prober(Target(port), "/health", 2.0)))
        return results

    @defer.inlineCallbacks
    def test_200_is_healthy(self):
        port = self.listen(Status(200))
        self.assertTrue((yield self.prober(Target(port), "/health", 2.0)))

    @defer.inlineCallbacks
    def test_500_is_unhealthy(self):
        port = self.listen(Status(500))
        self.assertFalse((yield self.prober(Target(port), "/health", 2.0)))

    @defer.inlineCallbacks
    def test_refused_is_unhealthy(self):
        # a port nobody listens on: one we just closed
        listening = reactor.listenTCP(0, server.Site(Status(200)), interface="127.0.0.1")
        dead = listening.getHost().port
        yield listening.stopListening()
        self.assertFalse((yield self.prober(Target(dead), "/health", 2.0)))

    @defer.inlineCallbacks
    def test_timeout_is_unhealthy(self):
        res = Status(200, hang=True)
        port = self.listen(res)
        self.assertFalse((yield self.prober(Target(port), "/health", 0.2)))
        for request in res.pending:
            if not request._disconnected:
                request.finish()

    @defer.inlineCallbacks
    def test_connection_kept_between_probes(self):
        res = Status(200)
        port = self.listen(res)
        self.assertEqual((yield self.probe_times(port, 3)), [True] * 3)
        self.assertEqual(res.connections, 1)

    @defer.inlineCallbacks
    def test_fresh_connection_every_reuse_probes(self):
        # so that an instance that can no longer accept() fails its probes
        res = Status(200)
        port = self.listen(res)
        n = health_probe.REUSE + 1
        self.assertEqual((yield self.probe_times(port, n)), [True] * n)
        self.assertEqual(res.connections, 2)

    @defer.inlineCallbacks
    def test_kept_connection_closed_by_the_instance(self):
        res = Status(200)
        port = self.listen(res)
        self.assertTrue((yield self.prober(Target(port), "/health", 2.0)))
        res.channels[-1].transport.loseConnection()     # an idle timeout, say
        self.assertTrue((yield self.prober(Target(port), "/health", 2.0)))
        self.assertEqual(res.connections, 2)

    @defer.inlineCallbacks
    def test_connection_close_is_honoured(self):
        res = Status(200)
        res.close = True
        port = self.listen(res)
        self.assertEqual((yield self.probe_times(port, 2)), [True, True])
        self.assertEqual(res.connections, 2)

    @defer.inlineCallbacks
    def test_chunked_answer(self):
        res = Status(200)
        res.chunked = True
        port = self.listen(res)
        self.assertEqual((yield self.probe_times(port, 2)), [True, True])
        self.assertEqual(res.connections, 1)

    @defer.inlineCallbacks
    def test_unhealthy_answer_drops_the_connection(self):
        res = Status(500)
        port = self.listen(res)
        self.assertEqual((yield self.probe_times(port, 2)), [False, False])
        self.assertEqual(res.connections, 2)

    @defer.inlineCallbacks
    def test_timeout_on_a_kept_connection(self):
        res = Status(200)
        port = self.listen(res)
        self.assertTrue((yield self.prober(Target(port), "/health", 2.0)))
        res.hang = True
        self.assertFalse((yield self.prober(Target(port), "/health", 0.2)))
        res.hang = False
        self.assertTrue((yield self.prober(Target(port), "/health", 2.0)))
        self.assertEqual(res.connections, 2)
        for request in res.pending:
            if not request._disconnected:
                request.finish()


class ProbeHeadTests(unittest.TestCase):
    """The prober reads a response head as the proxy's upstream client does."""

    setUp = ProberTests.setUp
    probe_times = ProberTests.probe_times

    def canned(self, answer: bytes):
        factory = CannedFactory(answer)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return factory, port.getHost().port

    @defer.inlineCallbacks
    def test_a_head_the_proxy_refuses_is_unhealthy(self):
        _, port = self.canned(b"HTTP/1.1 200 OK\r\nno colon\r\nContent-Length: 2\r\n\r\nok")
        self.assertFalse((yield self.prober(Target(port), "/health", 2.0)))

    @defer.inlineCallbacks
    def test_an_interim_response_is_skipped(self):
        _, port = self.canned(b"HTTP/1.1 100 Continue\r\n\r\n"
                              b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.assertTrue((yield self.prober(Target(port), "/health", 2.0)))

    @defer.inlineCallbacks
    def test_http_1_0_keep_alive_is_kept(self):
        factory, port = self.canned(b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\n"
                                    b"Content-Length: 2\r\n\r\nok")
        self.assertEqual((yield self.probe_times(port, 2)), [True, True])
        self.assertEqual(factory.connections, 1)


class CheckedPool:
    """What the HealthChecker uses of a WorkerPool."""

    def __init__(self, n: int) -> None:
        self.spec = SimpleNamespace(config=SimpleNamespace(health_path="/health"))
        self.serving = tuple(SimpleNamespace(id=f"i{k}", port=k, health_failures=0)
                             for k in range(n))
        self.replaced = []

    def maybe_scale_down(self) -> None:
        pass

    def check_memory(self, inst) -> None:
        pass

    def replace(self, inst, reason: str) -> None:
        self.replaced.append(inst)


class HealthCheckerTests(unittest.TestCase):
    def setUp(self) -> None:
        self.patch(health_checker, "BATCH", 2)
        self.clock = task.Clock()
        self.probed = []      # (time, port)
        self.answers = {}     # port -> bool (default healthy)
        self.pool = CheckedPool(8)
        settings = SimpleNamespace(health_check_interval_ms=1000, health_check_timeout_ms=500,
                                   health_check_failures=2)
        self.checker = HealthChecker(self.clock, lambda: [self.pool], self.probe,
                                     lambda: settings)
        self.checker.startService()
        self.addCleanup(lambda: self.checker.running and self.checker.stopService())

    def probe(self, inst, path: str, timeout: float) -> defer.Deferred:
        self.probed.append((self.clock.seconds(), inst.port))
        return defer.succeed(self.answers.get(inst.port, True))

    def test_batches_spread_over_half_the_interval(self) -> None:
        self.clock.advance(1)
        self.assertEqual(self.probed, [(1.0, 0), (1.0, 1)])
        self.clock.pump([0.125] * 3)
        self.assertEqual(self.probed[2:], [(1.125, 2), (1.125, 3), (1.25, 4), (1.25, 5),
                                           (1.375, 6), (1.375, 7)])
        self.assertEqual(self.checker.checks, {"ok": 8, "fail": 0})
        self.clock.advance(0.625)      # the next round
        self.assertEqual(self.probed[-2:], [(2.0, 0), (2.0, 1)])

    def test_one_batch_at_once(self) -> None:
        self.pool.serving = self.pool.serving[:2]
        self.clock.advance(1)
        self.assertEqual(self.probed, [(1.0, 0), (1.0, 1)])
        self.assertEqual(self.clock.getDelayedCalls()[0].getTime(), 2.0)   # the next round only

    def test_failures_counted_per_round(self) -> None:
        self.answers[3] = False
        self.clock.pump([1, 0.125, 0.125, 0.125, 0.625, 0.125, 0.125, 0.125])
        self.assertEqual(self.pool.replaced, [self.pool.serving[3]])
        self.assertEqual(self.checker.checks, {"ok": 14, "fail": 2})

    def test_instance_out_of_rotation_before_its_turn_is_not_probed(self) -> None:
        self.clock.advance(1)
        self.pool.serving = self.pool.serving[:3]
        self.clock.pump([0.125] * 3)
        self.assertEqual([port for _, port in self.probed], [0, 1, 2])

    def test_stop_cancels_the_probes_not_started(self) -> None:
        self.clock.advance(1)
        self.checker.stopService()
        self.clock.pump([0.125] * 4)
        self.assertEqual(len(self.probed), 2)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class HealthConfigTests(unittest.TestCase):
    def load(self, text: str):
        directory = self.mktemp()
        os.makedirs(directory)
        path = os.path.join(directory, "server.yaml")
        with open(path, "w") as f:
            f.write(textwrap.dedent(text))
        return path, load_server_config(path)[0]

    def test_default_is_200(self) -> None:
        self.assertEqual(default_server_config().health.degraded_status, 200)

    def test_503(self) -> None:
        _, config = self.load("health:\n  degraded_status: 503\n")
        self.assertEqual(config.health.degraded_status, 503)

    def test_anything_else_is_an_error_with_its_place(self) -> None:
        for value in ("404", '"503"', "degraded"):
            directory = self.mktemp()
            os.makedirs(directory)
            path = os.path.join(directory, "server.yaml")
            with open(path, "w") as f:
                f.write(f"health:\n  degraded_status: {value}\n")
            err = self.assertRaises(ConfigError, load_server_config, path)
            self.assertTrue(str(err).startswith(f"{path}:2:20: health.degraded_status: "),
                            str(err))
            self.assertIn("200 or 503", str(err))


class Request:
    """What Reserved.health uses of a ProxyRequest."""

    def __init__(self, path: bytes, method: bytes = b"GET") -> None:
        from twisted.web.http_headers import Headers
        self.path = path
        self.method = method
        self.responseHeaders = Headers()
        self.code = None
        self.body = b""
        self.finished = False

    def setResponseCode(self, code: int) -> None:
        self.code = code

    def write(self, data: bytes) -> None:
        self.body += data

    def finish_when_read(self) -> None:
        self.finished = True

    def json(self):
        import json
        return json.loads(self.body)


class ServingPool:
    """What /health/... use of a WorkerPool."""

    def __init__(self, name: str, status: str = "healthy", serving: int = 1,
                 ready: bool = True, failures: int = 0) -> None:
        self.name = name
        self.status = status
        self.serving = tuple(SimpleNamespace(health_failures=failures) for _ in range(serving))
        self.ready = ready

    def describe(self) -> dict:
        return {"status": self.status, "instances": len(self.serving), "ready": self.ready}


class FakeSupervisor:
    """What Reserved uses of the Supervisor for /health."""

    def __init__(self, config) -> None:
        self.state = SimpleNamespace(config=config, mode="dev")  # prod: tests/test_admin.py
        self.pools: dict = {}
        self.revision = "r1"
        self.running = True
        self.draining = False

    @property
    def config(self):
        return self.state.config


class ReservedHealthTests(unittest.TestCase):
    def setUp(self) -> None:
        self.config = default_server_config()
        self.supervisor = FakeSupervisor(self.config)
        self.reserved = Reserved(self.supervisor, None, None, None)

    def pools(self, *pools) -> None:
        self.supervisor.pools = {p.name: p for p in pools}

    def get(self, path: bytes, method: bytes = b"GET") -> Request:
        handler = self.reserved.match(path)
        self.assertIsNotNone(handler, path)
        request = Request(path, method)
        handler(request)
        self.assertTrue(request.finished)
        return request

    def test_match_takes_the_subpaths_and_nothing_beside(self) -> None:
        proxy_side = ReservedPaths(SimpleNamespace(config=self.config))
        for path in (b"/health", b"/health/", b"/health/live", b"/health/ready",
                     b"/health/app", b"/health/worker/live"):
            self.assertIsNotNone(proxy_side.match(path), path)
        for path in (b"/healthz", b"/health-x", b"/"):
            self.assertIsNone(proxy_side.match(path), path)
        moved = attrs.evolve(self.config, health=attrs.evolve(self.config.health, path="/hc"))
        proxy_side.source = SimpleNamespace(config=moved)
        self.assertIsNotNone(proxy_side.match(b"/hc/ready"))
        self.assertIsNone(proxy_side.match(b"/health/ready"))

    def test_overall_status_follows_degraded_status(self) -> None:
        self.pools(ServingPool("good"), ServingPool("broken", "failed", serving=0, ready=False))
        request = self.get(b"/health")
        self.assertEqual((request.code, request.json()["status"]), (200, "degraded"))
        self.config = attrs.evolve(
            self.config, health=attrs.evolve(self.config.health, degraded_status=503))
        self.supervisor.state.config = self.config
        request = self.get(b"/health")
        self.assertEqual((request.code, request.json()["status"]), (503, "degraded"))
        self.assertEqual(request.json()["revision"], "r1")
        self.assertEqual(self.get(b"/health/").code, 503)

    def test_per_worker(self) -> None:
        self.pools(ServingPool("good"), ServingPool("broken", "failed", serving=0, ready=False),
                   ServingPool("sick", "degraded", failures=2))
        request = self.get(b"/health/good")
        self.assertEqual(request.code, 200)
        self.assertEqual(request.json()["worker"], "good")
        self.assertEqual(request.json()["status"], "healthy")
        self.assertEqual(self.get(b"/health/good/").code, 200)
        self.assertEqual(self.get(b"/health/broken").code, 503)
        self.assertEqual(self.get(b"/health/sick").code, 503)   # its only instance fails probes
        request = self.get(b"/health/nope")
        self.assertEqual(request.code, 404)
        self.assertIn("nope", request.json()["error"])
        self.assertEqual(self.get(b"/health/worker/good").code, 200)
        self.assertEqual(self.get(b"/health/worker/nope").code, 404)
        head = self.get(b"/health/good", b"HEAD")
        self.assertEqual((head.code, head.body), (200, b""))

    def test_one_healthy_instance_of_several_is_enough(self) -> None:
        pool = ServingPool("app", "degraded", serving=2)
        pool.serving = (SimpleNamespace(health_failures=1), SimpleNamespace(health_failures=0))
        self.pools(pool)
        self.assertEqual(self.get(b"/health/app").code, 200)

    def test_workers_named_live_or_ready_are_under_worker(self) -> None:
        self.pools(ServingPool("live", "failed", serving=0, ready=False), ServingPool("ready"))
        self.assertEqual(self.get(b"/health/live").code, 200)       # the probe, not the worker
        self.assertEqual(self.get(b"/health/ready").code, 503)      # so is this
        self.assertEqual(self.get(b"/health/worker/live").code, 503)
        self.assertEqual(self.get(b"/health/worker/ready").code, 200)

    def test_live_while_the_supervisor_answers_even_draining(self) -> None:
        request = self.get(b"/health/live")
        self.assertEqual(request.code, 200)
        self.assertEqual(request.json()["status"], "live")
        self.supervisor.running = False
        self.assertEqual(self.get(b"/health/live").code, 200)

    def test_ready_once_every_worker_passed_its_first_probe(self) -> None:
        self.assertEqual(self.get(b"/health/ready").code, 503)     # no worker yet
        a, b = ServingPool("a", ready=False, serving=0), ServingPool("b", ready=False, serving=0)
        self.pools(a, b)
        request = self.get(b"/health/ready")
        self.assertEqual(request.code, 503)
        self.assertEqual(request.json()["waiting_for"], ["a", "b"])
        a.ready = True
        self.assertEqual(self.get(b"/health/ready").json()["waiting_for"], ["b"])
        b.ready = True
        request = self.get(b"/health/ready")
        self.assertEqual((request.code, request.json()["status"]), (200, "ready"))
        b.status, b.serving = "failed", ()        # later trouble: /health and /health/b say it
        self.assertEqual(self.get(b"/health/ready").code, 200)
        self.pools(a, b, ServingPool("new", ready=False, serving=0))   # a worker added
        self.assertEqual(self.get(b"/health/ready").json()["waiting_for"], ["new"])

    def test_not_ready_while_draining(self) -> None:
        self.pools(ServingPool("a"))
        self.assertEqual(self.get(b"/health/ready").code, 200)
        self.supervisor.running = False           # stopService started
        request = self.get(b"/health/ready")
        self.assertEqual((request.code, request.json()["status"]), (503, "draining"))


class PoolReadinessTests(PoolTestBase):
    """pool.ready: an instance of it passed its first healthy probe since the pool started."""

    def test_ready_after_the_first_healthy_probe_and_kept(self) -> None:
        self.probe.default = False
        self.pool.startService()
        self.reactor.advance(0.1)
        self.assertFalse(self.pool.ready)
        self.assertFalse(self.pool.describe()["ready"])
        self.probe.default = True
        self.reactor.advance(0.025)
        self.assertTrue(self.pool.ready)
        self.assertTrue(self.pool.describe()["ready"])
        inst = self.pool.serving[0]
        self.reactor.by_pid(inst.pid).exit(2)       # a crash: /health/<worker> says 503
        self.assertEqual(self.pool.serving, ())
        self.assertTrue(self.pool.ready)

    def test_not_ready_when_the_first_start_fails(self) -> None:
        self.probe.default = False
        self.pool.startService()
        self.reactor.spawned[0].exit(3)
        self.reactor.advance(0.1)
        self.assertFalse(self.pool.ready)
