"""When the proxy sends a request again (RFC 9110 9.2.2): only when it never reached an
instance (the connection was refused), or, once, for an idempotent method without a body
whose connection was lost before anything came back. A POST whose instance dies is never
run twice. Real proxy on loopback, raw workers that count what reaches them."""
from __future__ import annotations

from twisted.internet import defer

from .test_proxy import FakeInstance, FakePool, ProxyTestCase, closed_port, parse_response

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class Worker:
    """A raw worker: counts requests by request line; ``dies`` for the lines it answers by
    closing the connection (as an instance killed while handling them)."""

    def __init__(self, testcase, dies=(), garbage=(), dies_when_kept=()) -> None:
        self.seen: list = []
        self.dies = set(dies)
        self.dies_when_kept = set(dies_when_kept)  # only on a connection that served before
        self.garbage = set(garbage)
        self.raw = testcase.raw_upstream(self._behavior)

    def _behavior(self, proto, head, rest) -> None:
        served = [0]

        def on_request(head: bytes) -> None:
            line = head.split(b"\r\n", 1)[0]
            self.seen.append(line)
            served[0] += 1
            if line in self.dies or (line in self.dies_when_kept and served[0] > 1):
                proto.transport.loseConnection()
            elif line in self.garbage:
                proto.transport.write(b"NOT HTTP\r\n\r\n")
            else:
                proto.transport.write(OK)

        buffer = [b""]

        def received(data: bytes) -> None:  # the next requests on a kept connection
            buffer[0] += data
            while b"\r\n\r\n" in buffer[0]:
                head, _, buffer[0] = buffer[0].partition(b"\r\n\r\n")
                on_request(head)
        proto.dataReceived = received
        on_request(head)

    @property
    def port(self) -> int:
        return self.raw.port


class RetryTests(ProxyTestCase):
    mode = "prod"

    def two(self, a: Worker, b: Worker) -> FakePool:
        pool = FakePool("w", "/", [FakeInstance(a.port, "w#1"), FakeInstance(b.port, "w#2")])
        self.start_proxy(pool)
        return pool

    @defer.inlineCallbacks
    def keep_connections(self, count: int = 2):
        """A GET per instance first, so the proxy holds a kept connection to each (the case
        that used to be resent: a kept connection closed with nothing back)."""
        for _ in range(count):
            response = yield self.get("/warm")
            self.assertEqual(response.code, 200)
            yield response.content()

    @defer.inlineCallbacks
    def test_post_on_a_kept_connection_whose_instance_dies_runs_once(self):
        # It ran twice: the lost kept connection counted as "closed as idle".
        a = Worker(self, dies={b"POST /pay HTTP/1.1"})
        b = Worker(self, dies={b"POST /pay HTTP/1.1"})
        self.two(a, b)
        yield self.keep_connections()
        data = yield self.raw(b"POST /pay HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n"
                              b"Connection: close\r\n\r\n")
        self.assertEqual(parse_response(data)[0], 502)
        self.assertEqual((a.seen + b.seen).count(b"POST /pay HTTP/1.1"), 1)

    @defer.inlineCallbacks
    def test_patch_and_unknown_methods_run_once(self):
        a = Worker(self, dies={b"PATCH /x HTTP/1.1", b"PURGE /x HTTP/1.1"})
        b = Worker(self, dies={b"PATCH /x HTTP/1.1", b"PURGE /x HTTP/1.1"})
        self.two(a, b)
        for method in (b"PATCH", b"PURGE"):
            yield self.keep_connections()
            data = yield self.raw(method + b" /x HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
            self.assertEqual(parse_response(data)[0], 502)
            self.assertEqual((a.seen + b.seen).count(method + b" /x HTTP/1.1"), 1, method)

    @defer.inlineCallbacks
    def test_delete_that_kills_every_instance_runs_at_most_twice(self):
        # It ran three times and took three instances down.
        workers = [Worker(self, dies={b"DELETE /item HTTP/1.1"}) for _ in range(3)]
        pool = FakePool("w", "/", [FakeInstance(w.port, f"w#{i}") for i, w in enumerate(workers)])
        self.start_proxy(pool)
        yield self.keep_connections(3)
        data = yield self.raw(b"DELETE /item HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        self.assertEqual(parse_response(data)[0], 502)
        self.assertEqual(sum(w.seen.count(b"DELETE /item HTTP/1.1") for w in workers), 2)

    @defer.inlineCallbacks
    def test_get_whose_instance_dies_is_answered_by_another(self):
        # On a fresh connection it was not resent: a 502 at every kill -9 under load.
        a = Worker(self, dies={b"GET /page HTTP/1.1"})
        b = Worker(self)
        self.two(a, b)
        for _ in range(4):   # whichever instance it goes to first
            data = yield self.raw(b"GET /page HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
            self.assertEqual(parse_response(data)[:3:2], (200, b"ok"))
        self.assertEqual(b.seen.count(b"GET /page HTTP/1.1"), 4)

    @defer.inlineCallbacks
    def test_get_resent_on_a_fresh_connection_not_another_kept_one(self):
        # The resend took another kept connection to the same instance, as stale as the
        # first (an instance closing its kept connections, or killed): a 502 under load.
        a = Worker(self, dies_when_kept={b"GET /page HTTP/1.1"})
        pool = FakePool("w", "/", [FakeInstance(a.port, "w#1")])
        self.start_proxy(pool)
        warm = b"GET /warm HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
        yield defer.gatherResults([self.raw(warm), self.raw(warm)])  # two kept connections
        self.assertEqual(self.front.upstreams.idle_count(), 2)
        data = yield self.raw(b"GET /page HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        self.assertEqual(parse_response(data)[:3:2], (200, b"ok"))
        self.assertEqual(a.seen.count(b"GET /page HTTP/1.1"), 2)

    @defer.inlineCallbacks
    def test_get_with_a_body_is_not_resent(self):
        a = Worker(self, dies={b"GET /q HTTP/1.1"})
        b = Worker(self, dies={b"GET /q HTTP/1.1"})
        self.two(a, b)
        data = yield self.raw(b"GET /q HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n"
                              b"Connection: close\r\n\r\nabc")
        self.assertEqual(parse_response(data)[0], 502)
        self.assertEqual((a.seen + b.seen).count(b"GET /q HTTP/1.1"), 1)

    @defer.inlineCallbacks
    def test_invalid_answer_is_not_resent(self):
        a = Worker(self, garbage={b"GET /bad HTTP/1.1"})
        b = Worker(self, garbage={b"GET /bad HTTP/1.1"})
        self.two(a, b)
        data = yield self.raw(b"GET /bad HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        self.assertEqual(parse_response(data)[0], 502)
        self.assertEqual((a.seen + b.seen).count(b"GET /bad HTTP/1.1"), 1)

    @defer.inlineCallbacks
    def test_refused_connection_is_retried_whatever_the_method(self):
        """A refused connection never reached the worker: a POST goes to the next one."""
        good = Worker(self)
        pool = FakePool("w", "/", [FakeInstance(closed_port(), "w#1"),
                                   FakeInstance(good.port, "w#2")])
        self.start_proxy(pool)
        for _ in range(3):
            data = yield self.raw(b"POST /pay HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n"
                                  b"Connection: close\r\n\r\n")
            self.assertEqual(parse_response(data)[0], 200)
        self.assertEqual(good.seen.count(b"POST /pay HTTP/1.1"), 3)


class DevRetryTests(RetryTests):
    mode = "dev"
