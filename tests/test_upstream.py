"""Unit tests of tqserver.upstream: the response parser and request writer of
UpstreamConnection, driven byte by byte through a StringTransport, and UpstreamPool's
keep-alive bookkeeping on a memory reactor. Nothing here touches the network or sleeps."""
from __future__ import annotations

import random
from typing import List, Optional

from twisted.internet import error
from twisted.python.failure import Failure
from twisted.trial import unittest

try:
    from twisted.internet.testing import MemoryReactorClock, StringTransport
except ImportError:  # older Twisted
    from twisted.test.proto_helpers import MemoryReactorClock, StringTransport

from tqserver.proxy import upstream
from tqserver.proxy.response_head import UpstreamError, parse_response_head
from tqserver.proxy.upstream import UpstreamConnection, UpstreamPool, UpstreamSink

LOST = Failure(error.ConnectionLost("gone"))
DONE = Failure(error.ConnectionDone("closed"))


class Transport(StringTransport):
    """A StringTransport with the TCP bits UpstreamConnection uses, recording aborts."""

    def __init__(self) -> None:
        StringTransport.__init__(self)
        self.nodelay = None
        self.aborted = False

    def setTcpNoDelay(self, enabled) -> None:
        self.nodelay = enabled

    def abortConnection(self) -> None:
        self.aborted = True
        StringTransport.abortConnection(self)

    def pauseProducing(self) -> None:
        self.producerState = "paused"

    def resumeProducing(self) -> None:
        self.producerState = "producing"


class FakePool:
    """The two calls a connection makes on its pool."""

    def __init__(self) -> None:
        self.released: List[UpstreamConnection] = []
        self.forgotten: List[UpstreamConnection] = []

    def release(self, conn) -> None:
        self.released.append(conn)

    def forget(self, conn) -> None:
        self.forgotten.append(conn)


class Sink(UpstreamSink):
    """Records everything a connection reports."""

    upgrade_requested = True  # so a 101 is taken (see test_101_not_asked_for)

    def __init__(self) -> None:
        self.events: list = []
        self.chunks: List[bytes] = []
        self.response = None
        self.failure: Optional[Failure] = None
        self.upgraded = None

    def upstream_response(self, code, reason, headers) -> None:
        self.events.append("response")
        self.response = (code, reason, headers)

    def upstream_data(self, data) -> None:
        self.events.append("data")
        self.chunks.append(data)

    def upstream_done(self) -> None:
        self.events.append("done")

    def upstream_failed(self, reason) -> None:
        self.events.append("failed")
        self.failure = reason

    def upstream_upgraded(self, conn, rest) -> None:
        self.events.append("upgraded")
        self.upgraded = (conn, rest)

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)

    @property
    def code(self) -> Optional[int]:
        return self.response[0] if self.response else None

    def header(self, name: bytes) -> List[bytes]:
        return [v for n, v in self.response[2] if n.lower() == name.lower()]

    def ended(self) -> List[str]:
        return [e for e in self.events if e in ("done", "failed")]


HEAD = b"GET /x HTTP/1.1\r\nHost: w\r\n\r\n"


class ConnectionTestCase(unittest.TestCase):

    def connect(self):
        self.pool = FakePool()
        self.conn = UpstreamConnection(self.pool, 9001)
        self.transport = Transport()
        self.conn.makeConnection(self.transport)
        return self.conn

    def request(self, head: bytes = HEAD, head_request: bool = False, has_body: bool = False,
                chunked: bool = False) -> Sink:
        self.connect()
        sink = Sink()
        self.conn.send(head, sink, head_request, has_body, chunked)
        return sink

    def feed(self, *pieces: bytes) -> None:
        for piece in pieces:
            self.conn.dataReceived(piece)

    def feed_bytewise(self, data: bytes) -> None:
        for i in range(len(data)):
            self.conn.dataReceived(data[i:i + 1])

    def assertReleased(self) -> None:
        self.assertEqual(self.pool.released, [self.conn])
        self.assertFalse(self.transport.aborted)
        self.assertFalse(self.conn.closed)

    def assertDropped(self) -> None:
        self.assertEqual(self.pool.released, [])
        self.assertTrue(self.transport.aborted)
        self.assertTrue(self.conn.closed)


class ParseHeadTests(unittest.TestCase):

    def test_status_and_headers(self) -> None:
        head = parse_response_head(
            b"HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\nX-Empty:\r\nX-Pad:   v  ")
        self.assertEqual((head.version, head.code, head.reason),
                         (b"HTTP/1.1", 404, b"Not Found"))
        self.assertEqual(head.headers, [(b"Content-Type", b"text/plain"), (b"X-Empty", b""),
                                   (b"X-Pad", b"v")])

    def test_reason_optional(self) -> None:
        head = parse_response_head(b"HTTP/1.1 200")
        self.assertEqual((head.version, head.code, head.reason), (b"HTTP/1.1", 200, b""))
        self.assertEqual(parse_response_head(b"HTTP/1.0 200 Very  Fine").reason, b"Very  Fine")

    def test_bad_heads(self) -> None:
        for head in (b"HTTP/2 200 OK", b"HTTX/1.1 200 OK", b"HTTP/1.1 abc OK", b"HTTP/1.1 99 Low",
                     b"HTTP/1.1 1000 High", b"garbage", b"",
                     b"HTTP/1.1 200 OK\r\nno colon here", b"HTTP/1.1 200 OK\r\n: no name",
                     b"HTTP/1.1 200 OK\r\nName : space before colon",
                     b"HTTP/1.1 200 OK\r\n folded: continuation"):
            self.assertRaises(UpstreamError, parse_response_head, head)

    def test_control_characters_refused(self) -> None:
        # Found by tests.test_fuzz: these were relayed to the client as they were.
        for head in (b"HTTP/1.1 200 OK\r\nSet-Cookie: \x00", b"HTTP/1.1 200 OK\r\n\x00: 0",
                     b"HTTP/1.1 200 OK\r\n*:\x00: 0", b"HTTP/1.1 200 OK\r\nX: a\rb",
                     b"HTTP/1.1 204 Weird \x01 reason", b"HTTP/1.1 200 OK\r\nX(y): 1",
                     b"HTTP/1.1 200 OK\r\nX: \x7f"):
            self.assertRaises(UpstreamError, parse_response_head, head)
        self.assertEqual(parse_response_head(b"HTTP/1.1 200 OK\r\nX: a\tb \xe9").headers,
                         [(b"X", b"a\tb \xe9")])


class ConnectTests(ConnectionTestCase):

    def test_connection_made(self) -> None:
        conn = self.connect()
        self.assertTrue(self.transport.nodelay)
        fired = []
        conn.connected_d.addCallback(fired.append)
        self.assertEqual(fired, [conn])
        self.assertFalse(conn.closed)


class ContentLengthTests(ConnectionTestCase):

    RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\nContent-Type: text/plain\r\n\r\nhello world"

    def test_one_piece(self) -> None:
        sink = self.request()
        self.feed(self.RESPONSE)
        self.assertEqual(self.transport.value(), HEAD)
        self.assertEqual(sink.code, 200)
        self.assertEqual(sink.response[1], b"OK")
        self.assertEqual(sink.header(b"content-type"), [b"text/plain"])
        self.assertEqual(sink.body, b"hello world")
        self.assertEqual(sink.events[0], "response")
        self.assertEqual(sink.events[-1], "done")
        self.assertEqual(sink.ended(), ["done"])
        self.assertReleased()
        self.assertIsNone(self.conn.sink)

    def test_byte_by_byte(self) -> None:
        sink = self.request()
        self.feed_bytewise(self.RESPONSE)
        self.assertEqual(sink.body, b"hello world")
        self.assertEqual(sink.ended(), ["done"])
        self.assertReleased()

    def test_head_then_many_pieces(self) -> None:
        body = bytes(random.Random(7).getrandbits(8) for _ in range(100000))
        sink = self.request()
        self.feed(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body))
        self.assertEqual(sink.events, ["response"])
        rng = random.Random(3)
        pos = 0
        while pos < len(body):
            n = rng.randint(1, 5000)
            self.feed(body[pos:pos + n])
            pos += n
            if pos < len(body):
                self.assertNotIn("done", sink.events)
        self.assertEqual(sink.body, body)
        self.assertEqual(sink.ended(), ["done"])
        self.assertReleased()

    def test_head_split_across_reads(self) -> None:
        sink = self.request()
        self.feed(b"HTTP/1.1 200 OK\r\nContent-Le", b"ngth: 3\r\n\r", b"\nab", b"c")
        self.assertEqual(sink.body, b"abc")
        self.assertEqual(sink.ended(), ["done"])
        self.assertReleased()

    def test_zero_length(self) -> None:
        sink = self.request()
        self.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(sink.events, ["response", "done"])
        self.assertReleased()

    def test_two_requests_on_one_connection(self) -> None:
        first = self.request()
        self.feed(self.RESPONSE)
        self.assertReleased()
        second = Sink()
        self.conn.send(b"GET /2 HTTP/1.1\r\n\r\n", second, False, False, False)
        self.feed(b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok")
        self.assertEqual(first.body, b"hello world")
        self.assertEqual((second.code, second.body), (201, b"ok"))
        self.assertEqual(self.pool.released, [self.conn, self.conn])

    def test_extra_bytes_after_body_not_reused(self) -> None:
        sink = self.request()
        self.feed(self.RESPONSE + b"HTTP/1.1 200 OK\r\n")
        self.assertEqual(sink.body, b"hello world")
        self.assertEqual(sink.ended(), ["done"])
        self.assertDropped()

    def test_bytes_on_idle_connection_drop_it(self) -> None:
        self.request()
        self.feed(self.RESPONSE)
        self.feed(b"HTTP/1.1 200 OK\r\n\r\n")
        self.assertTrue(self.transport.aborted)
        self.assertTrue(self.conn.closed)

    def test_bad_content_length(self) -> None:
        for value in (b"abc", b"-1", b"1, 2", b"+3", b"0x3", b"0_3"):
            sink = self.request()
            self.feed(b"HTTP/1.1 200 OK\r\nContent-Length: " + value + b"\r\n\r\nxyz")
            self.assertEqual(sink.ended(), ["failed"], value)
            self.assertDropped()

    def test_conflicting_content_length(self) -> None:
        sink = self.request()
        self.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nxyz")
        self.assertEqual(sink.events, ["failed"])
        self.assertIsInstance(sink.failure.value, UpstreamError)
        self.assertDropped()

    def test_repeated_equal_content_length(self) -> None:
        sink = self.request()
        self.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nxyz")
        self.assertEqual(sink.body, b"xyz")
        self.assertReleased()


class ChunkedTests(ConnectionTestCase):

    RESPONSE = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"5;name=value\r\nhello\r\n"
                b"6 ; quoted=\"a;b\"\r\n world\r\n"
                b"A\r\n0123456789\r\n"
                b"0;last\r\nX-Checksum: abc\r\nX-Other: 1\r\n\r\n")

    def test_client_gone_in_the_middle_of_one_read(self) -> None:
        # The sink drops the connection on its first chunk (the client went away): the rest
        # of that read is not relayed to anyone (it raised AttributeError on the None sink).
        sink = self.request()
        sink.upstream_data = lambda data: (sink.chunks.append(data), self.conn.abort())
        self.feed(self.RESPONSE)
        self.assertEqual(sink.chunks, [b"hello"])
        self.assertDropped()

    def test_extensions_and_trailers(self) -> None:
        sink = self.request()
        self.feed(self.RESPONSE)
        self.assertEqual(sink.body, b"hello world0123456789")
        self.assertEqual(sink.ended(), ["done"])
        self.assertReleased()

    def test_byte_by_byte(self) -> None:
        sink = self.request()
        self.feed_bytewise(self.RESPONSE)
        self.assertEqual(sink.body, b"hello world0123456789")
        self.assertEqual(sink.ended(), ["done"])
        self.assertReleased()

    def test_large_chunks_streamed(self) -> None:
        body = b"x" * 70000 + b"y" * 30000
        sink = self.request()
        self.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        self.feed(b"%x\r\n" % len(body))
        for i in range(0, len(body), 4096):
            self.feed(body[i:i + 4096])
            self.assertNotIn("done", sink.events)
        # data was handed on as it came, not collected
        self.assertGreater(len(sink.chunks), 20)
        self.feed(b"\r\n0\r\n\r\n")
        self.assertEqual(sink.body, body)
        self.assertReleased()

    def test_no_trailers(self) -> None:
        sink = self.request()
        self.feed(b"HTTP/1.1 200 OK\r\ntransfer-encoding: CHUNKED\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
        self.assertEqual(sink.body, b"abc")
        self.assertReleased()

    def test_chunked_wins_over_content_length(self) -> None:
        sink = self.request()
        self.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nTransfer-Encoding: chunked\r\n\r\n"
                  b"3\r\nabc\r\n0\r\n\r\n")
        self.assertEqual(sink.body, b"abc")
        self.assertEqual(sink.ended(), ["done"])

    def test_bad_chunk_size(self) -> None:
        for size in (b"zz", b"", b"-5", b"1 2", b"0x3", b"+3", b"0_3", b" 3"):
            sink = self.request()
            self.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + size + b"\r\nabc")
            self.assertEqual(sink.ended(), ["failed"], size)
            self.assertIsInstance(sink.failure.value, UpstreamError)
            self.assertDropped()

    def test_chunk_size_line_too_long(self) -> None:
        sink = self.request()
        self.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"1" * 2000)
        self.assertEqual(sink.ended(), ["failed"])

    def test_missing_crlf_after_chunk(self) -> None:
        sink = self.request()
        self.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcXY0\r\n\r\n")
        self.assertEqual(sink.body, b"abc")
        self.assertEqual(sink.ended(), ["failed"])
        self.assertDropped()

    def test_lost_mid_chunk(self) -> None:
        sink = self.request()
        self.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\nabc")
        self.conn.connectionLost(LOST)
        self.assertEqual(sink.ended(), ["failed"])
        self.assertEqual(self.pool.forgotten, [self.conn])


class CloseDelimitedTests(ConnectionTestCase):

    def test_body_until_close(self) -> None:
        sink = self.request()
        self.feed(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nsome ", b"body")
        self.feed(b" more")
        self.assertNotIn("done", sink.events)
        self.conn.connectionLost(DONE)
        self.assertEqual(sink.body, b"some body more")
        self.assertEqual(sink.ended(), ["done"])
        self.assertEqual(self.pool.released, [])
        self.assertEqual(self.pool.forgotten, [self.conn])

    def test_http10_body_until_close(self) -> None:
        sink = self.request()
        self.feed(b"HTTP/1.0 200 OK\r\n\r\nold")
        self.conn.connectionLost(LOST)   # an unclean close still ends such a body
        self.assertEqual(sink.body, b"old")
        self.assertEqual(sink.ended(), ["done"])


class NoBodyTests(ConnectionTestCase):

    def test_head_request(self) -> None:
        sink = self.request(b"HEAD / HTTP/1.1\r\n\r\n", head_request=True)
        self.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
        self.assertEqual(sink.events, ["response", "done"])
        self.assertEqual(sink.header(b"content-length"), [b"1000"])
        self.assertReleased()

    def test_head_request_chunked(self) -> None:
        sink = self.request(b"HEAD / HTTP/1.1\r\n\r\n", head_request=True)
        self.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        self.assertEqual(sink.events, ["response", "done"])
        self.assertReleased()

    def test_204_and_304(self) -> None:
        for code in (204, 304):
            sink = self.request()
            self.feed(b"HTTP/1.1 %d X\r\nContent-Length: 50\r\nETag: \"e\"\r\n\r\n" % code)
            self.assertEqual(sink.events, ["response", "done"], code)
            self.assertEqual(sink.code, code)
            self.assertReleased()

    def test_304_then_next_response(self) -> None:
        first = self.request()
        self.feed(b"HTTP/1.1 304 Not Modified\r\n\r\n")
        second = Sink()
        self.conn.send(HEAD, second, False, False, False)
        self.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi")
        self.assertEqual(first.events, ["response", "done"])
        self.assertEqual(second.body, b"hi")


class InterimResponseTests(ConnectionTestCase):

    def test_100_continue(self) -> None:
        sink = self.request()
        self.feed(b"HTTP/1.1 100 Continue\r\n\r\n")
        self.assertEqual(sink.events, [])
        self.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.assertEqual(sink.code, 200)
        self.assertEqual(sink.events.count("response"), 1)
        self.assertEqual(sink.body, b"ok")
        self.assertReleased()

    def test_103_and_100_in_one_read(self) -> None:
        sink = self.request()
        self.feed(b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
                  b"HTTP/1.1 100 Continue\r\n\r\n"
                  b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.assertEqual(sink.code, 200)
        self.assertEqual(sink.header(b"link"), [])
        self.assertEqual(sink.body, b"ok")
        self.assertEqual(sink.ended(), ["done"])

    def test_interim_byte_by_byte(self) -> None:
        sink = self.request()
        self.feed_bytewise(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
                           b"HTTP/1.1 404 Nope\r\nContent-Length: 1\r\n\r\n!")
        self.assertEqual((sink.code, sink.body), (404, b"!"))
        self.assertReleased()


class UpgradeTests(ConnectionTestCase):

    def test_101_hands_over_the_rest(self) -> None:
        sink = self.request(b"GET /ws HTTP/1.1\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n")
        self.feed(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                  b"Connection: Upgrade\r\n\r\n\x81\x05hello")
        self.assertEqual(sink.events, ["response", "upgraded"])
        self.assertEqual(sink.code, 101)
        conn, rest = sink.upgraded
        self.assertIs(conn, self.conn)
        self.assertEqual(rest, b"\x81\x05hello")
        # from now on bytes are passed through untouched, whatever they look like
        self.feed(b"HTTP/1.1 200 OK\r\n\r\n", b"\x00\xff")
        self.assertEqual(sink.chunks, [b"HTTP/1.1 200 OK\r\n\r\n", b"\x00\xff"])
        self.assertEqual(self.pool.released, [])
        self.conn.connectionLost(DONE)
        self.assertEqual(sink.ended(), ["done"])

    def test_101_without_rest(self) -> None:
        sink = self.request()
        self.feed(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n")
        self.assertEqual(sink.upgraded[1], b"")
        self.feed(b"data")
        self.assertEqual(sink.body, b"data")

    def test_101_not_asked_for(self) -> None:
        # Found by tests.test_fuzz: a 101 to a plain GET spliced the connection and relayed
        # its head unfiltered. It is a broken response (502), not a protocol switch.
        sink = self.request()
        sink.upgrade_requested = False
        self.feed(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\ndata")
        self.assertEqual(sink.events, ["failed"])
        self.assertIsInstance(sink.failure.value, UpstreamError)
        self.assertDropped()

    def test_sink_replaced_after_upgrade(self) -> None:
        sink = self.request()
        self.feed(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")
        pipe = Sink()
        self.conn.sink = pipe      # what splice.py does
        self.feed(b"abc")
        self.assertEqual(pipe.body, b"abc")
        self.assertEqual(sink.body, b"")


class KeepAliveTests(ConnectionTestCase):

    def respond(self, head: bytes) -> Sink:
        sink = self.request()
        self.feed(head + b"\r\nContent-Length: 2\r\n\r\nok")
        self.assertEqual(sink.ended(), ["done"])
        return sink

    def test_http11_default_keep_alive(self) -> None:
        self.respond(b"HTTP/1.1 200 OK")
        self.assertReleased()

    def test_http11_connection_close(self) -> None:
        self.respond(b"HTTP/1.1 200 OK\r\nConnection: close")
        self.assertDropped()

    def test_http11_connection_close_among_tokens(self) -> None:
        self.respond(b"HTTP/1.1 200 OK\r\nConnection: X-Foo, Close")
        self.assertDropped()

    def test_http10_default_close(self) -> None:
        self.respond(b"HTTP/1.0 200 OK")
        self.assertDropped()

    def test_http10_keep_alive(self) -> None:
        self.respond(b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive")
        self.assertReleased()

    def test_released_connection_reads_again(self) -> None:
        """A connection the client side paused (slow reader) must not go back to the pool
        paused: it would never see its next response, nor the worker closing it."""
        sink = self.request()
        self.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
        self.conn.pauseProducing()
        self.assertEqual(self.transport.producerState, "paused")
        self.feed(b"cd")
        self.assertEqual(sink.ended(), ["done"])
        self.assertReleased()
        self.assertEqual(self.transport.producerState, "producing")


class FailureTests(ConnectionTestCase):

    def test_malformed_status_line(self) -> None:
        sink = self.request()
        self.feed(b"HTTP/1.1 OK 200\r\n\r\n")
        self.assertEqual(sink.events, ["failed"])
        self.assertIsInstance(sink.failure.value, UpstreamError)
        self.assertDropped()

    def test_not_http(self) -> None:
        sink = self.request()
        self.feed(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")
        self.assertEqual(sink.events, ["failed"])
        self.assertDropped()

    def test_malformed_header(self) -> None:
        sink = self.request()
        self.feed(b"HTTP/1.1 200 OK\r\nGood: yes\r\nBad header\r\n\r\n")
        self.assertEqual(sink.events, ["failed"])
        self.assertDropped()

    def test_head_too_large(self) -> None:
        sink = self.request()
        self.feed(b"HTTP/1.1 200 OK\r\n")
        for _ in range(upstream.MAX_HEAD // 1000 + 2):
            self.feed(b"X-Filler: " + b"a" * 988 + b"\r\n")
            if sink.events:
                break
        self.assertEqual(sink.events, ["failed"])
        self.assertDropped()

    def test_failure_reported_once(self) -> None:
        sink = self.request()
        self.feed(b"garbage\r\n\r\n")
        self.conn.connectionLost(LOST)
        self.assertEqual(sink.ended(), ["failed"])

    def test_lost_mid_body(self) -> None:
        sink = self.request()
        self.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        self.conn.connectionLost(LOST)
        self.assertEqual(sink.body, b"abc")
        self.assertEqual(sink.ended(), ["failed"])
        self.assertTrue(sink.failure.check(error.ConnectionLost))
        self.assertEqual(self.pool.released, [])
        self.assertEqual(self.pool.forgotten, [self.conn])
        self.assertTrue(self.conn.closed)

    def test_lost_mid_body_on_reused_connection(self) -> None:
        self.request()
        self.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        self.conn.connectionLost(LOST)

    def test_lost_mid_head(self) -> None:
        sink = self.request()
        self.feed(b"HTTP/1.1 200 O")
        self.conn.connectionLost(LOST)
        self.assertEqual(sink.events, ["failed"])

    def test_idle_connection_lost_quietly(self) -> None:
        self.request()
        self.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.conn.connectionLost(DONE)
        self.assertEqual(self.pool.forgotten, [self.conn])
        self.assertTrue(self.conn.closed)

    def test_abort_detaches_the_sink(self) -> None:
        sink = self.request()
        self.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        self.conn.abort()
        self.assertTrue(self.transport.aborted)
        self.conn.connectionLost(LOST)
        self.assertEqual(sink.ended(), [])   # the one who aborted is not told again

    def test_stop_producing_aborts(self) -> None:
        self.request()
        self.conn.stopProducing()
        self.assertTrue(self.transport.aborted)
        self.assertTrue(self.conn.closed)

    def test_pause_resume_reach_the_transport(self) -> None:
        self.request()
        self.conn.pauseProducing()
        self.assertEqual(self.transport.producerState, "paused")
        self.conn.resumeProducing()
        self.assertEqual(self.transport.producerState, "producing")

    def test_sink_leaving_during_response_head(self) -> None:
        """The proxy may abort while it handles the head (client gone): parsing stops."""
        conn = self.connect()

        class Leaving(Sink):
            def upstream_response(self, code, reason, headers):
                Sink.upstream_response(self, code, reason, headers)
                conn.abort()
        sink = Leaving()
        conn.send(HEAD, sink, False, False, False)
        self.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
        self.assertEqual(sink.events, ["response"])
        self.assertDropped()


class RequestBodyTests(ConnectionTestCase):

    def test_content_length_body(self) -> None:
        head = b"POST /u HTTP/1.1\r\nContent-Length: 11\r\n\r\n"
        sink = self.request(head, has_body=True)
        self.conn.write_body(b"hello")
        self.conn.write_body(b"")
        self.conn.write_body(b" world")
        self.conn.finish_body()
        self.conn.finish_body()    # twice is harmless
        self.assertEqual(self.transport.value(), head + b"hello world")
        self.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(sink.ended(), ["done"])
        self.assertReleased()

    def test_chunked_body(self) -> None:
        head = b"POST /u HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        self.request(head, has_body=True, chunked=True)
        self.conn.write_body(b"hello")
        self.conn.write_body(b"")            # an empty chunk would end the body: skipped
        self.conn.write_body(b"x" * 300)
        self.conn.finish_body()
        self.assertEqual(self.transport.value(),
                         head + b"5\r\nhello\r\n12c\r\n" + b"x" * 300 + b"\r\n0\r\n\r\n")

    def test_no_body_means_nothing_after_head(self) -> None:
        self.request()
        self.conn.finish_body()
        self.assertEqual(self.transport.value(), HEAD)

    def test_response_before_body_finished(self) -> None:
        """An early answer (413, 401...) is delivered at once; the connection is only reused
        once the request body has been sent completely."""
        head = b"POST /u HTTP/1.1\r\nContent-Length: 6\r\n\r\n"
        sink = self.request(head, has_body=True)
        self.conn.write_body(b"abc")
        self.feed(b"HTTP/1.1 413 Too Large\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(sink.events, ["response", "done"])
        self.assertEqual(self.pool.released, [])
        self.conn.write_body(b"def")
        self.conn.finish_body()
        self.assertEqual(self.transport.value(), head + b"abcdef")
        self.assertReleased()

    def test_no_writes_after_abort(self) -> None:
        head = b"POST /u HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        self.request(head, has_body=True, chunked=True)
        self.conn.abort()
        self.conn.write_body(b"late")
        self.conn.finish_body()
        self.assertEqual(self.transport.value(), head)


class PoolTests(unittest.TestCase):

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.pool = UpstreamPool(self.reactor, connect_timeout=2.5)

    def connect_pending(self, index: int = -1):
        """Complete the connection attempt the pool made (as the reactor would)."""
        host, port, factory, timeout, _ = self.reactor.tcpClients[index]
        proto = factory.buildProtocol(None)
        transport = Transport()
        proto.makeConnection(transport)
        return proto

    def idle(self, port: int) -> UpstreamConnection:
        conn = UpstreamConnection(self.pool, port)
        conn.makeConnection(Transport())
        return conn

    def test_acquire_connects_to_loopback(self) -> None:
        got = []
        self.pool.acquire(9005).addCallback(got.append)
        self.assertEqual(len(self.reactor.tcpClients), 1)
        host, port, factory, timeout, _ = self.reactor.tcpClients[0]
        self.assertEqual((host, port, timeout), ("127.0.0.1", 9005, 2.5))
        self.assertEqual(got, [])
        self.connect_pending()
        self.assertEqual(len(got), 1)
        conn = got[0]
        self.assertIsInstance(conn, UpstreamConnection)
        self.assertEqual(conn.port, 9005)
        self.assertIs(conn.pool, self.pool)

    def test_acquire_failure(self) -> None:
        failures = []
        self.pool.acquire(9005).addErrback(failures.append)
        host, port, factory, timeout, _ = self.reactor.tcpClients[0]
        factory.clientConnectionFailed(None, Failure(error.ConnectionRefusedError()))
        self.assertEqual(len(failures), 1)
        self.assertTrue(failures[0].check(error.ConnectionRefusedError))

    def test_reuse_is_lifo(self) -> None:
        a, b, c = self.idle(9001), self.idle(9001), self.idle(9002)
        self.pool.release(a)
        self.pool.release(b)
        self.pool.release(c)
        self.assertEqual(self.pool.idle_count(), 3)
        self.assertEqual(self.pool.idle_count(9001), 2)
        got = []
        self.pool.acquire(9001).addCallback(got.append)
        self.pool.acquire(9001).addCallback(got.append)
        self.assertEqual(got, [b, a])
        self.assertEqual(self.reactor.tcpClients, [])
        self.assertEqual(self.pool.idle_count(9001), 0)
        self.pool.acquire(9001)
        self.assertEqual(len(self.reactor.tcpClients), 1)   # now a new one

    def test_closed_idle_connections_skipped(self) -> None:
        a, b = self.idle(9001), self.idle(9001)
        self.pool.release(a)
        self.pool.release(b)
        b.closed = True
        got = []
        self.pool.acquire(9001).addCallback(got.append)
        self.assertEqual(got, [a])

    def test_forget(self) -> None:
        a, b = self.idle(9001), self.idle(9001)
        self.pool.release(a)
        self.pool.release(b)
        self.pool.forget(b)
        self.pool.forget(b)
        self.pool.forget(self.idle(9009))   # unknown port: no error
        self.assertEqual(self.pool.idle_count(9001), 1)
        got = []
        self.pool.acquire(9001).addCallback(got.append)
        self.assertEqual(got, [a])

    def test_idle_connection_closed_by_worker_is_forgotten(self) -> None:
        got = []
        self.pool.acquire(9001).addCallback(got.append)
        self.connect_pending()
        conn = got[0]
        sink = Sink()
        conn.send(HEAD, sink, False, False, False)
        conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(self.pool.idle_count(9001), 1)
        conn.connectionLost(DONE)
        self.assertEqual(self.pool.idle_count(9001), 0)

    def test_close_port(self) -> None:
        a, b, c = self.idle(9001), self.idle(9001), self.idle(9002)
        for conn in (a, b, c):
            self.pool.release(conn)
        self.pool.close_port(9001)
        self.assertTrue(a.transport.disconnecting and b.transport.disconnecting)
        self.assertFalse(c.transport.disconnecting)
        self.assertEqual(self.pool.idle_count(9001), 0)
        self.assertEqual(self.pool.idle_count(), 1)
        self.pool.close_port(9001)   # nothing left: no error
        self.pool.close_all()
        self.assertTrue(c.transport.disconnecting)
        self.assertEqual(self.pool.idle_count(), 0)

    def test_idle_limit(self) -> None:
        conns = [self.idle(9001) for _ in range(upstream.MAX_IDLE_PER_PORT + 1)]
        for conn in conns:
            self.pool.release(conn)
        self.assertEqual(self.pool.idle_count(9001), upstream.MAX_IDLE_PER_PORT)
        self.assertTrue(conns[-1].closed)
        self.assertTrue(conns[-1].transport.aborted)
