"""The aggregated /health answer and the treq prober against real loopback servers."""
from __future__ import annotations

from twisted.internet import defer, reactor
from twisted.trial import unittest
from twisted.web import resource, server

from tqserver.health import Prober, aggregate


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


class Status(resource.Resource):
    isLeaf = True

    def __init__(self, code: int, hang: bool = False) -> None:
        super().__init__()
        self.code = code
        self.hang = hang
        self.pending = []

    def render_GET(self, request):
        if self.hang:
            self.pending.append(request)
            return server.NOT_DONE_YET
        request.setResponseCode(self.code)
        return b"ok"


class Target:
    def __init__(self, port: int) -> None:
        self.port = port


class ProberTests(unittest.TestCase):
    def setUp(self) -> None:
        self.prober = Prober(reactor)
        self.addCleanup(self.prober.close)

    def listen(self, res) -> int:
        port = reactor.listenTCP(0, server.Site(res), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port

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
