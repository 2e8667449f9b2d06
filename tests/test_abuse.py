"""What holds today against abusive clients, kept so: path traversal through the proxy,
slowloris, idle connections by the hundred, and big streams in bounded memory. Real
ProxySite on loopback in front of real (in-process) upstream servers."""
from __future__ import annotations

import os
import tempfile

import psutil
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

from .test_proxy import (
    FakeInstance,
    FakePool,
    ProxyTestCase,
    RawClient,
    parse_response,
    wait_until,
)

SECRET = b"S3CR3T-do-not-serve"


def traversal_targets() -> list:
    """Ways to name a file outside public/ (or one that must not be served inside it)."""
    ups = [b"..", b"%2e%2e", b"%2E%2E", b".%2e", b"%2e.", b"%252e%252e", b"..%00",
           b"%c0%ae%c0%ae", b"..;", b"...", b"..\\", b"%2e%2e%5c"]
    seps = [b"/", b"%2f", b"%2F", b"%5c", b"\\", b"//", b"%252f"]
    files = [b"config/worker.yaml", b"views/page.html", b"data/db.txt", b"outside.txt"]
    out = []
    for up in ups:
        for sep in seps[:4]:
            out.append(b"/static/" + up + sep + files[len(out) % len(files)])
    out += [
        b"/static/.env", b"/static/%2eenv", b"/static/.git/config", b"/static/sub/../.env",
        b"/static/index.php", b"/static/index.PHP", b"/static/index.php%00.txt",
        b"/static/index.php.", b"/static/index.php/", b"/static/link/worker.yaml",
        b"/static/link%2fworker.yaml", b"/static/outlink", b"/static//config/worker.yaml",
        b"/static/./../config/worker.yaml", b"/static/a/../../config/worker.yaml",
        b"/static/%2e%2e/%2e%2e/outside.txt", b"/static/..%2f..%2foutside.txt",
        b"/static/....//....//outside.txt", b"/static/%u002e%u002e/outside.txt",
        b"/static/..%c0%af../outside.txt", b"/static/..%e0%80%af../outside.txt",
    ]
    return out


class TraversalTests(ProxyTestCase):
    """No spelling of a path reaches a file outside public/ or a file it must not serve."""

    mode = "prod"

    def setUp(self) -> None:
        ProxyTestCase.setUp(self)
        base = tempfile.mkdtemp()
        worker = os.path.join(base, "w")
        for rel in ("config/worker.yaml", "views/page.html", "data/db.txt", "public/.env",
                    "public/.git/config", "public/index.php", "public/sub/.env"):
            self._write(os.path.join(worker, rel), SECRET)
        self._write(os.path.join(worker, "public/ok.txt"), b"fine")
        self._write(os.path.join(worker, "public/outside.txt"), b"a decoy inside public")
        self._write(os.path.join(base, "outside.txt"), SECRET)
        self._write(os.path.join(worker, "outside.txt"), SECRET)
        os.symlink(os.path.join(worker, "config"), os.path.join(worker, "public", "link"))
        os.symlink(os.path.join(base, "outside.txt"), os.path.join(worker, "public", "outlink"))
        up = self.upstream("w")
        self.start_proxy(FakePool("w", "/static", [FakeInstance(up.port, "w#1")],
                                  public_dir=os.path.join(worker, "public")))

    def _write(self, path: str, data: bytes) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)

    @defer.inlineCallbacks
    def test_nothing_secret_served(self):
        targets = traversal_targets()
        self.assertGreater(len(targets), 60)
        for target in targets:
            data = yield self.raw(b"GET " + target + b" HTTP/1.1\r\nHost: h\r\n"
                                  b"Connection: close\r\n\r\n")
            self.assertNotIn(SECRET, data, target)
            self.assertTrue(data.startswith(b"HTTP/1.1 "), (target, data[:80]))
        data = yield self.raw(b"GET /static/ok.txt HTTP/1.1\r\nHost: h\r\n"
                              b"Connection: close\r\n\r\n")
        self.assertEqual(parse_response(data)[2], b"fine")


class SlowClientTests(ProxyTestCase):
    """Slowloris: clients that trickle a head byte by byte are cut at read_timeout_seconds
    with a 408, and a normal client is served meanwhile."""

    @defer.inlineCallbacks
    def test_slowloris(self):
        self.server_config(read_timeout_seconds=0.5)
        up, _ = self.simple()
        head = b"GET /slow HTTP/1.1\r\nHost: h\r\nX-A: " + b"a" * 200
        slow = []
        for _ in range(40):
            slow.append((yield self.connect()))
        calls = []

        def drip(i=0):
            for client in slow:
                if not client.closed and i < len(head):
                    client.transport.write(head[i:i + 1])
            if i < len(head):
                calls.append(reactor.callLater(0.05, drip, i + 1))
        drip()
        self.addCleanup(lambda: [c.cancel() for c in calls if c.active()])
        started = reactor.seconds()
        response = yield self.get("/fast")
        self.assertEqual(response.code, 200)
        yield response.content()
        self.assertLess(reactor.seconds() - started, 0.5)
        yield wait_until(lambda: all(c.closed for c in slow), timeout=5,
                         what="every slow client to be cut")
        self.assertLess(reactor.seconds() - started, 2.5)
        for client in slow:
            self.assertEqual(parse_response(client.data)[0], 408)
        self.assertEqual([s for s in up.seen if s["path"] == b"/slow"], [])


class IdleConnectionTests(ProxyTestCase):
    """Hundreds of connections that never send anything cost nothing but their sockets:
    the proxy still answers at once, and closes each after idle_timeout_seconds. (They are
    opened in batches: past the listen backlog the kernel, not the proxy, holds them.)"""

    @defer.inlineCallbacks
    def test_many_idle_connections(self):
        self.server_config(idle_timeout_seconds=1.0)
        self.simple()
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.proxy_port)
        idle = []
        for _ in range(12):  # in batches the listen backlog (50) holds
            idle += (yield defer.gatherResults(
                [connectProtocol(endpoint, RawClient()) for _ in range(40)]))
            self.clients.extend(idle[-40:])
            opened = len(idle)
            yield wait_until(lambda n=opened: len(self.site.channels) >= n,
                             what="the proxy to accept them")
        started = reactor.seconds()
        response = yield self.get("/fast")
        self.assertEqual(response.code, 200)
        yield response.content()
        self.assertLess(reactor.seconds() - started, 0.5)
        yield wait_until(lambda: all(c.closed for c in idle), timeout=10,
                         what="the idle connections to be closed")
        self.assertTrue(all(c.data == b"" for c in idle))


class _Sink(protocol.Protocol):
    """A worker that reads a request body and throws it away, then answers its size."""

    def connectionMade(self) -> None:
        self.head = b""
        self.length = None
        self.received = 0

    def dataReceived(self, data: bytes) -> None:
        if self.length is None:
            self.head += data
            head, sep, rest = self.head.partition(b"\r\n\r\n")
            if not sep:
                return
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    self.length = int(value)
            data = rest
        self.received += len(data)
        if self.received >= self.length:
            body = b"%d" % self.received
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s"
                                 % (len(body), body))


class _Source(protocol.Protocol):
    """A worker that streams ``size`` bytes back, as fast as the proxy takes them."""

    size = 0

    def dataReceived(self, data: bytes) -> None:
        if b"\r\n\r\n" not in data:
            return
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % self.size)
        self.left = self.size
        self.transport.registerProducer(self, True)
        self.resumeProducing()

    def resumeProducing(self) -> None:
        self.paused = False
        chunk = b"x" * 65536
        while self.left and not self.paused:
            n = min(len(chunk), self.left)
            self.left -= n
            self.transport.write(chunk[:n])
        if not self.left:
            self.transport.unregisterProducer()

    def pauseProducing(self) -> None:
        self.paused = True

    def stopProducing(self) -> None:
        self.left = 0


class _SlowReader(RawClient):
    """Reads the response in bursts, pausing between them, and keeps only a count."""

    def connectionMade(self) -> None:
        self.count = 0
        self._paused = False

    def dataReceived(self, data: bytes) -> None:
        self.count += len(data)
        if not self._paused and self.count % (8 << 20) < len(data):
            self._paused = True
            self.transport.pauseProducing()
            reactor.callLater(0.05, self._resume)

    def _resume(self) -> None:
        self._paused = False
        if not self.closed:
            self.transport.resumeProducing()


class BigStreamTests(ProxyTestCase):
    """A body much larger than any buffer streams through with backpressure: the process
    (proxy, worker and client all in it) does not grow with its size."""

    SIZE = 256 << 20
    GROWTH = 64 << 20

    def setUp(self) -> None:
        ProxyTestCase.setUp(self)
        self.server_config(max_body_bytes=1 << 30)

    def listen(self, proto_class):
        factory = protocol.Factory.forProtocol(proto_class)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port

    def test_upload(self):
        return self.upload(b"close")

    def test_upload_naming_content_length_in_connection(self):
        # Connection: Content-Length dropped the length: the proxy held the whole body.
        return self.upload(b"close, Content-Length")

    @defer.inlineCallbacks
    def upload(self, connection: bytes):
        port = self.listen(_Sink)
        self.start_proxy(FakePool("w", "/", [FakeInstance(port, "w#1")]), mode="prod")
        client = yield self.connect()
        rss = psutil.Process().memory_info().rss
        client.transport.write(b"POST /up HTTP/1.1\r\nHost: h\r\nConnection: %s\r\n"
                               b"Content-Length: %d\r\n\r\n" % (connection, self.SIZE))
        block = b"u" * (1 << 20)
        sent = [0]

        class Body:
            def resumeProducing(self):
                while sent[0] < BigStreamTests.SIZE and not client.transport.disconnecting:
                    sent[0] += len(block)
                    client.transport.write(block)
                    if client.transport.producerPaused:
                        return
                client.transport.unregisterProducer()

            def pauseProducing(self):
                pass

            def stopProducing(self):
                sent[0] = BigStreamTests.SIZE

        client.transport.registerProducer(Body(), True)
        Body().resumeProducing()
        yield wait_until(lambda: client.closed, timeout=120, what="the upload's answer")
        code, _, body = parse_response(client.data)
        self.assertEqual((code, body), (200, b"%d" % self.SIZE))
        self.assertLess(psutil.Process().memory_info().rss - rss, self.GROWTH)

    @defer.inlineCallbacks
    def test_download_to_a_slow_reader(self):
        _Source.size = self.SIZE
        port = self.listen(_Source)
        self.start_proxy(FakePool("w", "/", [FakeInstance(port, "w#1")]), mode="prod")
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.proxy_port)
        client = yield connectProtocol(endpoint, _SlowReader())
        self.clients.append(client)
        rss = psutil.Process().memory_info().rss
        client.transport.write(b"GET /down HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        yield wait_until(lambda: client.closed, timeout=120, what="the download")
        self.assertGreater(client.count, self.SIZE)
        self.assertLess(psutil.Process().memory_info().rss - rss, self.GROWTH)
