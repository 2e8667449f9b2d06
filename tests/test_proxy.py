"""Integration tests of the proxy (README: "The worker contract"; docs/proxy.md) over
loopback: a real ProxySite on 127.0.0.1:0 in front of real upstream HTTP servers on
127.0.0.1:0, with a minimal stand-in for the Supervisor and its worker pools (no worker
processes are spawned).

Every test leaves no port, connection, delayed call or process behind: the cleanup aborts
whatever is still open and waits (with a deadline) until it is closed."""
from __future__ import annotations

import hashlib
import json
import os
import socket
import types
from typing import Callable, Dict, List, Optional, Tuple

import attrs
import treq
from twisted.internet import defer, protocol, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.python.failure import Failure
from twisted.trial import unittest
from twisted.web import resource, server
from twisted.web.client import HTTPConnectionPool

try:
    from twisted.internet.testing import StringTransport
except ImportError:  # older Twisted
    from twisted.test.proto_helpers import StringTransport

from tqserver.config.discovery import WorkerSpec
from tqserver.config.server import default_server_config
from tqserver.config.worker import TimeoutsConfig, WorkerConfig
from tqserver.fastcgi.client import FastCGIPool
from tqserver.fastcgi.forward import forwarding as fastcgi_forwarding
from tqserver.proxy.forward import Forward
from tqserver.proxy.front import Front
from tqserver.proxy.router import RoutingTable
from tqserver.proxy.site import ProxyChannel, ProxyRequest, ProxySite
from tqserver.proxy.state import ProxyState

DEADLINE = 10.0


# ---------------------------------------------------------------------------------------
# helpers

def wait_until(predicate: Callable[[], bool], timeout: float = DEADLINE,
               what: str = "condition") -> defer.Deferred:
    """Poll ``predicate`` every 10 ms; fail after ``timeout`` seconds."""
    deadline = reactor.seconds() + timeout

    @defer.inlineCallbacks
    def poll():
        while not predicate():
            if reactor.seconds() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            yield task.deferLater(reactor, 0.01, lambda: None)
    return poll()


def closed_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def pattern(n: int) -> bytes:
    """n deterministic, not-too-compressible bytes."""
    block = hashlib.sha256(b"tq").digest() * 2048           # 64 KiB
    full, rest = divmod(n, len(block))
    return block * full + block[:rest]


def parse_response(data: bytes) -> Tuple[int, Dict[bytes, List[bytes]], bytes]:
    """(status, headers by lower-case name, de-chunked body) of one raw HTTP/1.1 response."""
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    code = int(lines[0].split(b" ")[1])
    headers: Dict[bytes, List[bytes]] = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    if b"chunked" in b"".join(headers.get(b"transfer-encoding", [])).lower():
        out = b""
        while body:
            size_line, _, body = body.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                break
            out += body[:size]
            body = body[size + 2:]
        body = out
    return code, headers, body


# ---------------------------------------------------------------------------------------
# stand-ins for the supervisor side

class FakeInstance:
    """What Forward uses of tqserver.process.Instance."""

    def __init__(self, port: int, instance_id: str) -> None:
        self.port = port
        self.id = instance_id
        self.inflight = 0
        self.requests = 0

    def request_started(self) -> None:
        self.inflight += 1
        self.requests += 1

    def request_finished(self) -> None:
        self.inflight -= 1


class FakePool:
    """What Front and Forward use of tqserver.pool.WorkerPool."""

    def __init__(self, name: str, route: str, instances=(), config: Optional[WorkerConfig] = None,
                 public_dir: Optional[str] = None, worker_type: str = "python") -> None:
        self.name = name
        self.spec = WorkerSpec(name=name, directory="/nonexistent/" + name, route=route,
                               type=worker_type, config=config or WorkerConfig(),
                               config_file=None)
        self.serving = tuple(instances)
        self.instances = set(instances)
        self.public_dir = public_dir
        self.build_error: Optional[str] = None
        self.config_error_text: Optional[str] = None
        self.start_error: Optional[str] = None
        self.error: Optional[str] = None
        self.starting = False          # wait_serving holds requests while True
        self._waiters: List[defer.Deferred] = []
        self._rr = 0

    def pick(self):
        if not self.serving:
            return None
        self._rr = (self._rr + 1) % len(self.serving)
        ordered = self.serving[self._rr:] + self.serving[:self._rr]
        return min(ordered, key=lambda inst: inst.inflight)

    def wait_serving(self, timeout: float) -> defer.Deferred:
        inst = self.pick()
        if inst is not None or not self.starting:
            return defer.succeed(inst)
        d: defer.Deferred = defer.Deferred()
        self._waiters.append(d)

        def expire():
            if d in self._waiters:
                self._waiters.remove(d)
                d.callback(None)
        call = reactor.callLater(timeout, expire)
        d.addBoth(lambda r: (call.active() and call.cancel(), r)[1])
        return d

    def set_serving(self, instances) -> None:
        self.serving = tuple(instances)
        self.instances.update(instances)
        self.starting = False
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(self.pick())


def proxy_state(config, mode: str, pools) -> ProxyState:
    """What Front reads: the config, the mode, the routes to these pools."""
    return ProxyState(mode, config, RoutingTable((pool.spec.route, pool) for pool in pools))


def transport_of(proto):
    """The transport of a Site-built protocol (twisted.web wraps the HTTPChannel)."""
    return getattr(getattr(proto, "_channel", proto), "transport", None)


class TrackingProxySite(ProxySite):
    """ProxySite that remembers its channels, so cleanup can wait for every one to close."""

    def __init__(self, *args, **kw) -> None:
        ProxySite.__init__(self, *args, **kw)
        self.channels: list = []

    def buildProtocol(self, addr):
        channel = ProxySite.buildProtocol(self, addr)
        self.channels.append(channel)
        return channel


# ---------------------------------------------------------------------------------------
# real upstream servers

class WorkerResource(resource.Resource):
    """A worker: echoes requests as JSON and has a few special paths (see render)."""

    isLeaf = True

    def __init__(self, upstream: "Upstream") -> None:
        resource.Resource.__init__(self)
        self.upstream = upstream

    def render(self, request: server.Request):
        up = self.upstream
        body = request.content.read()
        path = request.path
        up.seen.append({"method": request.method, "uri": request.uri, "path": path,
                        "headers": list(request.requestHeaders.getAllRawHeaders()),
                        "body": body})
        request.notifyFinish().addCallbacks(
            lambda _: up.outcomes.append((path, "finished")),
            lambda f: up.outcomes.append((path, "lost")))
        args = {k.decode(): v[0].decode() for k, v in request.args.items()}
        if path == b"/big":
            n = int(args["n"])
            if args.get("cl") == "1":
                request.setHeader(b"content-length", b"%d" % n)
            request.setHeader(b"content-type", b"application/octet-stream")
            request.registerProducer(_PatternProducer(request, n), False)
            return server.NOT_DONE_YET
        if path == b"/slow":
            def answer():
                if not request._disconnected:
                    request.write(b"slow answer")
                    request.finish()
            up.calls.append(reactor.callLater(float(args.get("delay", "0.1")), answer))
            return server.NOT_DONE_YET
        if path == b"/hang":
            return server.NOT_DONE_YET
        if path == b"/drip":
            request.setHeader(b"content-type", b"text/plain")

            def drip():
                if not request._disconnected:
                    request.write(b"drop\n")
                    up.calls.append(reactor.callLater(0.01, drip))
            drip()
            return server.NOT_DONE_YET
        if path == b"/cut":
            request.setHeader(b"content-length", b"1000")
            request.write(b"0123456789")
            request.channel.transport.loseConnection()
            return server.NOT_DONE_YET
        if path == b"/cut-early":
            request.channel.transport.abortConnection()
            return server.NOT_DONE_YET
        if path == b"/cookies":
            request.addCookie(b"a", b"1", path=b"/")
            request.addCookie(b"b", b"2", httpOnly=True)
            request.responseHeaders.addRawHeader(b"x-multi", b"one")
            request.responseHeaders.addRawHeader(b"x-multi", b"two")
            return b"cookies"
        if path == b"/hop":
            request.setHeader(b"connection", b"X-Resp-Hop")
            request.setHeader(b"x-resp-hop", b"secret")
            request.setHeader(b"keep-alive", b"timeout=5")
            request.setHeader(b"proxy-authenticate", b"Basic")
            request.setHeader(b"upgrade", b"h2c")
            request.setHeader(b"trailer", b"X-Checksum")
            request.setHeader(b"proxy", b"http://evil.example/")
            request.setHeader(b"x-kept", b"yes")
            return b"hop"
        if path == b"/no-type":
            request.defaultContentType = None
            return b"<script>untyped</script>"
        if path.startswith(b"/status/"):
            request.setResponseCode(int(path.split(b"/")[2]))
            if request.code in (204, 304):
                return b""
            return b"status body"
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({
            "method": request.method.decode(), "uri": request.uri.decode("latin-1"),
            "path": path.decode("latin-1"),
            "headers": [[n.decode("latin-1"), v.decode("latin-1")]
                        for n, vs in request.requestHeaders.getAllRawHeaders() for v in vs],
            "body_length": len(body),
            "body_sha256": hashlib.sha256(body).hexdigest(),
            "server": up.name,
        }).encode()


class _PatternProducer:
    """Pull producer writing pattern(n) in 64 KiB pieces."""

    def __init__(self, request, n: int) -> None:
        self.request = request
        self.data = pattern(n)
        self.pos = 0

    def resumeProducing(self) -> None:
        if self.request._disconnected:
            return
        piece = self.data[self.pos:self.pos + 65536]
        self.pos += len(piece)
        if piece:
            self.request.write(piece)
        if self.pos >= len(self.data):
            self.request.unregisterProducer()
            self.request.finish()

    def stopProducing(self) -> None:
        self.pos = len(self.data)


class TrackingSite(server.Site):
    def __init__(self, *args, **kw) -> None:
        server.Site.__init__(self, *args, **kw)
        self.channels: list = []

    def buildProtocol(self, addr):
        channel = server.Site.buildProtocol(self, addr)
        self.channels.append(channel)
        return channel


class Upstream:
    """A real twisted.web HTTP server on 127.0.0.1:0 playing a worker instance."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.seen: List[dict] = []
        self.outcomes: List[Tuple[bytes, str]] = []
        self.calls: list = []
        self.site = TrackingSite(WorkerResource(self))
        self.site.noisy = False
        self.listener = reactor.listenTCP(0, self.site, interface="127.0.0.1")
        self.port = self.listener.getHost().port

    @property
    def connections(self) -> int:
        return len(self.site.channels)

    def transports(self) -> list:
        return [transport_of(c) for c in self.site.channels]


class RawUpstreamProtocol(protocol.Protocol):
    def connectionMade(self) -> None:
        self.factory.protocols.append(self)
        self.buffer = b""
        self.upgraded = False
        self.lost = False

    def dataReceived(self, data: bytes) -> None:
        if self.upgraded:
            self.factory.received.append(data)
            self.transport.write(data.upper())
            return
        self.buffer += data
        if b"\r\n\r\n" in self.buffer:
            head, _, rest = self.buffer.partition(b"\r\n\r\n")
            self.buffer = b""
            self.factory.heads.append(head)
            self.factory.behavior(self, head, rest)

    def connectionLost(self, reason=None) -> None:
        self.lost = True
        self.clean = reason is None or reason.check(ConnectionDone) is not None


class RawUpstream(protocol.Factory):
    """A raw TCP 'worker' for what twisted.web will not send: garbage, 101 + echo."""

    protocol = RawUpstreamProtocol
    noisy = False

    def __init__(self, behavior) -> None:
        self.behavior = behavior
        self.protocols: list = []
        self.heads: List[bytes] = []
        self.received: List[bytes] = []
        self.listener = reactor.listenTCP(0, self, interface="127.0.0.1")
        self.port = self.listener.getHost().port

    def transports(self) -> list:
        return [p.transport for p in self.protocols]


def answer_garbage(proto, head, rest) -> None:
    proto.transport.write(b"SSH-2.0-NotHTTP\r\n\r\n")
    proto.transport.loseConnection()


def answer_upgrade(proto, head, rest) -> None:
    proto.transport.write(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                          b"Upgrade: echo\r\nX-Up: 1\r\n\r\nwelcome;")
    proto.upgraded = True
    if rest:
        proto.dataReceived(rest)


class RawClient(protocol.Protocol):
    """A byte-level HTTP client: sends what it is told, keeps everything it gets."""

    def __init__(self) -> None:
        self.data = b""
        self.closed = False
        self.done: defer.Deferred = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason=None) -> None:
        self.closed = True
        self.done.callback(self.data)

    def response_complete(self) -> bool:
        """True once data holds one whole response (Content-Length or chunked)."""
        head, sep, body = self.data.partition(b"\r\n\r\n")
        if not sep:
            return False
        code, headers, _ = parse_response(head + b"\r\n\r\n")
        if b"content-length" in headers:
            return len(body) >= int(headers[b"content-length"][0])
        if b"chunked" in b"".join(headers.get(b"transfer-encoding", [])).lower():
            return body.endswith(b"0\r\n\r\n")
        return self.closed


# ---------------------------------------------------------------------------------------
# the test case base

class ProxyTestCase(unittest.TestCase):
    mode = "dev"

    def setUp(self) -> None:
        self.upstreams: List[Upstream] = []
        self.raw_upstreams: List[RawUpstream] = []
        self.clients: List[RawClient] = []
        self.http_pool = HTTPConnectionPool(reactor, persistent=True)
        self.http_pool.retryAutomatically = False
        self.logged: list = []
        self.config = default_server_config()
        self.proxy_listener = None
        self.addCleanup(self._cleanup)

    # -- building blocks -------------------------------------------------------------
    def upstream(self, name: str = "up") -> Upstream:
        up = Upstream(name)
        self.upstreams.append(up)
        return up

    def raw_upstream(self, behavior) -> RawUpstream:
        up = RawUpstream(behavior)
        self.raw_upstreams.append(up)
        return up

    def server_config(self, **server) -> None:
        self.config = attrs.evolve(self.config, server=attrs.evolve(self.config.server, **server))

    def start_proxy(self, *pools: FakePool, mode: Optional[str] = None) -> None:
        self.state = proxy_state(self.config, mode or self.mode, pools)
        self.fastcgi = FastCGIPool(reactor)
        self.front = Front(self.state, reactor, forwards={"php": fastcgi_forwarding(self.fastcgi)})
        self.site = TrackingProxySite(self.front, log_access=self.logged.append)
        self.site.noisy = False
        self.proxy_listener = reactor.listenTCP(0, self.site, interface="127.0.0.1")
        self.proxy_port = self.proxy_listener.getHost().port

    def simple(self, route: str = "/", name: str = "app", **kw) -> Tuple[Upstream, FakePool]:
        """One upstream, one pool with one instance on it, and the proxy in front."""
        up = self.upstream(name)
        pool = FakePool(name, route, [FakeInstance(up.port, name + "#1")], **kw)
        self.start_proxy(pool)
        return up, pool

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.proxy_port}{path}"

    def get(self, path: str, **kw) -> defer.Deferred:
        return treq.get(self.url(path), pool=self.http_pool, **kw)

    def request(self, method: str, path: str, **kw) -> defer.Deferred:
        return treq.request(method, self.url(path), pool=self.http_pool, **kw)

    @defer.inlineCallbacks
    def connect(self):
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.proxy_port)
        client = yield connectProtocol(endpoint, RawClient())
        self.clients.append(client)
        return client

    @defer.inlineCallbacks
    def raw(self, data: bytes, until_close: bool = True):
        """Send ``data`` on a new connection; the bytes received until the proxy closes it
        (or, with until_close=False, until one whole response has arrived)."""
        client = yield self.connect()
        client.transport.write(data)
        if until_close:
            yield wait_until(lambda: client.closed, what="the proxy to close the connection")
        else:
            yield wait_until(client.response_complete, what="a whole response")
        return client.data

    @defer.inlineCallbacks
    def json(self, response):
        self.assertEqual(response.code, 200)
        data = yield response.content()
        return json.loads(data)

    def upstream_header(self, seen: dict, name: str) -> List[bytes]:
        for n, values in seen["headers"]:
            if n.lower() == name.lower().encode():
                return values
        return []

    # -- cleanup ---------------------------------------------------------------------
    @defer.inlineCallbacks
    def _cleanup(self):
        listeners = [up.listener for up in self.upstreams + self.raw_upstreams]
        if self.proxy_listener is not None:
            listeners.append(self.proxy_listener)
        transports = []
        try:
            yield self.http_pool.closeCachedConnections()
            for client in self.clients:
                if not client.closed:
                    client.transport.abortConnection()
            self._cancel_calls()
            if self.proxy_listener is not None:
                self.front.upstreams.close_all()
                transports.extend(transport_of(c) for c in self.site.channels)
            for up in self.upstreams + self.raw_upstreams:
                transports.extend(up.transports())
            for t in transports:
                if t is not None and not t.disconnected:
                    t.abortConnection()
        finally:
            yield defer.gatherResults([defer.maybeDeferred(l.stopListening) for l in listeners])
        yield wait_until(lambda: (all(t is None or t.disconnected for t in transports)
                                  and all(c.closed for c in self.clients)),
                         what="every connection to close")
        self._cancel_calls()

    def _cancel_calls(self) -> None:
        for up in self.upstreams:
            for call in up.calls:
                if call.active():
                    call.cancel()


# ---------------------------------------------------------------------------------------
# the tests

class RoutingTests(ProxyTestCase):

    def setUp(self) -> None:
        ProxyTestCase.setUp(self)
        self.root_up = self.upstream("root")
        self.api_up = self.upstream("api")
        self.apix_up = self.upstream("apix")
        self.keep_up = self.upstream("keep")
        self.plain_up = self.upstream("plain")
        self.start_proxy(
            FakePool("plain", "/plain", [FakeInstance(self.plain_up.port, "plain#1")],
                     config=WorkerConfig(trailing_slash_redirect=False)),
            FakePool("index", "/", [FakeInstance(self.root_up.port, "index#1")]),
            FakePool("api", "/api", [FakeInstance(self.api_up.port, "api#1")]),
            FakePool("apix", "/apix/v1", [FakeInstance(self.apix_up.port, "apix#1")]),
            FakePool("keep", "/keep", [FakeInstance(self.keep_up.port, "keep#1")],
                     config=WorkerConfig(strip_prefix=False)))

    @defer.inlineCallbacks
    def check(self, path: str, server: str, upstream_uri: str, prefix: Optional[str]):
        response = yield self.get(path)
        data = yield self.json(response)
        self.assertEqual((data["server"], data["uri"]), (server, upstream_uri), path)
        headers = {k.lower(): v for k, v in data["headers"]}
        self.assertEqual(headers.get("x-forwarded-prefix"), prefix, path)

    @defer.inlineCallbacks
    def test_longest_segment_aware_prefix(self):
        yield self.check("/api", "api", "/", "/api")
        yield self.check("/api/", "api", "/", "/api")
        yield self.check("/api/items/7", "api", "/items/7", "/api")
        yield self.check("/apix", "root", "/apix", None)
        yield self.check("/apix/v1/x", "apix", "/x", "/apix/v1")
        yield self.check("/apix/v2", "root", "/apix/v2", None)
        yield self.check("/", "root", "/", None)
        yield self.check("/other/page", "root", "/other/page", None)

    @defer.inlineCallbacks
    def test_query_string_kept(self):
        yield self.check("/api/search?q=a%20b&x=1&x=2", "api", "/search?q=a%20b&x=1&x=2", "/api")
        yield self.check("/api?only=query", "api", "/?only=query", "/api")
        yield self.check("/?", "root", "/", None)

    @defer.inlineCallbacks
    def test_route_without_slash_redirects_to_it_with_one(self):
        for method, path, code, location in [
                ("GET", "/api", 301, "/api/"),
                ("HEAD", "/api", 301, "/api/"),
                ("GET", "/api?q=a%20b&x=1", 301, "/api/?q=a%20b&x=1"),
                ("POST", "/api?x=1", 308, "/api/?x=1"),
                ("DELETE", "/apix/v1", 308, "/apix/v1/")]:
            response = yield self.request(method, path, allow_redirects=False)
            yield response.content()
            self.assertEqual((response.code, response.headers.getRawHeaders("location")),
                             (code, [location]), (method, path))
        self.assertEqual(self.api_up.seen, [])  # answered by the proxy itself
        # Only the bare route: the site root and deeper paths are forwarded as they are.
        yield self.check("/api/", "api", "/", "/api")
        yield self.check("/apix", "root", "/apix", None)

    @defer.inlineCallbacks
    def test_slash_redirect_can_be_turned_off(self):
        response = yield self.get("/plain", allow_redirects=False)
        data = yield self.json(response)
        self.assertEqual((response.code, data["uri"]), (200, "/"))

    @defer.inlineCallbacks
    def test_strip_prefix_false(self):
        yield self.check("/keep/a/b?c=d", "keep", "/keep/a/b?c=d", None)

    @defer.inlineCallbacks
    def test_dot_segments_resolved_before_routing(self):
        yield self.check("/api/../other", "root", "/other", None)
        yield self.check("/x/%2e%2e/api/v", "api", "/v", "/api")

    @defer.inlineCallbacks
    def test_no_route(self):
        up = self.upstream("lonely")
        self.proxy_listener.stopListening()
        self.site.channels.clear()
        self.start_proxy(FakePool("api", "/api", [FakeInstance(up.port, "api#1")]))
        response = yield self.get("/nothing/here")
        self.assertEqual(response.code, 404)
        body = yield response.content()
        self.assertIn(b"404", body)
        self.assertEqual(up.seen, [])


class ForwardedHeaderTests(ProxyTestCase):

    def send(self, head: bytes) -> defer.Deferred:
        return self.raw(head + b"Connection: close\r\n\r\n")

    @defer.inlineCallbacks
    def test_host_and_forwarded_headers(self):
        up, _ = self.simple("/app")
        data = yield self.send(b"GET /app/x HTTP/1.1\r\nHost: shop.example:8080\r\n")
        code, headers, body = parse_response(data)
        self.assertEqual(code, 200)
        seen = up.seen[-1]
        self.assertEqual(self.upstream_header(seen, "host"), [b"shop.example:8080"])
        self.assertEqual(self.upstream_header(seen, "x-forwarded-for"), [b"127.0.0.1"])
        self.assertEqual(self.upstream_header(seen, "x-forwarded-proto"), [b"http"])
        self.assertEqual(self.upstream_header(seen, "x-forwarded-host"), [b"shop.example:8080"])
        self.assertEqual(self.upstream_header(seen, "x-forwarded-prefix"), [b"/app"])
        rid = self.upstream_header(seen, "x-request-id")
        self.assertEqual(len(rid), 1)
        self.assertRegex(rid[0], rb"^[0-9a-f]{32}$")
        self.assertEqual(headers[b"x-request-id"], rid)

    @defer.inlineCallbacks
    def test_request_id_propagated_when_sane(self):
        up, _ = self.simple()
        data = yield self.send(b"GET / HTTP/1.1\r\nHost: h\r\nX-Request-ID: abc-123.DEF_4:5\r\n")
        code, headers, _ = parse_response(data)
        self.assertEqual(self.upstream_header(up.seen[-1], "x-request-id"), [b"abc-123.DEF_4:5"])
        self.assertEqual(headers[b"x-request-id"], [b"abc-123.DEF_4:5"])

    @defer.inlineCallbacks
    def test_request_id_replaced_when_insane(self):
        up, _ = self.simple()
        for bad in (b"has space", b"x" * 200, b"<script>", b"a\"b"):
            yield self.send(b"GET / HTTP/1.1\r\nHost: h\r\nX-Request-ID: " + bad + b"\r\n")
            rid = self.upstream_header(up.seen[-1], "x-request-id")
            self.assertEqual(len(rid), 1)
            self.assertRegex(rid[0], rb"^[0-9a-f]{32}$")

    @defer.inlineCallbacks
    def test_request_ids_differ(self):
        up, _ = self.simple()
        yield self.send(b"GET / HTTP/1.1\r\nHost: h\r\n")
        yield self.send(b"GET / HTTP/1.1\r\nHost: h\r\n")
        ids = [self.upstream_header(s, "x-request-id")[0] for s in up.seen]
        self.assertNotEqual(ids[0], ids[1])

    @defer.inlineCallbacks
    def test_untrusted_client_cannot_forge_forwarded_headers(self):
        up, _ = self.simple("/app")
        yield self.send(b"GET /app/ HTTP/1.1\r\nHost: real.example\r\n"
                        b"X-Forwarded-For: 6.6.6.6\r\nX-Forwarded-Proto: https\r\n"
                        b"X-Forwarded-Host: evil.example\r\nX-Forwarded-Prefix: /evil\r\n")
        seen = up.seen[-1]
        self.assertEqual(self.upstream_header(seen, "x-forwarded-for"), [b"127.0.0.1"])
        self.assertEqual(self.upstream_header(seen, "x-forwarded-proto"), [b"http"])
        self.assertEqual(self.upstream_header(seen, "x-forwarded-host"), [b"real.example"])
        self.assertEqual(self.upstream_header(seen, "x-forwarded-prefix"), [b"/app"])

    @defer.inlineCallbacks
    def test_trusted_proxy_extends_forwarded_for(self):
        self.server_config(trusted_proxies=("127.0.0.1",))
        up, _ = self.simple()
        yield self.send(b"GET / HTTP/1.1\r\nHost: inner\r\nX-Forwarded-For: 203.0.113.9\r\n"
                        b"X-Forwarded-Proto: https\r\nX-Forwarded-Host: outer.example\r\n")
        seen = up.seen[-1]
        self.assertEqual(self.upstream_header(seen, "x-forwarded-for"),
                         [b"203.0.113.9, 127.0.0.1"])
        self.assertEqual(self.upstream_header(seen, "x-forwarded-proto"), [b"https"])
        self.assertEqual(self.upstream_header(seen, "x-forwarded-host"), [b"outer.example"])
        self.assertEqual(self.upstream_header(seen, "host"), [b"inner"])

    @defer.inlineCallbacks
    def test_hop_by_hop_request_headers_dropped(self):
        up, _ = self.simple()
        data = yield self.raw(
            b"GET /h HTTP/1.1\r\nHost: h\r\nConnection: close, X-Secret-Hop\r\n"
            b"X-Secret-Hop: 1\r\nKeep-Alive: timeout=5\r\nProxy: http://evil.example/\r\n"
            b"TE: trailers\r\nProxy-Authorization: Basic eDp5\r\nProxy-Connection: keep-alive\r\n"
            b"Upgrade: h2c\r\nTrailer: X-Checksum\r\nX-Kept: yes\r\nCookie: a=1\r\n\r\n")
        self.assertEqual(parse_response(data)[0], 200)
        names = {n.lower() for n, _ in up.seen[-1]["headers"]}
        for dropped in (b"connection", b"x-secret-hop", b"keep-alive", b"proxy", b"te",
                        b"proxy-authorization", b"proxy-connection", b"upgrade", b"trailer"):
            self.assertNotIn(dropped, names)
        self.assertEqual(self.upstream_header(up.seen[-1], "x-kept"), [b"yes"])
        self.assertEqual(self.upstream_header(up.seen[-1], "cookie"), [b"a=1"])

    @defer.inlineCallbacks
    def test_hop_by_hop_response_headers_dropped(self):
        self.simple()
        response = yield self.get("/hop")
        self.assertEqual(response.code, 200)
        yield response.content()
        for dropped in (b"x-resp-hop", b"keep-alive", b"proxy-authenticate", b"upgrade",
                        b"trailer", b"proxy"):
            self.assertFalse(response.headers.hasHeader(dropped), dropped)
        self.assertNotIn(b"X-Resp-Hop", b"".join(response.headers.getRawHeaders(b"connection", [])))
        self.assertEqual(response.headers.getRawHeaders(b"x-kept"), [b"yes"])

    @defer.inlineCallbacks
    def test_several_set_cookie_headers_kept(self):
        self.simple()
        response = yield self.get("/cookies")
        yield response.content()
        cookies = response.headers.getRawHeaders(b"set-cookie")
        self.assertEqual(len(cookies), 2)
        self.assertTrue(cookies[0].startswith(b"a=1"))
        self.assertTrue(cookies[1].startswith(b"b=2"))
        self.assertEqual(response.headers.getRawHeaders(b"x-multi"), [b"one", b"two"])

    @defer.inlineCallbacks
    def test_no_content_type_invented(self):
        """A worker answer without Content-Type must not become text/html on the way."""
        self.simple()
        response = yield self.get("/no-type")
        body = yield response.content()
        self.assertEqual(body, b"<script>untyped</script>")
        self.assertIsNone(response.headers.getRawHeaders(b"content-type"))


class BodyTests(ProxyTestCase):

    @defer.inlineCallbacks
    def test_post_content_length(self):
        up, pool = self.simple()
        payload = pattern(300000)
        response = yield self.request("POST", "/upload", data=payload,
                                      headers={b"content-type": [b"application/octet-stream"]})
        data = yield self.json(response)
        self.assertEqual(data["method"], "POST")
        self.assertEqual(data["body_length"], len(payload))
        self.assertEqual(data["body_sha256"], hashlib.sha256(payload).hexdigest())
        headers = {k.lower(): v for k, v in data["headers"]}
        self.assertEqual(headers["content-length"], str(len(payload)))
        self.assertEqual(pool.serving[0].inflight, 0)

    @defer.inlineCallbacks
    def test_post_chunked(self):
        up, _ = self.simple()
        pieces = [b"hello ", b"chunked ", pattern(70000), b"world"]
        body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
        client = yield self.connect()
        client.transport.write(b"POST /c HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n"
                               b"Connection: close\r\n\r\n")
        for i in range(0, len(body), 1000):
            client.transport.write(body[i:i + 1000])
        yield wait_until(lambda: client.closed)
        code, headers, data = parse_response(client.data)
        self.assertEqual(code, 200)
        data = json.loads(data)
        expected = b"".join(pieces)
        self.assertEqual(data["body_length"], len(expected))
        self.assertEqual(data["body_sha256"], hashlib.sha256(expected).hexdigest())
        self.assertIn(["Transfer-Encoding", "chunked"], data["headers"])

    @defer.inlineCallbacks
    def test_post_empty(self):
        up, _ = self.simple()
        response = yield self.request("POST", "/e", data=b"")
        data = yield self.json(response)
        self.assertEqual(data["body_length"], 0)

    @defer.inlineCallbacks
    def test_large_response_streams_intact(self):
        self.simple()
        n = 5 * 1024 * 1024 + 123
        for cl in ("1", "0"):   # with Content-Length, and chunked
            response = yield self.get(f"/big?n={n}&cl={cl}")
            self.assertEqual(response.code, 200)
            body = yield response.content()
            self.assertEqual(len(body), n)
            self.assertEqual(hashlib.sha256(body).digest(), hashlib.sha256(pattern(n)).digest())

    @defer.inlineCallbacks
    def test_head(self):
        up, _ = self.simple()
        client = yield self.connect()
        client.transport.write(b"HEAD /big?n=5000&cl=1 HTTP/1.1\r\nHost: h\r\n\r\n"
                               b"GET /status/418 HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        yield wait_until(lambda: client.closed)
        # the head alone, then the next response on the same connection
        first, _, second = client.data.partition(b"\r\n\r\n")
        code, headers, body = parse_response(first + b"\r\n\r\n")
        self.assertTrue(second.startswith(b"HTTP/1.1 418"), second[:40])
        self.assertEqual(code, 200)
        self.assertEqual(headers[b"content-length"], [b"5000"])
        self.assertEqual(body, b"")
        self.assertEqual(up.seen[0]["method"], b"HEAD")

    @defer.inlineCallbacks
    def test_204_and_304(self):
        self.simple()
        for code in (204, 304):
            response = yield self.get(f"/status/{code}")
            body = yield response.content()
            self.assertEqual((response.code, body), (code, b""))
        response = yield self.get("/status/418")
        self.assertEqual(response.code, 418)
        self.assertEqual((yield response.content()), b"status body")

    @defer.inlineCallbacks
    def test_expect_100_continue(self):
        up, _ = self.simple()
        client = yield self.connect()
        client.transport.write(b"POST /e HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n"
                               b"Expect: 100-continue\r\nConnection: close\r\n\r\n")
        yield wait_until(lambda: b"100 Continue" in client.data, what="100 Continue")
        client.transport.write(b"hello")
        yield wait_until(lambda: client.closed)
        final = client.data.split(b"\r\n\r\n", 1)[1]
        code, _, body = parse_response(final)
        self.assertEqual(code, 200)
        self.assertEqual(json.loads(body)["body_length"], 5)


def answer_early(proto, head, rest) -> None:
    """A worker that refuses an upload at once and keeps the connection open."""
    proto.transport.write(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 4\r\n\r\nbig!")


class EarlyAnswerTests(ProxyTestCase):

    @defer.inlineCallbacks
    def test_answer_before_request_body_is_complete(self):
        raw = self.raw_upstream(answer_early)
        pool = FakePool("w", "/", [FakeInstance(raw.port, "w#1")])
        self.start_proxy(pool)
        client = yield self.connect()
        client.transport.write(b"POST /up HTTP/1.1\r\nHost: h\r\nContent-Length: 200000\r\n\r\n"
                               + b"a" * 1000)
        yield wait_until(client.response_complete, what="the early answer")
        code, headers, body = parse_response(client.data)
        self.assertEqual((code, body), (413, b"big!"))
        # that upstream connection is half-way through a request body: not reusable
        yield wait_until(lambda: raw.protocols[0].lost, what="the upstream connection to close")
        self.assertEqual(self.front.upstreams.idle_count(), 0)
        self.assertEqual(pool.serving[0].inflight, 0)
        # the rest of the body is read and discarded; the client connection stays usable
        client.data = b""
        client.transport.write(b"b" * 199000 + b"GET /next HTTP/1.1\r\nHost: h\r\n\r\n")
        yield wait_until(client.response_complete, what="the second answer")
        self.assertEqual(parse_response(client.data)[0], 413)
        self.assertEqual(len(raw.protocols), 2)
        self.assertTrue(raw.heads[1].startswith(b"GET /next HTTP/1.1"))


class ErrorTests(ProxyTestCase):
    mode = "prod"

    def assertNoInternals(self, body: bytes, *secrets) -> None:
        for secret in secrets:
            self.assertNotIn(str(secret).encode(), body)
        self.assertNotIn(b"Traceback", body)
        self.assertNotIn(b"127.0.0.1", body)

    @defer.inlineCallbacks
    def test_502_upstream_closes_before_answering(self):
        up, pool = self.simple("/", name="secretworker")
        response = yield self.get("/cut-early")
        body = yield response.content()
        self.assertEqual(response.code, 502)
        self.assertNoInternals(body, "secretworker", up.port)
        self.assertEqual(pool.serving[0].inflight, 0)

    @defer.inlineCallbacks
    def test_502_garbage(self):
        raw = self.raw_upstream(answer_garbage)
        pool = FakePool("secretworker", "/", [FakeInstance(raw.port, "secretworker#1")])
        self.start_proxy(pool)
        response = yield self.get("/x")
        body = yield response.content()
        self.assertEqual(response.code, 502)
        self.assertNoInternals(body, "secretworker", raw.port)

    @defer.inlineCallbacks
    def test_upstream_closes_mid_body(self):
        """Too late for a 502: the client connection is cut, so it sees the truncation."""
        up, pool = self.simple()
        data = yield self.raw(b"GET /cut HTTP/1.1\r\nHost: h\r\n\r\n")
        # Either nothing (reset) or the start of the response; never a complete one.
        if data:
            head, _, body = data.partition(b"\r\n\r\n")
            self.assertTrue(head.startswith(b"HTTP/1.1 200"))
            self.assertIn(b"content-length: 1000", head.lower())
            self.assertLess(len(body), 1000)
        self.assertEqual(pool.serving[0].inflight, 0)

    @defer.inlineCallbacks
    def test_502_head_without_body_then_close(self):
        """The worker sent a head but died before any body byte: a clean 502, without the
        worker's headers (a gzip Content-Encoding on an HTML error page would be garbage)."""
        def head_then_die(proto, head, rest):
            proto.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n"
                                  b"Content-Encoding: gzip\r\nSet-Cookie: s=1\r\nETag: \"e\"\r\n\r\n")
            proto.transport.loseConnection()
        raw = self.raw_upstream(head_then_die)
        self.start_proxy(FakePool("w", "/", [FakeInstance(raw.port, "w#1")]))
        # (a raw client: treq's content decoding rewrites Content-Encoding)
        data = yield self.raw(b"GET /x HTTP/1.1\r\nHost: h\r\nAccept-Encoding: gzip\r\n"
                              b"X-Request-ID: rid-1\r\n\r\n", until_close=False)
        code, headers, body = parse_response(data)
        self.assertEqual(code, 502)
        for name in (b"content-encoding", b"set-cookie", b"etag"):
            self.assertNotIn(name, headers)
        self.assertEqual(headers[b"content-length"], [b"%d" % len(body)])
        self.assertEqual(headers[b"x-request-id"], [b"rid-1"])
        self.assertTrue(body.startswith(b"<!DOCTYPE html>"))

    @defer.inlineCallbacks
    def test_chunked_with_content_length_reframed(self):
        """A worker sending both Transfer-Encoding and Content-Length: chunked wins, and
        the client never sees the worker's wrong length."""
        def both(proto, head, rest):
            proto.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n"
                                  b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
        raw = self.raw_upstream(both)
        self.start_proxy(FakePool("w", "/", [FakeInstance(raw.port, "w#1")]))
        data = yield self.raw(b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        code, headers, body = parse_response(data)
        self.assertEqual((code, body), (200, b"abc"))
        self.assertNotIn(b"content-length", headers)

    @defer.inlineCallbacks
    def test_503_no_instance(self):
        pool = FakePool("secretworker", "/", [])
        pool.error = "instance secretworker#3 exited with status 1 on port 9123"
        self.start_proxy(pool)
        response = yield self.get("/x")
        body = yield response.content()
        self.assertEqual(response.code, 503)
        self.assertEqual(response.headers.getRawHeaders(b"retry-after"), [b"5"])
        self.assertNoInternals(body, "secretworker", 9123)

    @defer.inlineCallbacks
    def test_503_discards_request_body(self):
        pool = FakePool("w", "/", [])
        self.start_proxy(pool)
        payload = pattern(200000)
        response = yield self.request("POST", "/x", data=payload)
        self.assertEqual(response.code, 503)
        yield response.content()
        # the connection stays usable for the next request
        response = yield self.get("/y")
        self.assertEqual(response.code, 503)
        yield response.content()

    @defer.inlineCallbacks
    def test_504_upstream_too_slow(self):
        self.server_config(write_timeout_seconds=0.3)
        up, pool = self.simple("/", name="secretworker")
        started = reactor.seconds()
        response = yield self.get("/hang")
        body = yield response.content()
        self.assertEqual(response.code, 504)
        self.assertLess(reactor.seconds() - started, 5)
        self.assertNoInternals(body, "secretworker", up.port)
        yield wait_until(lambda: (b"/hang", "lost") in up.outcomes,
                         what="the upstream request to be cancelled")
        self.assertEqual(pool.serving[0].inflight, 0)

    @defer.inlineCallbacks
    def test_504_worker_write_timeout(self):
        up = self.upstream("w")
        # as loaded from a worker.yaml that sets the key (positions record what was set)
        config = WorkerConfig(timeouts=TimeoutsConfig(write_timeout_seconds=0.3),
                              positions={"timeouts.write_timeout_seconds": (2, 26)})
        self.start_proxy(FakePool("w", "/", [FakeInstance(up.port, "w#1")], config=config))
        response = yield self.get("/hang")
        self.assertEqual(response.code, 504)
        yield response.content()

    @defer.inlineCallbacks
    def test_408_slow_head(self):
        self.server_config(read_timeout_seconds=0.3)
        up, _ = self.simple()
        client = yield self.connect()
        client.transport.write(b"GET / HTTP/1.1\r\nHost: h\r\n")
        yield wait_until(lambda: client.closed, what="the read timeout")
        self.assertEqual(parse_response(client.data)[0], 408)
        self.assertEqual(up.seen, [])

    @defer.inlineCallbacks
    def test_408_slow_body_cancels_upstream(self):
        self.server_config(read_timeout_seconds=0.3)
        raw = self.raw_upstream(lambda proto, head, rest: None)   # reads, never answers
        pool = FakePool("w", "/", [FakeInstance(raw.port, "w#1")])
        self.start_proxy(pool)
        client = yield self.connect()
        client.transport.write(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\n12345")
        yield wait_until(lambda: client.closed, what="the read timeout")
        self.assertEqual(parse_response(client.data)[0], 408)
        yield wait_until(lambda: raw.protocols and raw.protocols[0].lost,
                         what="the upstream request to be cancelled")
        self.assertEqual(pool.serving[0].inflight, 0)

    @defer.inlineCallbacks
    def test_slow_but_in_time(self):
        self.server_config(write_timeout_seconds=2)
        self.simple()
        response = yield self.get("/slow?delay=0.2")
        self.assertEqual(response.code, 200)
        self.assertEqual((yield response.content()), b"slow answer")

    @defer.inlineCallbacks
    def test_413_content_length(self):
        self.server_config(max_body_bytes=1000)
        up, _ = self.simple()
        data = yield self.raw(b"POST /u HTTP/1.1\r\nHost: h\r\nContent-Length: 5000\r\n\r\n"
                              + b"x" * 100)
        self.assertEqual(parse_response(data)[0], 413)
        self.assertEqual(up.seen, [])

    @defer.inlineCallbacks
    def test_413_chunked(self):
        self.server_config(max_body_bytes=1000)
        up, pool = self.simple()
        client = yield self.connect()
        client.transport.write(b"POST /u HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(10):
            client.transport.write(b"200\r\n" + b"y" * 512 + b"\r\n")
        yield wait_until(lambda: client.closed)
        self.assertEqual(parse_response(client.data)[0], 413)
        yield wait_until(lambda: pool.serving[0].inflight == 0)

    @defer.inlineCallbacks
    def test_431_many_headers(self):
        up, _ = self.simple()
        headers = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 500) for i in range(40))
        data = yield self.raw(b"GET / HTTP/1.1\r\nHost: h\r\n" + headers + b"\r\n")
        self.assertEqual(parse_response(data)[0], 431)
        self.assertEqual(up.seen, [])

    @defer.inlineCallbacks
    def test_431_one_huge_header(self):
        up, _ = self.simple()
        data = yield self.raw(b"GET / HTTP/1.1\r\nHost: h\r\nX-Huge: " + b"v" * 20000 + b"\r\n\r\n")
        self.assertTrue(data, "the connection was closed without an answer")
        self.assertEqual(parse_response(data)[0], 431)
        self.assertEqual(up.seen, [])

    @defer.inlineCallbacks
    def test_400_bad_request_line(self):
        up, _ = self.simple()
        for line in (b"NONSENSE\r\n\r\n", b"GET /a b c HTTP/1.1\r\n\r\n",
                     b"GET relative HTTP/1.1\r\nHost: h\r\n\r\n"):
            data = yield self.raw(line + b"Connection: close\r\n\r\n"
                                  if line.endswith(b"HTTP/1.1\r\nHost: h\r\n\r\n") else line)
            self.assertEqual(parse_response(data)[0], 400, line)
        self.assertEqual(up.seen, [])

    @defer.inlineCallbacks
    def test_connection_refused_retries_another_instance(self):
        up = self.upstream("good")
        dead = FakeInstance(closed_port(), "w#1")
        good = FakeInstance(up.port, "w#2")
        pool = FakePool("w", "/", [dead, good])
        self.start_proxy(pool)
        for _ in range(4):
            response = yield self.get("/")
            self.assertEqual(response.code, 200)
            yield response.content()
        self.assertEqual((dead.inflight, good.inflight), (0, 0))
        self.assertGreater(dead.requests, 0)

    @defer.inlineCallbacks
    def test_connection_refused_only_instance(self):
        pool = FakePool("secretworker", "/", [FakeInstance(closed_port(), "secretworker#1")])
        self.start_proxy(pool)
        response = yield self.get("/")
        body = yield response.content()
        self.assertIn(response.code, (502, 503))
        self.assertNoInternals(body, "secretworker", pool.serving[0].port)
        self.assertEqual(pool.serving[0].inflight, 0)

    @defer.inlineCallbacks
    def test_held_until_an_instance_is_ready(self):
        up = self.upstream("late")
        pool = FakePool("w", "/", [])
        pool.starting = True
        self.start_proxy(pool)
        d = self.get("/held")
        reactor.callLater(0.1, pool.set_serving, [FakeInstance(up.port, "w#1")])
        response = yield d
        data = yield self.json(response)
        self.assertEqual(data["uri"], "/held")

    @defer.inlineCallbacks
    def test_prod_has_no_worker_headers(self):
        self.simple()
        response = yield self.get("/")
        yield response.content()
        self.assertFalse(response.headers.hasHeader(b"x-tqserver-worker-name"))
        self.assertFalse(response.headers.hasHeader(b"x-tqserver-worker-port"))


class DevModeTests(ProxyTestCase):
    mode = "dev"

    @defer.inlineCallbacks
    def test_worker_headers(self):
        up, pool = self.simple("/api", name="api")
        response = yield self.get("/api/x")
        yield response.content()
        h = response.headers
        self.assertEqual(h.getRawHeaders(b"x-tqserver-worker-name"), [b"api"])
        self.assertEqual(h.getRawHeaders(b"x-tqserver-worker-type"), [b"python"])
        self.assertEqual(h.getRawHeaders(b"x-tqserver-worker-route"), [b"/api"])
        self.assertEqual(h.getRawHeaders(b"x-tqserver-worker-port"), [str(up.port).encode()])
        self.assertEqual(h.getRawHeaders(b"x-tqserver-worker-instance"), [b"api#1"])

    @defer.inlineCallbacks
    def test_error_pages_have_details(self):
        pool = FakePool("someworker", "/", [])
        pool.error = "build failed"
        self.start_proxy(pool)
        response = yield self.get("/x")
        body = yield response.content()
        self.assertEqual(response.code, 503)
        self.assertIn(b"someworker", body)
        self.assertNotIn(b"Traceback", body)

    @defer.inlineCallbacks
    def test_build_error_page(self):
        up, pool = self.simple()
        pool.build_error = "main.go:3: undefined: fmt.Prinln"
        response = yield self.get("/")
        body = yield response.content()
        self.assertEqual(response.code, 500)
        self.assertIn(b"undefined: fmt.Prinln", body)
        self.assertEqual(up.seen, [])


class CancelTests(ProxyTestCase):

    @defer.inlineCallbacks
    def test_client_disconnect_mid_response_aborts_upstream(self):
        up, pool = self.simple()
        client = yield self.connect()
        client.transport.write(b"GET /drip HTTP/1.1\r\nHost: h\r\n\r\n")
        yield wait_until(lambda: client.data.count(b"drop") >= 3, what="some of the body")
        client.transport.abortConnection()
        yield wait_until(lambda: (b"/drip", "lost") in up.outcomes,
                         what="the upstream to see the disconnect")
        yield wait_until(lambda: pool.serving[0].inflight == 0)
        self.assertEqual(self.front.upstreams.idle_count(), 0)

    @defer.inlineCallbacks
    def test_client_disconnect_before_response_aborts_upstream(self):
        up, pool = self.simple()
        client = yield self.connect()
        client.transport.write(b"GET /hang HTTP/1.1\r\nHost: h\r\n\r\n")
        yield wait_until(lambda: up.seen, what="the request to reach the worker")
        client.transport.loseConnection()
        yield wait_until(lambda: (b"/hang", "lost") in up.outcomes,
                         what="the upstream to see the disconnect")
        yield wait_until(lambda: pool.serving[0].inflight == 0)


class KeepAliveTests(ProxyTestCase):

    @defer.inlineCallbacks
    def test_upstream_connection_reused(self):
        up, pool = self.simple()
        for i in range(5):
            response = yield self.get(f"/n{i}")
            yield response.content()
        self.assertEqual(len(up.seen), 5)
        self.assertEqual(up.connections, 1)
        self.assertEqual(self.front.upstreams.idle_count(up.port), 1)
        # also across client connections
        for i in range(3):
            yield self.raw(b"GET /c%d HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n" % i)
        self.assertEqual(up.connections, 1)
        self.assertEqual(pool.serving[0].inflight, 0)

    @defer.inlineCallbacks
    def test_reused_after_large_response(self):
        """A connection paused by a slow client near the end of a big body must read again
        once idle, or its next request would hang."""
        self.server_config(write_timeout_seconds=3)
        up, _ = self.simple()
        client = yield self.connect()
        client.transport.pauseProducing()          # a slow reader
        client.transport.write(b"GET /big?n=3000000&cl=1 HTTP/1.1\r\nHost: h\r\n\r\n")
        yield task.deferLater(reactor, 0.2, lambda: None)
        client.transport.resumeProducing()
        yield wait_until(client.response_complete, what="the big response")
        for i in range(3):
            response = yield self.get(f"/after{i}")
            self.assertEqual(response.code, 200)
            yield response.content()
        self.assertLessEqual(up.connections, 2)

    @defer.inlineCallbacks
    def test_worker_closing_idle_connection(self):
        """The worker may close an idle kept-alive connection at any time; the next request
        uses a new one."""
        up, _ = self.simple()
        response = yield self.get("/1")
        yield response.content()
        for t in up.transports():
            t.loseConnection()
        yield wait_until(lambda: self.front.upstreams.idle_count() == 0,
                         what="the idle connection to be forgotten")
        response = yield self.get("/2")
        self.assertEqual(response.code, 200)
        yield response.content()
        self.assertEqual(up.connections, 2)

    @defer.inlineCallbacks
    def test_pipelined_after_request_body(self):
        """The next request arrives in the same read as the end of a body."""
        up, _ = self.simple("/app")
        data = yield self.raw(b"POST /app/a HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello"
                              b"POST /nowhere HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc"
                              b"GET /app/b HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        self.assertEqual(data.count(b"HTTP/1.1 200"), 2)
        self.assertEqual(data.count(b"HTTP/1.1 404"), 1)
        self.assertEqual([s["path"] for s in up.seen], [b"/a", b"/b"])
        self.assertEqual(up.seen[0]["body"], b"hello")

    @defer.inlineCallbacks
    def test_pipelined_requests(self):
        up, _ = self.simple()
        data = yield self.raw(b"GET /p1 HTTP/1.1\r\nHost: h\r\n\r\n"
                              b"GET /p2 HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        self.assertEqual(data.count(b"HTTP/1.1 200"), 2)
        self.assertEqual([s["path"] for s in up.seen], [b"/p1", b"/p2"])


class ReadingTests(unittest.TestCase):
    """Upload backpressure on a ProxyRequest, with a StringTransport for the client."""

    def test_pause_reading_after_the_channel_resumed_the_transport(self):
        clock = task.Clock()
        channel = ProxyChannel()
        channel.site = ProxySite(None, lambda request: None)
        channel.callLater = clock.callLater
        transport = StringTransport()
        channel.makeConnection(transport)
        request = ProxyRequest(channel)
        request.pause_reading()
        self.assertEqual(transport.producerState, "paused")
        # HTTPChannel resumes its transport by itself when the response side drains
        # (full-duplex streaming): a later upstream-full signal must pause it again.
        channel.pauseProducing()
        channel.resumeProducing()
        self.assertEqual(transport.producerState, "producing")
        request.pause_reading()
        self.assertEqual(transport.producerState, "paused")
        request.resume_reading()
        self.assertEqual(transport.producerState, "producing")
        request.resume_reading()
        self.assertEqual(transport.producerState, "producing")
        channel.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(clock.getDelayedCalls(), [])


class ConnectRaceTests(unittest.TestCase):
    """Forward with a connection attempt that the test completes by hand."""

    def forward(self):
        self.attempt: defer.Deferred = defer.Deferred()
        attempt = self.attempt

        class Upstreams:
            def take_idle(self, port):
                return None

            def acquire(self, port, fresh=False):
                return attempt

        class Request:
            def pause_reading(self):
                pass

            def resume_reading(self):
                pass
        front = types.SimpleNamespace(upstreams=Upstreams(), reactor=task.Clock(), dev=False)
        self.inst = FakeInstance(1, "w#1")
        pool = FakePool("w", "/", [self.inst])
        fwd = Forward(front, Request(), pool, "/", b"/", default_server_config())
        fwd.head, fwd.has_body, fwd.chunked = b"GET / HTTP/1.1\r\n\r\n", False, False
        fwd._connect()
        self.assertEqual(self.inst.inflight, 1)
        return fwd

    def test_client_gone_then_connect_fails(self):
        fwd = self.forward()
        fwd.client_gone()
        self.assertEqual(self.inst.inflight, 0)
        self.attempt.errback(Failure(ConnectionRefusedError("refused")))
        self.assertEqual(self.inst.inflight, 0)
        outcome = []
        self.attempt.addBoth(outcome.append)
        self.assertEqual(outcome, [None])     # handled, no error left on the Deferred

    def test_client_gone_then_connected(self):
        fwd = self.forward()
        fwd.client_gone()
        released = []
        conn = types.SimpleNamespace(closed=False)
        fwd.front.upstreams.release = released.append
        self.attempt.callback(conn)
        self.assertEqual(released, [conn])   # the fresh connection is kept for later
        self.assertEqual(self.inst.inflight, 0)


class StaticTests(ProxyTestCase):

    def setUp(self) -> None:
        ProxyTestCase.setUp(self)
        self.public = os.path.abspath(self.mktemp())
        os.makedirs(self.public)
        with open(os.path.join(self.public, "hello.txt"), "wb") as f:
            f.write(b"static hello\n")
        with open(os.path.join(self.public, "index.php"), "wb") as f:
            f.write(b"<?php echo 'secret source'; ?>")

    @defer.inlineCallbacks
    def test_static_file_served_without_upstream(self):
        up, _ = self.simple("/site", public_dir=self.public)
        response = yield self.get("/site/hello.txt")
        body = yield response.content()
        self.assertEqual((response.code, body), (200, b"static hello\n"))
        self.assertTrue(response.headers.hasHeader(b"etag"))
        self.assertEqual(up.seen, [])
        self.assertEqual(up.connections, 0)

    @defer.inlineCallbacks
    def test_php_never_served_as_text(self):
        up, _ = self.simple("/site", public_dir=self.public)
        response = yield self.get("/site/index.php")
        body = yield response.content()
        self.assertNotIn(b"secret source", body)
        self.assertNotIn(b"<?php", body)
        self.assertEqual(up.seen[-1]["path"], b"/index.php")   # the worker decides

    @defer.inlineCallbacks
    def test_missing_file_goes_to_worker(self):
        up, _ = self.simple("/site", public_dir=self.public)
        response = yield self.get("/site/dynamic")
        data = yield self.json(response)
        self.assertEqual(data["uri"], "/dynamic")

    @defer.inlineCallbacks
    def test_post_to_static_path_goes_to_worker(self):
        up, _ = self.simple("/site", public_dir=self.public)
        response = yield self.request("POST", "/site/hello.txt", data=b"x")
        data = yield self.json(response)
        self.assertEqual(data["method"], "POST")

    @defer.inlineCallbacks
    def test_traversal_not_served(self):
        up, _ = self.simple("/site", public_dir=self.public)
        outside = os.path.join(os.path.dirname(self.public), "outside.txt")
        with open(outside, "wb") as f:
            f.write(b"outside secret")
        os.symlink(outside, os.path.join(self.public, "link.txt"))
        os.symlink(os.path.dirname(self.public), os.path.join(self.public, "up"))
        for path in (b"/site/../outside.txt", b"/site/%2e%2e/outside.txt",
                     b"/site/%2E%2e/outside.txt", b"/site/.%2e/outside.txt",
                     b"/site/%252e%252e/outside.txt", b"/site/..%2foutside.txt",
                     b"/site/link.txt", b"/site/up/outside.txt", b"/site//../outside.txt",
                     b"/site/hello.txt/../../outside.txt"):
            data = yield self.raw(b"GET " + path + b" HTTP/1.1\r\nHost: h\r\n"
                                  b"Connection: close\r\n\r\n")
            self.assertNotIn(b"outside secret", data, path)
            self.assertTrue(data.startswith(b"HTTP/1.1 "), path)

    @defer.inlineCallbacks
    def test_conditional_and_range(self):
        up, _ = self.simple("/site", public_dir=self.public)
        response = yield self.get("/site/hello.txt")
        yield response.content()
        etag = response.headers.getRawHeaders(b"etag")[0]
        modified = response.headers.getRawHeaders(b"last-modified")[0]
        response = yield self.get("/site/hello.txt", headers={b"if-none-match": [etag]})
        self.assertEqual((response.code, (yield response.content())), (304, b""))
        response = yield self.get("/site/hello.txt", headers={b"if-modified-since": [modified]})
        self.assertEqual(response.code, 304)
        yield response.content()
        response = yield self.get("/site/hello.txt", headers={b"range": [b"bytes=0-5"]})
        self.assertEqual((response.code, (yield response.content())), (206, b"static"))
        self.assertEqual(response.headers.getRawHeaders(b"content-range"), [b"bytes 0-5/13"])
        response = yield self.get("/site/hello.txt", headers={b"range": [b"bytes=-6"]})
        self.assertEqual((response.code, (yield response.content())), (206, b"hello\n"))
        response = yield self.get("/site/hello.txt", headers={b"range": [b"bytes=100-"]})
        self.assertEqual(response.code, 416)
        yield response.content()
        self.assertEqual(up.seen, [])

    @defer.inlineCallbacks
    def test_head_and_large_file(self):
        up, _ = self.simple("/site", public_dir=self.public)
        big = pattern(3 * 1024 * 1024 + 7)
        with open(os.path.join(self.public, "big.bin"), "wb") as f:
            f.write(big)
        data = yield self.raw(b"HEAD /site/big.bin HTTP/1.1\r\nHost: h\r\n"
                              b"Connection: close\r\n\r\n")
        code, headers, body = parse_response(data)
        self.assertEqual((code, body), (200, b""))
        self.assertEqual(headers[b"content-length"], [b"%d" % len(big)])
        response = yield self.get("/site/big.bin")
        self.assertEqual((yield response.content()), big)
        self.assertEqual(up.seen, [])

    @defer.inlineCallbacks
    def test_hidden_files_not_served(self):
        up, _ = self.simple("/site", public_dir=self.public)
        with open(os.path.join(self.public, ".env"), "wb") as f:
            f.write(b"SECRET=1")
        response = yield self.get("/site/.env")
        self.assertNotIn(b"SECRET", (yield response.content()))


class UpgradeTests(ProxyTestCase):

    @defer.inlineCallbacks
    def test_websocket_style_upgrade(self):
        raw = self.raw_upstream(answer_upgrade)
        pool = FakePool("ws", "/ws", [FakeInstance(raw.port, "ws#1")])
        self.start_proxy(pool)
        client = yield self.connect()
        client.transport.write(b"GET /ws/chat HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\n"
                               b"Upgrade: echo\r\nSec-WebSocket-Key: abc\r\n\r\n")
        yield wait_until(lambda: b"welcome;" in client.data, what="the 101 and first bytes")
        head = client.data.split(b"\r\n\r\n")[0]
        self.assertTrue(head.startswith(b"HTTP/1.1 101"))
        self.assertIn(b"upgrade: echo", head.lower())
        self.assertIn(b"connection: upgrade", head.lower())
        upstream_head = raw.heads[0].lower()
        self.assertTrue(upstream_head.startswith(b"get /chat http/1.1"))
        self.assertIn(b"connection: upgrade", upstream_head)
        self.assertIn(b"upgrade: echo", upstream_head)
        self.assertIn(b"sec-websocket-key: abc", upstream_head)
        client.transport.write(b"ping")
        yield wait_until(lambda: client.data.endswith(b"welcome;PING"), what="the echo")
        client.transport.write(b"\x00\x01binary\r\n\r\nGET / HTTP/1.1\r\n\r\n")
        yield wait_until(lambda: client.data.endswith(b"\x00\x01BINARY\r\n\r\nGET / HTTP/1.1\r\n\r\n"),
                         what="raw bytes both ways")
        client.transport.loseConnection()
        yield wait_until(lambda: raw.protocols[0].lost, what="the upstream side to close")
        self.assertEqual(pool.serving[0].inflight, 0)
        [logged] = [r for r in self.logged if r.path == b"/ws/chat"]   # once, at the end
        self.assertEqual(logged.code, 101)
        self.assertEqual(logged.sentLength, len(client.data) - len(head) - 4)

    @defer.inlineCallbacks
    def test_last_bytes_before_close_delivered(self):
        """A client that sends its last bytes (a WebSocket close frame) and closes at once:
        the worker gets the bytes, then an orderly close."""
        raw = self.raw_upstream(answer_upgrade)
        self.start_proxy(FakePool("ws", "/", [FakeInstance(raw.port, "ws#1")]))
        for _ in range(5):
            client = yield self.connect()
            client.transport.write(b"GET / HTTP/1.1\r\nHost: h\r\nConnection: upgrade\r\n"
                                   b"Upgrade: echo\r\n\r\n")
            yield wait_until(lambda client=client: b"welcome;" in client.data)
            raw.received[:] = []
            client.transport.write(b"\x88\x02bye" * 1000)
            client.transport.loseConnection()
            yield wait_until(lambda: raw.protocols[-1].lost, what="the upstream side to close")
            self.assertEqual(b"".join(raw.received), b"\x88\x02bye" * 1000)
            self.assertTrue(raw.protocols[-1].clean, "the worker saw a reset, not a close")

    @defer.inlineCallbacks
    def test_upstream_closes_upgraded_connection(self):
        raw = self.raw_upstream(answer_upgrade)
        self.start_proxy(FakePool("ws", "/", [FakeInstance(raw.port, "ws#1")]))
        client = yield self.connect()
        client.transport.write(b"GET / HTTP/1.1\r\nHost: h\r\nConnection: upgrade\r\n"
                               b"Upgrade: echo\r\n\r\n")
        yield wait_until(lambda: b"welcome;" in client.data)
        raw.protocols[0].transport.loseConnection()
        yield wait_until(lambda: client.closed, what="the client side to close")

    @defer.inlineCallbacks
    def test_upgrade_refused_is_a_normal_response(self):
        up, _ = self.simple()
        response = yield self.get("/", headers={b"connection": [b"upgrade"],
                                                b"upgrade": [b"websocket"]})
        data = yield self.json(response)
        headers = {k.lower(): v for k, v in data["headers"]}
        self.assertEqual(headers.get("upgrade"), "websocket")


# The same behaviour in prod mode, where the worker's head is relayed as raw lines
# (ProxyRequest.relay_head) instead of through twisted.web's Headers as in dev.
class ProdRoutingTests(RoutingTests):
    mode = "prod"


class ProdForwardedHeaderTests(ForwardedHeaderTests):
    mode = "prod"

    @defer.inlineCallbacks
    def test_response_head_relayed_raw(self):
        """The worker's names and values as sent, hop-by-hop ones and its own X-Request-ID
        dropped; a bare LF in a value is folded to a space, never a new header line."""
        def answer(proto, head, rest):
            proto.transport.write(
                b"HTTP/1.1 201 Made\r\ncontent-type: text/x-raw\r\nKeep-Alive: timeout=5\r\n"
                b"X-Request-ID: theirs\r\nX-Split: a\nInjected: yes\r\nContent-Length: 2\r\n"
                b"\r\nok" if b"/lf" in head else
                b"HTTP/1.1 201 Made\r\ncontent-type: text/x-raw\r\nKeep-Alive: timeout=5\r\n"
                b"X-Request-ID: theirs\r\nContent-Length: 2\r\n\r\nok")
        raw = self.raw_upstream(answer)
        self.start_proxy(FakePool("w", "/", [FakeInstance(raw.port, "w#1")]), mode="prod")
        data = yield self.raw(b"GET /x HTTP/1.1\r\nHost: h\r\nX-Request-ID: mine\r\n\r\n",
                              until_close=False)
        head, _, body = data.partition(b"\r\n\r\n")
        self.assertEqual(body, b"ok")
        lines = head.split(b"\r\n")
        self.assertEqual(lines[0], b"HTTP/1.1 201 Made")
        self.assertIn(b"content-type: text/x-raw", lines)
        self.assertIn(b"X-Request-ID: mine", lines)
        self.assertNotIn(b"X-Request-ID: theirs", lines)
        self.assertFalse([line for line in lines if line.lower().startswith(b"keep-alive")])
        data = yield self.raw(b"GET /lf HTTP/1.1\r\nHost: h\r\n\r\n", until_close=False)
        head = data.partition(b"\r\n\r\n")[0]
        self.assertNotIn(b"\nInjected", head)
        self.assertEqual(parse_response(data)[0], 201)


class ProdBodyTests(BodyTests):
    mode = "prod"


class ProdEarlyAnswerTests(EarlyAnswerTests):
    mode = "prod"


class ProdCancelTests(CancelTests):
    mode = "prod"


class ProdKeepAliveTests(KeepAliveTests):
    mode = "prod"


class ProdUpgradeTests(UpgradeTests):
    mode = "prod"
