"""RFC 9112 request rules and the proxy's rejections, over loopback: the real ProxySite in
front of a raw worker that records what reaches it.

A rejected request gets exactly one response (the rejection, with Connection: close), an
access-log line with its status, and nothing of it reaches the worker."""
from __future__ import annotations

from twisted.internet import defer, protocol, reactor, task

from .test_proxy import FakeInstance, FakePool, ProxyTestCase, parse_response, wait_until
from .test_smuggling import RecordingWorker


def responses(data: bytes) -> int:
    return data.count(b"HTTP/1.1 ")


class HostAndTargetTests(ProxyTestCase):
    mode = "prod"

    def setUp(self) -> None:
        ProxyTestCase.setUp(self)
        self.worker = RecordingWorker(self)

    @defer.inlineCallbacks
    def assertRejected(self, request: bytes, status: int = 400):
        data = yield self.raw(request)
        code, headers, _ = parse_response(data)
        self.assertEqual(code, status, (request, data[:200]))
        self.assertEqual(responses(data), 1, data)
        self.assertEqual(headers.get(b"connection"), [b"close"])
        self.assertEqual(self.worker.requests, [], request)
        self.assertEqual([r.code for r in self.logged][-1:], [status], request)

    @defer.inlineCallbacks
    def assertServed(self, request: bytes):
        data = yield self.raw(request)
        self.assertEqual(parse_response(data)[0], 200, (request, data[:200]))
        return self.worker.requests[-1]

    def test_http11_without_host(self):
        return self.assertRejected(b"GET /x HTTP/1.1\r\nConnection: close\r\n\r\n")

    @defer.inlineCallbacks
    def test_http10_without_host_is_fine(self):
        start, _fields, _ = yield self.assertServed(b"GET /x HTTP/1.0\r\n\r\n")
        self.assertEqual(start, b"GET /x HTTP/1.1")

    def test_two_hosts(self):
        return self.assertRejected(b"GET /x HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")

    def test_bad_host_values(self):
        @defer.inlineCallbacks
        def run():
            for host in (b"a b", b"a, b", b"a/b", b"a:b:c", b"h:8o"):
                yield self.assertRejected(b"GET /x HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
        return run()

    @defer.inlineCallbacks
    def test_absolute_form_replaces_host(self):
        start, fields, _ = yield self.assertServed(
            b"GET http://other.example:81/x?y=1 HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        self.assertEqual(start, b"GET /x?y=1 HTTP/1.1")
        self.assertEqual([v for n, v in fields if n == b"host"], [b"other.example:81"])
        self.assertEqual([v for n, v in fields if n == b"x-forwarded-host"], [b"other.example:81"])

    @defer.inlineCallbacks
    def test_absolute_form_without_path(self):
        start, fields, _ = yield self.assertServed(
            b"GET HTTPS://other.example?q HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        self.assertEqual(start, b"GET /?q HTTP/1.1")
        self.assertEqual([v for n, v in fields if n == b"host"], [b"other.example"])

    def test_request_line_over_the_limit(self):
        return self.assertRejected(b"GET /" + b"a" * 17000 + b" HTTP/1.1\r\nHost: h\r\n\r\n",
                                   414)

    def test_header_section_over_the_limit(self):
        fields = b"".join(b"X-F%d: %s\r\n" % (i, b"v" * 1000) for i in range(20))
        return self.assertRejected(b"GET /x HTTP/1.1\r\nHost: h\r\n" + fields + b"\r\n", 431)

    def test_one_field_over_the_limit(self):
        return self.assertRejected(b"GET /x HTTP/1.1\r\nHost: h\r\nX: " + b"v" * 17000
                                   + b"\r\n\r\n", 431)

    def test_raw_bytes_outside_the_uri_grammar(self):
        @defer.inlineCallbacks
        def run():
            for target in (b"/\x7f", b"/\x80", b"/a\xb0", b"/caf\xc3\xa9", b'/a"b', b"/<x>",
                           b"/a#b", b"/a%zz", b"/a%", b"/a%2", b"/?q=\xff"):
                yield self.assertRejected(b"GET " + target + b" HTTP/1.1\r\nHost: h\r\n\r\n")
        return run()

    def test_uri_characters_browsers_send_are_served(self):
        @defer.inlineCallbacks
        def run():
            for target in (b"/a/b?x[]=1&y={2}|3^4`5\\6", b"/caf%C3%A9", b"/%2F%25",
                           b"/!$&'()*+,;=:@-._~"):
                start, _, _ = yield self.assertServed(
                    b"GET " + target + b" HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
                self.assertEqual(start.split(b" ")[1], target)
        return run()


class DevHostAndTargetTests(HostAndTargetTests):
    mode = "dev"


class RejectionTests(ProxyTestCase):
    """Exactly one response per rejection, logged with its status."""

    mode = "prod"

    def setUp(self) -> None:
        ProxyTestCase.setUp(self)
        self.server_config(max_body_bytes=10, read_timeout_seconds=0.5)
        self.worker = RecordingWorker(self)

    @defer.inlineCallbacks
    def assertOneRejection(self, request: bytes, status: int):
        data = yield self.raw(request)
        self.assertEqual(parse_response(data)[0], status, data)
        self.assertEqual(responses(data), 1, data)
        self.assertEqual([r.code for r in self.logged], [status])

    def test_413_chunked_body_complete_in_one_read(self):
        # A "200 OK" followed the 413 on the same connection, and the log said 200.
        return self.assertOneRejection(
            b"POST /x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"14\r\n01234567890123456789\r\n0\r\n\r\nGET /y HTTP/1.1\r\nHost: h\r\n\r\n", 413)

    def test_413_content_length_with_its_body(self):
        return self.assertOneRejection(
            b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 20\r\n\r\n01234567890123456789"
            b"GET /y HTTP/1.1\r\nHost: h\r\n\r\n", 413)

    def test_400_is_logged(self):
        return self.assertOneRejection(b"GET /x HTTP/1.1\r\nHost: h\r\nBad Name: v\r\n\r\n", 400)

    def test_408_is_logged(self):
        return self.assertOneRejection(b"GET /x HTTP/1.1\r\nHost: h\r\n", 408)

    @defer.inlineCallbacks
    def test_head_rejection_has_no_body(self):
        data = yield self.raw(b"HEAD /x HTTP/1.1\r\n\r\n")  # no Host: 400
        self.assertTrue(data.endswith(b"\r\n\r\n"), data)

class _SlowReadingWorker(protocol.Protocol):
    """Reads a request body in bursts, pausing between them (a worker slower than the
    client), then answers with the number of bytes it got."""

    def connectionMade(self) -> None:
        self.got = 0
        self.length = None
        self.head = b""
        self.calls = []

    def dataReceived(self, data: bytes) -> None:
        if self.length is None:
            self.head += data
            head, sep, rest = self.head.partition(b"\r\n\r\n")
            if not sep:
                return
            self.length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            data = rest
        before, self.got = self.got, self.got + len(data)
        if self.got >= self.length:
            body = b"%d" % self.got
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s"
                                 % (len(body), body))
        elif before // (1 << 20) != self.got // (1 << 20):  # each MiB: a 0.25 s pause
            self.transport.pauseProducing()
            self.calls.append(reactor.callLater(0.25, self.transport.resumeProducing))


class UploadTimeoutTests(ProxyTestCase):
    """read_timeout_seconds times the client's pauses, not the worker's backpressure."""

    mode = "prod"

    def listen(self, factory) -> int:
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port

    @defer.inlineCallbacks
    def test_slow_worker_fast_client(self):
        # Cut with a 408 after read_timeout_seconds, with most of the body still unsent.
        self.server_config(read_timeout_seconds=0.5)
        factory = protocol.Factory.forProtocol(_SlowReadingWorker)
        self.start_proxy(FakePool("w", "/", [FakeInstance(self.listen(factory), "w#1")]))
        size = 12 << 20
        client = yield self.connect()
        client.transport.write(b"POST /up HTTP/1.1\r\nHost: h\r\nConnection: close\r\n"
                               b"Content-Length: %d\r\n\r\n" % size + b"u" * size)
        started = reactor.seconds()
        yield wait_until(lambda: client.closed, timeout=60, what="the answer")
        self.assertGreater(reactor.seconds() - started, 1.0)  # the worker did hold it back
        code, _, body = parse_response(client.data)
        self.assertEqual((code, body), (200, b"%d" % size))

    @defer.inlineCallbacks
    def test_client_pausing_mid_body(self):
        self.server_config(read_timeout_seconds=0.5)
        factory = protocol.Factory.forProtocol(_SlowReadingWorker)
        self.start_proxy(FakePool("w", "/", [FakeInstance(self.listen(factory), "w#1")]))
        client = yield self.connect()
        client.transport.write(b"POST /up HTTP/1.1\r\nHost: h\r\nContent-Length: 100\r\n\r\n")
        for _ in range(4):  # a byte every 0.3 s keeps it alive...
            yield task_sleep(0.3)
            client.transport.write(b"x")
        self.assertFalse(client.closed)
        yield wait_until(lambda: client.closed, what="the 408")  # ...silence does not
        self.assertEqual(parse_response(client.data)[0], 408)

    @defer.inlineCallbacks
    def test_slowloris_head_still_cut(self):
        """A byte of head every 0.1 s does not keep a head alive past the read timeout."""
        self.server_config(read_timeout_seconds=0.5)
        _up, _ = self.simple()
        client = yield self.connect()
        head = b"GET / HTTP/1.1\r\nHost: h\r\nX-Pad: " + b"p" * 100
        started = reactor.seconds()
        for i in range(len(head)):
            if client.closed:
                break
            client.transport.write(head[i:i + 1])
            yield task_sleep(0.05)
        yield wait_until(lambda: client.closed, what="the 408")
        # 0.5 s (+ the sweep's 0.125 s) after the first byte; a timer reset by each byte
        # would have let the whole head through, 6.5 s later.
        self.assertLess(reactor.seconds() - started, 3.0)
        self.assertEqual(parse_response(client.data)[0], 408)


    @defer.inlineCallbacks
    def test_408_during_a_response_cuts_the_connection(self):
        """The worker began answering before the body was complete, then the client
        stalled: a 408 now would land inside that response's body; the connection is cut
        instead, and nothing follows what the worker sent."""
        def answer_at_once(proto, head, rest):
            proto.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
        self.server_config(read_timeout_seconds=0.5)
        raw = self.raw_upstream(answer_at_once)
        self.start_proxy(FakePool("w", "/", [FakeInstance(raw.port, "w#1")]))
        client = yield self.connect()
        client.transport.write(b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nab")
        yield wait_until(lambda: client.closed, what="the read timeout")
        self.assertTrue(client.data.startswith(b"HTTP/1.1 200 OK\r\n"), client.data)
        self.assertTrue(client.data.endswith(b"partial"), client.data)
        self.assertNotIn(b"HTTP/1.1 408", client.data)  # (a request id may hold "408")


def task_sleep(seconds: float) -> defer.Deferred:
    return task.deferLater(reactor, seconds, lambda: None)
