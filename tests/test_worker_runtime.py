"""End-to-end tests of tqserver.worker and the example workers.

Every test runs the real thing: a worker process spawned with
``reactor.spawnProcess`` on a free loopback port, spoken to over TCP.
"""
from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import sys
import textwrap
import time
from io import BytesIO

from twisted.internet import defer, endpoints, error, protocol, reactor, task, threads
from twisted.internet.utils import getProcessOutputAndValue
from twisted.protocols.policies import WrappingFactory
from twisted.trial import unittest
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import Site

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INDEX_MAIN = os.path.join(REPO, "workers", "index", "src", "main.py")
HELLO_DIR = os.path.join(REPO, "workers", "hello")


def free_port() -> int:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
    finally:
        s.close()


def find_go():
    go = shutil.which("go")
    if go:
        return go
    for candidate in ("/usr/local/go/bin/go", "/usr/lib/go/bin/go"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def sleep(seconds: float) -> defer.Deferred:
    return task.deferLater(reactor, seconds, lambda: None)


class WorkerProcess(protocol.ProcessProtocol):
    """Collects a worker's output; knows when it has exited."""

    def __init__(self) -> None:
        self.out = b""
        self.err = b""
        self.running = True
        self.exit_code = None
        self.exit_signal = None
        self._waiters = []

    def outReceived(self, data: bytes) -> None:
        self.out += data

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason) -> None:
        self.running = False
        self.exit_code = reason.value.exitCode
        self.exit_signal = reason.value.signal
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(self.exit_code)

    def ended(self) -> defer.Deferred:
        if not self.running:
            return defer.succeed(self.exit_code)
        d = defer.Deferred()
        self._waiters.append(d)
        return d

    def signal(self, name: str) -> None:
        self.transport.signalProcess(name)

    @defer.inlineCallbacks
    def wait_for(self, stream: str, marker: bytes, timeout: float = 10.0):
        deadline = time.monotonic() + timeout
        while marker not in getattr(self, stream):
            if time.monotonic() > deadline:
                raise AssertionError("%r not seen on %s within %ss; stdout=%r stderr=%r"
                                     % (marker, stream, timeout, self.out, self.err))
            yield sleep(0.02)


class RawClient(protocol.Protocol):
    """A bare TCP client: what it received, and when the server closed it."""

    def __init__(self) -> None:
        self.data = b""
        self.lost = defer.Deferred()
        self.closed = False

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason) -> None:
        self.closed = True
        self.lost.callback(None)


# -- blocking helpers (run in a thread via deferToThread) -----------------------

def _conn(port: int) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", port, timeout=10)


def _two_requests_one_connection(port: int):
    conn = _conn(port)
    try:
        results = []
        for path in ("/env?n=1", "/env?n=2"):
            conn.request("GET", path, headers={"X-Forwarded-Prefix": "/app"})
            resp = conn.getresponse()
            results.append((resp.status, dict(resp.getheaders()), resp.read()))
        return results
    finally:
        conn.close()


def _chunked_post_then_get(port: int):
    conn = _conn(port)
    try:
        conn.putrequest("POST", "/echo")
        conn.putheader("Transfer-Encoding", "chunked")
        conn.putheader("Content-Type", "application/octet-stream")
        conn.endheaders()
        conn.send(b"5;ext=1\r\nhello\r\n7\r\n, world\r\n0\r\nX-Trailer: yes\r\n\r\n")
        r1 = conn.getresponse()
        first = (r1.status, r1.read())
        # The same connection must still be in sync after the chunked body.
        conn.request("GET", "/env")
        r2 = conn.getresponse()
        second = (r2.status, r2.read())
        return first, second
    finally:
        conn.close()


def _response_framing(port: int):
    conn = _conn(port)
    try:
        out = {}
        for path in ("/list", "/gen", "/write"):
            conn.request("GET", path)
            resp = conn.getresponse()
            out[path] = (resp.getheader("Content-Length"), resp.getheader("Transfer-Encoding"),
                         resp.read())
        conn.request("HEAD", "/list")
        resp = conn.getresponse()
        out["HEAD /list"] = (resp.getheader("Content-Length"), resp.read())
        return out
    finally:
        conn.close()


def _http10(port: int) -> bytes:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        s.sendall(b"GET /gen HTTP/1.0\r\n\r\n")
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return data        # the server closed: close-delimited body
            data += chunk
    finally:
        s.close()


def _expect_continue(port: int):
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\n"
                  b"Expect: 100-continue\r\n\r\n")
        interim = s.recv(65536)
        s.sendall(b"ping")
        resp = http.client.HTTPResponse(s)
        resp.begin()
        return interim, resp.status, resp.read()
    finally:
        s.close()


def _disconnect_mid_response(port: int) -> bytes:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        s.sendall(b"GET /stream HTTP/1.1\r\nHost: t\r\n\r\n")
        return s.recv(100)
    finally:
        s.close()


def _bad_requests(port: int):
    out = []
    for raw in (b"NONSENSE\r\n\r\n",
                b"GET / HTTP/1.1\r\nBad Header\r\n\r\n",
                b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: x\r\n\r\n"):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        try:
            s.sendall(raw)
            out.append(s.recv(100).split(b"\r\n", 1)[0])
        finally:
            s.close()
    return out


WSGI_APP = r'''
import json, sys, time
from tqserver.worker import serve

def app(environ, start_response):
    path = environ["PATH_INFO"]
    if path == "/echo":
        body = environ["wsgi.input"].read()
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        return [body]
    if path == "/boom":
        raise RuntimeError("secret-detail-42")
    if path == "/slow":
        sys.stdout.write("SLOW-BEGIN\n"); sys.stdout.flush()
        time.sleep(0.5)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"slow done"]
    if path == "/list":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"one ", b"two"]
    if path == "/gen":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return (part for part in [b"a", b"b", b"c"])
    if path == "/write":
        write = start_response("200 OK", [("Content-Type", "text/plain")])
        write(b"written ")
        return [b"and returned"]
    if path == "/stream":
        start_response("200 OK", [("Content-Type", "text/plain")])
        def gen():
            try:
                for i in range(200):
                    yield b"x" * 1000
                    time.sleep(0.01)
            finally:
                sys.stdout.write("STREAM-CLOSED\n"); sys.stdout.flush()
        return gen()
    keys = ["PATH_INFO", "QUERY_STRING", "SCRIPT_NAME", "REQUEST_METHOD", "REMOTE_PORT",
            "HTTP_X_FORWARDED_PREFIX", "SERVER_PROTOCOL", "wsgi.url_scheme", "REQUEST_URI"]
    body = json.dumps({k: environ.get(k) for k in keys}).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body]

serve(app)
'''

RESOURCE_APP = r'''
import sys
from twisted.internet import reactor, task
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from tqserver.worker import serve

class Root(Resource):
    isLeaf = True

    def render_GET(self, request):
        request.setHeader(b"content-type", b"text/plain")
        if request.path == b"/slow":
            sys.stdout.write("SLOW-BEGIN\n"); sys.stdout.flush()
            def done():
                request.write(b"slow done")
                request.finish()
            task.deferLater(reactor, 0.5, done)
            return NOT_DONE_YET
        return b"hello from twisted " + request.path

serve(Root())
'''


class WorkerTestCase(unittest.TestCase):
    timeout = 120

    def setUp(self) -> None:
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.retryAutomatically = False
        self.agent = Agent(reactor, pool=self.pool, connectTimeout=5)
        self.addCleanup(self.pool.closeCachedConnections)

    # -- processes ----------------------------------------------------------------

    def write_script(self, source: str, name: str = "main.py") -> str:
        d = os.path.abspath(self.mktemp())
        os.makedirs(d)
        path = os.path.join(d, name)
        with open(path, "w") as f:
            f.write(textwrap.dedent(source))
        return path

    def spawn(self, argv, env=None, path=None):
        """Start a worker on a free port; it is reaped when the test ends."""
        port = free_port()
        full_env = dict(os.environ)
        full_env.pop("TQSERVER_URL", None)
        full_env.update({
            "WORKER_PORT": str(port),
            "PORT": str(port),
            "WORKER_HOST": "127.0.0.1",
            "WORKER_NAME": "test",
            "WORKER_TYPE": "python",
            "WORKER_MODE": "development",
            "PYTHONPATH": os.pathsep.join(
                p for p in (REPO, os.environ.get("PYTHONPATH")) if p),
        })
        full_env.update(env or {})
        proc = WorkerProcess()
        reactor.spawnProcess(proc, argv[0], argv, env=full_env, path=path)
        self.addCleanup(self._reap, proc)
        return proc, port

    def spawn_python(self, script: str, env=None):
        return self.spawn([sys.executable, script], env)

    def _reap(self, proc: WorkerProcess) -> defer.Deferred:
        if proc.running:
            try:
                proc.signal("KILL")
            except error.ProcessExitedAlready:
                pass
        return proc.ended()

    # -- HTTP -----------------------------------------------------------------------

    @defer.inlineCallbacks
    def request(self, port: int, path: str, method: bytes = b"GET", body: bytes = None,
                headers=None):
        url = ("http://127.0.0.1:%d%s" % (port, path)).encode("ascii")
        producer = FileBodyProducer(BytesIO(body)) if body is not None else None
        resp = yield self.agent.request(method, url, Headers(headers or {}), producer)
        data = yield readBody(resp)
        return resp, data

    @defer.inlineCallbacks
    def wait_healthy(self, proc: WorkerProcess, port: int, path: str = "/health",
                     timeout: float = 20.0):
        deadline = time.monotonic() + timeout
        while True:
            if not proc.running:
                raise AssertionError("worker exited (%s) before becoming healthy; stderr=%r"
                                     % (proc.exit_code, proc.err))
            try:
                resp, body = yield self.request(port, path)
                if resp.code == 200:
                    return body
            except (error.ConnectError, error.ConnectionRefusedError, error.TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise AssertionError("worker not healthy within %ss; stderr=%r"
                                     % (timeout, proc.err))
            yield sleep(0.05)

    @defer.inlineCallbacks
    def connect_raw(self, port: int):
        client = RawClient()
        endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5)
        yield endpoints.connectProtocol(endpoint, client)

        def close():
            if not client.closed:
                client.transport.loseConnection()
            return client.lost

        self.addCleanup(close)
        return client

    @defer.inlineCallbacks
    def assert_refused(self, port: int):
        endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5)
        try:
            client = yield endpoints.connectProtocol(endpoint, RawClient())
        except error.ConnectionRefusedError:
            return
        client.transport.loseConnection()
        yield client.lost
        self.fail("port %d still accepts connections while draining" % port)

    @defer.inlineCallbacks
    def check_graceful_stop(self, proc: WorkerProcess, port: int, signame: str = "TERM"):
        """A slow in-flight request survives SIGTERM/SIGINT; the process exits 0."""
        yield self.wait_healthy(proc, port)
        # An idle keep-alive connection must not hold up the shutdown.
        idle = yield self.connect_raw(port)
        idle.transport.write(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
        deadline = time.monotonic() + 10
        while b"ok" not in idle.data:
            self.assertLess(time.monotonic(), deadline, "no answer on the idle connection")
            yield sleep(0.02)

        slow = self.request(port, "/slow")
        yield proc.wait_for("out", b"SLOW-BEGIN")
        started = time.monotonic()
        proc.signal(signame)
        yield proc.wait_for("err", b"stopping")
        yield self.assert_refused(port)
        yield idle.lost          # the idle connection was closed by the worker
        resp, body = yield slow
        self.assertEqual((resp.code, body), (200, b"slow done"))
        code = yield proc.ended()
        self.assertEqual(code, 0, proc.err)
        # Default drain bound is 30 s: exiting quickly proves idle connections
        # were closed rather than waited for.
        self.assertLess(time.monotonic() - started, 10)


class WSGIWorkerTests(WorkerTestCase):

    @defer.inlineCallbacks
    def start(self, env=None):
        proc, port = self.spawn_python(self.write_script(WSGI_APP), env)
        yield self.wait_healthy(proc, port, (env or {}).get("WORKER_HEALTH_PATH", "/health"))
        return proc, port

    @defer.inlineCallbacks
    def test_get_and_health(self):
        proc, port = yield self.start()
        resp, body = yield self.request(port, "/health")
        self.assertEqual((resp.code, body), (200, b"ok"))
        resp, body = yield self.request(port, "/some%20where/x?a=1&b=%20",
                                        headers={b"X-Forwarded-Prefix": [b"/api"],
                                                 b"X-Forwarded-Proto": [b"https"]})
        self.assertEqual(resp.code, 200)
        self.assertEqual(resp.headers.getRawHeaders(b"content-type"), [b"application/json"])
        env = json.loads(body)
        self.assertEqual(env["PATH_INFO"], "/some where/x")
        self.assertEqual(env["QUERY_STRING"], "a=1&b=%20")
        # Mounted at /api: SCRIPT_NAME is the route, REQUEST_URI what the client asked for.
        self.assertEqual(env["REQUEST_URI"], "/api/some%20where/x?a=1&b=%20")
        self.assertEqual(env["SCRIPT_NAME"], "/api")
        self.assertEqual(env["HTTP_X_FORWARDED_PREFIX"], "/api")
        self.assertEqual(env["wsgi.url_scheme"], "https")
        self.assertEqual(env["SERVER_PROTOCOL"], "HTTP/1.1")
        self.assertIn(b"listening on http://127.0.0.1:%d" % port, proc.err)

    @defer.inlineCallbacks
    def test_custom_health_path(self):
        proc, port = yield self.start({"WORKER_HEALTH_PATH": "/_ping"})
        resp, body = yield self.request(port, "/_ping")
        self.assertEqual((resp.code, body), (200, b"ok"))
        resp, body = yield self.request(port, "/health")   # now the app's
        self.assertEqual(json.loads(body)["PATH_INFO"], "/health")

    @defer.inlineCallbacks
    def test_keep_alive(self):
        proc, port = yield self.start()
        results = yield threads.deferToThread(_two_requests_one_connection, port)
        (s1, h1, b1), (s2, h2, b2) = results
        self.assertEqual((s1, s2), (200, 200))
        self.assertNotIn("Connection", h1)
        e1, e2 = json.loads(b1), json.loads(b2)
        self.assertEqual(e1["REMOTE_PORT"], e2["REMOTE_PORT"])   # same TCP connection
        self.assertEqual((e1["QUERY_STRING"], e2["QUERY_STRING"]), ("n=1", "n=2"))
        self.assertEqual(e2["HTTP_X_FORWARDED_PREFIX"], "/app")

    @defer.inlineCallbacks
    def test_post_content_length(self):
        proc, port = yield self.start()
        resp, body = yield self.request(port, "/echo", b"POST", b"hello body")
        self.assertEqual((resp.code, body), (200, b"hello body"))
        big = os.urandom(1 << 20)
        resp, body = yield self.request(port, "/echo", b"POST", big)
        self.assertEqual(resp.code, 200)
        self.assertEqual(body, big)
        # an unread body is skipped: the connection stays usable
        resp, body = yield self.request(port, "/list", b"POST", b"ignored" * 1000)
        self.assertEqual((resp.code, body), (200, b"one two"))

    @defer.inlineCallbacks
    def test_post_chunked(self):
        proc, port = yield self.start()
        (s1, b1), (s2, b2) = yield threads.deferToThread(_chunked_post_then_get, port)
        self.assertEqual((s1, b1), (200, b"hello, world"))
        self.assertEqual(s2, 200)
        self.assertEqual(json.loads(b2)["PATH_INFO"], "/env")

    @defer.inlineCallbacks
    def test_expect_100_continue(self):
        proc, port = yield self.start()
        interim, status, body = yield threads.deferToThread(_expect_continue, port)
        self.assertTrue(interim.startswith(b"HTTP/1.1 100 Continue\r\n"), interim)
        self.assertEqual((status, body), (200, b"ping"))

    @defer.inlineCallbacks
    def test_response_framing(self):
        proc, port = yield self.start()
        out = yield threads.deferToThread(_response_framing, port)
        self.assertEqual(out["/list"], ("7", None, b"one two"))
        self.assertEqual(out["/gen"], (None, "chunked", b"abc"))
        self.assertEqual(out["/write"], (None, "chunked", b"written and returned"))
        self.assertEqual(out["HEAD /list"], ("7", b""))
        raw = yield threads.deferToThread(_http10, port)
        head, _, body = raw.partition(b"\r\n\r\n")
        self.assertNotIn(b"chunked", head.lower())
        self.assertIn(b"connection: close", head.lower())
        self.assertEqual(body, b"abc")

    @defer.inlineCallbacks
    def test_bad_requests(self):
        proc, port = yield self.start()
        lines = yield threads.deferToThread(_bad_requests, port)
        self.assertEqual(lines, [b"HTTP/1.1 400 Bad Request"] * 3)
        resp, body = yield self.request(port, "/health")
        self.assertEqual(resp.code, 200)

    @defer.inlineCallbacks
    def test_app_exception_is_500_without_traceback(self):
        proc, port = yield self.start()
        resp, body = yield self.request(port, "/boom")
        self.assertEqual(resp.code, 500)
        self.assertNotIn(b"Traceback", body)
        self.assertNotIn(b"secret-detail-42", body)
        yield proc.wait_for("err", b"secret-detail-42")
        self.assertIn(b"Traceback", proc.err)
        resp, body = yield self.request(port, "/list")   # still serving
        self.assertEqual((resp.code, body), (200, b"one two"))

    @defer.inlineCallbacks
    def test_client_disconnect(self):
        proc, port = yield self.start()
        first = yield threads.deferToThread(_disconnect_mid_response, port)
        self.assertTrue(first.startswith(b"HTTP/1.1 200"), first)
        yield proc.wait_for("out", b"STREAM-CLOSED")      # the app's iterator was closed
        resp, body = yield self.request(port, "/health")
        self.assertEqual(resp.code, 200)
        self.assertNotIn(b"Traceback", proc.err)

    def test_sigterm_drains_in_flight_request(self):
        proc, port = self.spawn_python(self.write_script(WSGI_APP))
        return self.check_graceful_stop(proc, port, "TERM")

    def test_sigint_drains_in_flight_request(self):
        proc, port = self.spawn_python(self.write_script(WSGI_APP))
        return self.check_graceful_stop(proc, port, "INT")

    @defer.inlineCallbacks
    def test_port_in_use(self):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(s.close)
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        taken = s.getsockname()[1]
        proc, _ = self.spawn_python(self.write_script(WSGI_APP), {"WORKER_PORT": str(taken)})
        code = yield proc.ended()
        self.assertEqual(code, 1)
        self.assertIn(b"cannot listen on 127.0.0.1:%d" % taken, proc.err)


class TwistedResourceWorkerTests(WorkerTestCase):

    @defer.inlineCallbacks
    def test_resource_get_and_health(self):
        proc, port = self.spawn_python(self.write_script(RESOURCE_APP))
        body = yield self.wait_healthy(proc, port)
        self.assertEqual(body, b"ok")
        resp, body = yield self.request(port, "/x/y")
        self.assertEqual((resp.code, body), (200, b"hello from twisted /x/y"))
        self.assertIn(b"(Twisted resource)", proc.err)

    def test_resource_sigterm_drains_in_flight_request(self):
        proc, port = self.spawn_python(self.write_script(RESOURCE_APP))
        return self.check_graceful_stop(proc, port, "TERM")


class FakeSupervisorHealth(Resource):
    isLeaf = True
    payload = {
        "status": "degraded",
        "workers": {
            "hello": {"status": "healthy", "route": "/hello", "type": "go",
                      "instances": 1, "healthy_instances": 1, "error": None},
            "index": {"status": "healthy", "route": "/", "type": "python",
                      "instances": 1, "healthy_instances": 1, "error": None},
            "broken": {"status": "failed", "route": "/broken", "type": "go",
                       "instances": 0, "healthy_instances": 0,
                       "error": "build failed: <missing go>"},
        },
    }

    def render_GET(self, request):
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(self.payload).encode()


class IndexWorkerTests(WorkerTestCase):

    def fake_supervisor(self) -> str:
        factory = WrappingFactory(Site(FakeSupervisorHealth()))
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")

        @defer.inlineCallbacks
        def stop():
            yield port.stopListening()
            for proto in list(factory.protocols):
                proto.transport.loseConnection()
            while factory.protocols:
                yield sleep(0.01)

        self.addCleanup(stop)
        return "http://127.0.0.1:%d" % port.getHost().port

    @defer.inlineCallbacks
    def test_lists_workers(self):
        proc, port = self.spawn_python(INDEX_MAIN, {"TQSERVER_URL": self.fake_supervisor(),
                                                    "WORKER_NAME": "index"})
        yield self.wait_healthy(proc, port)
        resp, body = yield self.request(port, "/")
        self.assertEqual(resp.code, 200)
        self.assertEqual(resp.headers.getRawHeaders(b"content-type"),
                         [b"text/html; charset=utf-8"])
        page = body.decode("utf-8")
        self.assertIn("<title>TQServer</title>", page)
        self.assertIn('href="/style.css"', page)
        for route in ("/hello", "/broken", "/"):
            self.assertIn('<a href="%s">' % route, page)
        self.assertIn("build failed: &lt;missing go&gt;", page)
        self.assertIn("status-failed", page)
        self.assertIn("degraded", page)
        self.assertNotIn("status unavailable", page)

    @defer.inlineCallbacks
    def test_supervisor_unreachable(self):
        proc, port = self.spawn_python(INDEX_MAIN,
                                       {"TQSERVER_URL": "http://127.0.0.1:%d" % free_port()})
        yield self.wait_healthy(proc, port)
        resp, body = yield self.request(port, "/")
        self.assertEqual(resp.code, 200)
        self.assertIn(b"status unavailable", body)
        self.assertIn(b"<title>TQServer</title>", body)

    @defer.inlineCallbacks
    def test_not_found(self):
        proc, port = self.spawn_python(INDEX_MAIN)
        yield self.wait_healthy(proc, port)
        resp, body = yield self.request(port, "/no/such/page")
        self.assertEqual(resp.code, 404)
        self.assertIn(b"/no/such/page", body)
        self.assertIn(b'href="/style.css"', body)
        proc.signal("TERM")
        code = yield proc.ended()
        self.assertEqual(code, 0)

    def test_stylesheet_exists(self):
        css = os.path.join(REPO, "workers", "index", "public", "style.css")
        with open(css) as f:
            self.assertIn("body", f.read())


class GoHelloWorkerTests(WorkerTestCase):

    @defer.inlineCallbacks
    def build(self) -> str:
        go = find_go()
        if go is None:
            raise unittest.SkipTest("the Go toolchain is not installed (no `go` on PATH "
                                    "or in /usr/local/go/bin)")
        work = os.path.abspath(self.mktemp())
        shutil.copytree(HELLO_DIR, work, ignore=shutil.ignore_patterns("bin"))
        env = dict(os.environ)
        env["PATH"] = os.path.dirname(go) + os.pathsep + env.get("PATH", "")
        env.setdefault("GOTOOLCHAIN", "local")
        env.setdefault("GOFLAGS", "-buildvcs=false")
        if not env.get("GOCACHE") and not env.get("HOME"):
            env["GOCACHE"] = os.path.join(work, ".gocache")
        out, err, code = yield getProcessOutputAndValue(
            go, ["build", "-o", "bin/hello", "./src"], env=env, path=work)
        self.assertEqual(code, 0, "go build failed: %s%s" % (out.decode(), err.decode()))
        out, err, code = yield getProcessOutputAndValue(go, ["vet", "./src"], env=env, path=work)
        self.assertEqual(code, 0, "go vet: %s%s" % (out.decode(), err.decode()))
        return os.path.join(work, "bin", "hello")

    @defer.inlineCallbacks
    def test_hello(self):
        binary = yield self.build()
        proc, port = self.spawn([binary], {"WORKER_NAME": "hello", "WORKER_TYPE": "go"})
        body = yield self.wait_healthy(proc, port)
        self.assertEqual(body, b"ok")
        resp, body = yield self.request(port, "/")
        self.assertEqual(resp.code, 200)
        self.assertTrue(body.startswith(b"Hello from Go!\n"), body)
        self.assertEqual(resp.headers.getRawHeaders(b"content-type"),
                         [b"text/plain; charset=utf-8"])
        resp, body = yield self.request(port, "/bench")
        self.assertEqual((resp.code, body), (200, b"Hello, World!"))
        self.assertEqual(resp.length, 13)     # Content-Length, parsed by the client
        resp, body = yield self.request(port, "/nope")
        self.assertEqual(resp.code, 404)
        proc.signal("TERM")
        code = yield proc.ended()
        self.assertEqual(code, 0, proc.err)


class WorkerInfoTests(unittest.TestCase):

    def test_worker_info(self):
        from tqserver.worker import worker_info

        self.patch(os, "environ", {
            "WORKER_NAME": "api/v1", "WORKER_ROUTE": "/api/v1", "WORKER_PORT": "9123",
            "WORKER_MODE": "production", "WORKER_TYPE": "python", "WORKER_DIR": "/srv/w",
            "WORKER_INSTANCE": "api/v1#2",
        })
        info = worker_info()
        self.assertEqual(info["name"], "api/v1")
        self.assertEqual(info["route"], "/api/v1")
        self.assertEqual(info["port"], 9123)
        self.assertEqual(info["mode"], "production")
        self.assertEqual(info["type"], "python")
        self.assertEqual(info["dir"], "/srv/w")
        self.assertEqual(info["host"], "127.0.0.1")
        self.assertEqual(info["instance"], "api/v1#2")

    def test_worker_info_unset(self):
        from tqserver.worker import worker_info

        self.patch(os, "environ", {"PORT": "80", "WORKER_PATH": "/x"})
        info = worker_info()
        self.assertEqual((info["port"], info["route"], info["name"]), (80, "/x", None))


class AsgiDetectionTests(unittest.TestCase):
    def test_asgi_and_wsgi_apps_are_told_apart(self):
        from tqserver.worker.asgi import is_asgi

        async def asgi(scope, receive, send):
            pass

        def wsgi(environ, start_response):
            pass

        def three(scope, receive, send):  # a sync wrapper returning an awaitable
            pass

        class AsyncApp:
            async def __call__(self, scope, receive, send):
                pass

        class WsgiApp:  # Flask, Django's WSGIHandler
            def __call__(self, environ, start_response):
                pass

        def anything(*args):
            pass

        self.assertEqual([is_asgi(a) for a in (asgi, three, AsyncApp())], [True] * 3)
        self.assertEqual([is_asgi(a) for a in (wsgi, WsgiApp(), anything, len)], [False] * 4)


ASGI_SCRIPT = """
from tqserver.worker import serve

async def app(scope, receive, send):
    pass

serve(app)
"""

APP_MODULE = """
def app(environ, start_response):
    if environ["PATH_INFO"] == "/health" and environ["QUERY_STRING"] == "own":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"the app's own health"]
    if environ["PATH_INFO"] == "/health":
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"no such route"]
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [("%s|%s" % (environ["SCRIPT_NAME"], environ["PATH_INFO"])).encode()]

def make_app():
    return app
"""


class AppTargetTests(WorkerTestCase):
    """`python -m tqserver.worker module:app`, what python.app runs."""

    @defer.inlineCallbacks
    def test_serve_of_an_asgi_app_without_uvicorn_refuses_at_start(self):
        try:
            import uvicorn  # noqa: F401
            raise unittest.SkipTest("uvicorn is installed here")
        except ImportError:
            pass
        proc, port = self.spawn_python(self.write_script(ASGI_SCRIPT))
        code = yield proc.ended()
        self.assertEqual(code, 1)
        self.assertIn(b"is an ASGI application", proc.err)
        self.assertIn(b"add uvicorn to the worker's requirements.txt", proc.err)

    @defer.inlineCallbacks
    def test_wsgi_app_by_name_health_only_when_the_app_has_none(self):
        script = self.write_script(APP_MODULE, name="shop.py")
        directory = os.path.dirname(script)
        for target in ("shop:app", "shop:make_app()"):
            proc, port = self.spawn([sys.executable, "-m", "tqserver.worker", target],
                                    {"WORKER_DIR": directory})
            yield self.wait_healthy(proc, port, "/health")
            resp, body = yield self.request(port, "/health")
            self.assertEqual((resp.code, body), (200, b"ok"))        # the app has none
            resp, body = yield self.request(port, "/health?own")
            self.assertEqual(body, b"the app's own health")
            resp, body = yield self.request(port, "/x/y", headers={
                b"X-Forwarded-Prefix": [b"/shop"]})
            self.assertEqual(body, b"/shop|/x/y")
            proc.signal("TERM")
            self.assertEqual((yield proc.ended()), 0, proc.err)

    @defer.inlineCallbacks
    def test_a_missing_app_is_one_clear_line(self):
        script = self.write_script(APP_MODULE, name="shop.py")
        proc, port = self.spawn([sys.executable, "-m", "tqserver.worker", "shop:nope"],
                                {"WORKER_DIR": os.path.dirname(script)})
        code = yield proc.ended()
        self.assertEqual(code, 1)
        self.assertIn(b"python.app 'shop:nope': shop has no 'nope'", proc.err)
